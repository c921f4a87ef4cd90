"""The serving HTTP API: vLLM's OpenAI-compatible subset plus the feedback gateway.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /v1/load_lora_adapter``,
``POST /v1/unload_lora_adapter`` (admin), ``POST /v1/feedback``, ``GET/PUT /admin/routes``,
``POST /admin/opt-out`` (admin), ``GET /healthz``, ``GET /metrics``.

A chat request picks its model with ``model``: the routed alias (``vloop``, or the base model's
id) lets the gateway choose the arm by the user's sticky bucket; an adapter's name asks for it
directly. The caller's user id comes from the OpenAI ``user`` field (or ``X-User-Id``); it is
stored only as an HMAC. Every answered request is spooled as an interaction record (PII
redacted) before the response goes out, unless the user opted out. ``stream: true`` answers with
server-sent events (serving.streaming), logged once when the stream ends.

Banned phrases: the lake's decoding policy (vloop.vlm.decoding, re-read every ``--decoding-ttl``
seconds) together with the request's own vLLM-style ``bad_words`` are never said: the local
backend enforces them on every tokenisation (the policy's exceptions, e.g. 不可能, stay allowed);
the upstream gets the merged list as ``bad_words``. An image request that asks for it
(``"vloop": {"image_quality": true}`` in the body; the ``openai`` client's ``extra_body``) gets
``vloop.image_quality`` (vloop.curate.imagequality.quick_summary: flags and advice for the app), computed
in a thread while the model answers; it is opt-in because it decodes the photo, the one thing the
hot path otherwise never does (see vloop.store.images: metadata is stripped without a decode).

With ``--upstream`` the model server is an OpenAI-compatible one (vLLM in production): the
gateway asks it for its base model's id, sends it the validated sampling settings and the logged
image as a data URL (it never sees a user's URL), and copies registry adapters from the lake to a
local directory before asking it to load them.
"""

from __future__ import annotations

import asyncio
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pybase64
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse

from serving.auth import ApiKeys, FeedbackTokens, TokenError, derive_secret
from serving.engine import EngineError, GenRequest, LocalEngine, UpstreamEngine
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from serving.streaming import (SSEResponse, finish_ends_with_stop_token, local_stream_events, logprob_entry,
                               sse_stream, upstream_stream_events)
from serving.routing import Routes, RouteStore
from vloop.store.config import Settings
from vloop.vlm.decoding import MAX_PHRASE_CHARS, DecodingPolicy, PolicyCache
from vloop.store.images import ImageError, ImageTooLarge, image_key, normalise_image, open_image
from vloop.vlm.model import MAX_QUESTION_CHARS, Confidence
from vloop.capture.netguard import FetchError, FetchPolicy, fetch_url
from vloop.privacy import redact, user_key as hmac_user_key
from vloop.store.schema import FEEDBACK, INTERACTION, RecordError
from vloop.capture.spool import Shipper, Spool

log = logging.getLogger(__name__)
ROUTED_ALIAS = "vloop"
# Request fields the gateway consumes and does not pass to an upstream server: the raw user id
# (only its HMAC is kept), the gateway's metadata and options, and the streaming switches it sets itself.
GATEWAY_ONLY_FIELDS = frozenset({"user", "metadata", "vloop", "stream", "stream_options"})
GATEWAY_OPTIONS = {"image_quality": bool}  # the request's "vloop" object: what an app may ask for
MAX_BAD_WORDS = 100  # a request's own bad_words; each at most vloop.vlm.decoding.MAX_PHRASE_CHARS
# A request's metadata, as OpenAI limits it: at most 16 pairs, keys up to 64 characters, string
# values up to 512 (session_id and category are stored with every record).
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
FEEDBACK_TOKEN_HEADER = "X-Vloop-Feedback-Token"
# Request ids whose feedback events this replica remembers (event ids for dedupe, the count for
# the per-answer bound); the oldest are forgotten first. In memory, per replica.
FEEDBACK_MEMORY = 50_000
STATIC = Path(__file__).with_name("static")


@dataclass
class ServeConfig:
    model: str | None
    lake_url: str | None
    state_dir: Path
    spool_dir: Path
    upstream: str | None = None
    upstream_api_key: str | None = None
    admin_token: str | None = None
    user_key_secret: str | None = None
    max_request_bytes: int = 20 * 2**20
    max_image_bytes: int = Settings.max_image_bytes
    max_image_pixels: int = Settings.max_image_pixels
    max_tokens_limit: int = 512
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    ship_interval_s: float = 1.0
    max_batch: int = 16
    # Seconds between reads of the registry's desired serving state (0: never; routes and
    # adapters then change only through the admin routes).
    reconcile_interval_s: float = 5.0
    # Seconds a replica keeps the lake's decoding policy (banned phrases) before reading it again:
    # a `vloop decoding ban` takes effect within this, without a restart.
    decoding_ttl_s: float = 10.0
    # Simulation mode (the demo): requests may carry X-Vloop-Sim-Time to log a simulated clock.
    # Off in production, so no client can ever set a record's timestamp.
    simulation: bool = False
    # Feedback tokens (serving.auth): the key every replica shares (default: derived from
    # user_key_secret), the one before a rotation, their lifetime, and events per answer.
    feedback_secret: str | None = None
    feedback_secret_previous: str | None = None
    feedback_token_ttl_s: int = 7 * 86400
    feedback_max_events: int = 20
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys({}))  # empty: no client authentication
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call chat and feedback
    playground: bool = False  # serve /playground


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        self.status, self.message, self.type = status, message, type_


def _error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status)


UNLOGGED_PREFIX = "chatcmpl-nolog-"  # the id of an answer that was not logged (opted out)


class Gateway:
    """Owns the engine, routes, opt-outs, spool and shipper of one serving process."""

    def __init__(self, cfg: ServeConfig):
        from vloop.store.lake import open_lake

        if not cfg.user_key_secret:
            raise ValueError("VLOOP_USER_KEY_SECRET must be set: user ids are stored only as HMACs")
        self.cfg = cfg
        self.metrics = Metrics()
        secret = cfg.feedback_secret.encode() if cfg.feedback_secret else derive_secret(cfg.user_key_secret)
        previous = [cfg.feedback_secret_previous.encode()] if cfg.feedback_secret_previous else []
        self.tokens = FeedbackTokens(secret, previous, ttl_s=cfg.feedback_token_ttl_s)
        self.feedback_seen: OrderedDict[str, set[str]] = OrderedDict()  # request id -> event ids taken
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.routes = RouteStore(cfg.state_dir / "routes.json")
        self.opt_out_path = cfg.state_dir / "opt_out.json"
        self.opted_out: set[str] = set(json.loads(self.opt_out_path.read_text())) if self.opt_out_path.is_file() else set()
        self.opted_out_pending: set[str] = set()  # added here since the last sync with the lake
        self.lake = open_lake(cfg.lake_url) if cfg.lake_url else None
        self.registry = None
        if self.lake is not None:
            from vloop.learn.registry import Registry

            self.registry = Registry(self.lake)
        self.applied_seq = 0  # the registry serving state this replica has applied
        # The lake's banned phrases (none without a lake; the request's bad_words still apply).
        self.decoding = PolicyCache(self.lake, ttl_s=cfg.decoding_ttl_s) if self.lake is not None else None
        self.reconciled: set[str] = set()  # adapters loaded because the registry said so
        self.reconcile_lock = asyncio.Lock()  # one reconciliation at a time, states in order
        if cfg.upstream:
            self.engine = UpstreamEngine(cfg.upstream, api_key=cfg.upstream_api_key)
            self.local = None
        else:
            self.engine = self.local = LocalEngine(cfg.model, adapter_cache=cfg.state_dir / "adapters",
                                                   lake=self.lake, max_batch=cfg.max_batch)
            r = self.routes.routes
            if r.champion or r.canary:
                # A fresh local engine holds no adapter: routes naming one would answer 404 until the
                # adapters are back (the registry's, at the first reconciliation). Serve the base meanwhile.
                log.warning("persisted routes name adapters that are not loaded yet (%s); serving the base "
                            "until they are", r)
                self.routes.routes = Routes()
        self.spool = Spool(cfg.spool_dir)
        self.shipper = None
        if self.lake is not None:
            self.shipper = Shipper(self.spool, self.lake, interval_s=cfg.ship_interval_s,
                                   on_failure=lambda e: self.metrics.inc("vloop_ship_failures_total",
                                                                         "failed attempts to ship the spool"),
                                   on_shipped=lambda s, n: self.metrics.inc(
                                       "vloop_records_shipped_total", "records moved to the lake", n, stream=s)).start()
        self.metrics.gauge("vloop_spool_segments", "spool segments not yet shipped", self.spool.depth)
        self.metrics.gauge("vloop_adapters_loaded", "LoRA adapters loaded",
                           lambda: len(self.local.adapters) if self.local else 0)

    def close(self) -> None:
        if self.shipper:
            self.shipper.stop(drain=True)
        else:
            self.spool.close()
        self.engine.close()

    # -- helpers ----------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        """The base model's id as clients and records know it: the local model's, or the
        upstream's own id once it has been asked (until then what --model said)."""
        if self.local:
            return self.local.base_name
        return self.engine.base_name or self.cfg.model or "upstream"

    async def base_id(self) -> str:
        """The id the model server knows the base by (asks the upstream the first time)."""
        return self.local.base_name if self.local else await self.engine.resolve_base()

    def is_base(self, model: str) -> bool:
        # --model's value still names the base, so clients set up with the path keep working.
        return model == self.base_name or (self.cfg.model is not None and model == self.cfg.model)

    async def decoding_policy(self) -> DecodingPolicy:
        """The decoding policy in force. Reading the lake (once per TTL) runs in a thread, so a
        slow lake never stalls the event loop; in between it is a memory read."""
        if self.decoding is None:
            return DecodingPolicy()
        if self.decoding.stale:
            return await asyncio.to_thread(self.decoding.get)
        return self.decoding.get()

    def check_admin(self, request: Request) -> None:
        if not self.cfg.admin_token:
            raise ApiError(503, "admin routes are disabled: set VLOOP_ADMIN_TOKEN", "server_error")
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.cfg.admin_token.encode()):
            raise ApiError(401, "admin route: missing or wrong bearer token", "authentication_error")

    def check_app(self, request: Request, body: dict | None = None) -> str | None:
        """The calling app's name, from its API key (``Authorization: Bearer``; feedback may
        also carry it as ``api_key`` in the body, as ``navigator.sendBeacon`` sets no headers).
        None when no keys are configured; 401 when they are and the key is missing or unknown."""
        keys = self.cfg.api_keys
        if not keys:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if key is None and body is not None and isinstance(body.get("api_key"), str):
            key = body["api_key"]
        app = keys.app_for(key)
        if app is None:
            self.metrics.inc("vloop_auth_refused_total", "requests refused for a missing or unknown API key",
                             route=request.url.path)
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'" if not key else
                           "unknown API key", "authentication_error")
        return app

    def take_feedback(self, request_id: str, event_id: str) -> bool:
        """Count one event against its answer's bound; False if this event id was taken already
        (a retry: answered as accepted, logged once). 429 past the bound."""
        seen = self.feedback_seen.get(request_id)
        if seen is None:
            seen = self.feedback_seen[request_id] = set()
            if len(self.feedback_seen) > FEEDBACK_MEMORY:
                self.feedback_seen.popitem(last=False)
        else:
            self.feedback_seen.move_to_end(request_id)
        if event_id in seen:
            return False
        if len(seen) >= self.cfg.feedback_max_events:
            self.metrics.inc("vloop_feedback_refused_total", "feedback events refused, by reason", reason="flood")
            raise ApiError(429, f"this answer has had {len(seen)} feedback events, the most one answer takes",
                           "rate_limit_error")
        seen.add(event_id)
        return True

    def user_key(self, body: dict, request: Request) -> str | None:
        """The HMAC of the caller's user id; None when the request names no user."""
        uid = body.get("user") or request.headers.get("x-user-id")
        if uid is None:
            return None
        if not isinstance(uid, str):
            raise ApiError(400, "'user' must be a string")
        return hmac_user_key(uid, self.cfg.user_key_secret)

    def now(self, request: Request) -> dt.datetime:
        """The record's timestamp: the server's clock, or in simulation mode X-Vloop-Sim-Time."""
        sim = request.headers.get("x-vloop-sim-time")
        if sim and self.cfg.simulation:
            try:
                t = dt.datetime.fromisoformat(sim)
            except ValueError:
                raise ApiError(400, "X-Vloop-Sim-Time must be an ISO 8601 time") from None
            return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
        return dt.datetime.now(dt.timezone.utc)

    # -- desired state ------------------------------------------------------------------------
    async def load(self, name: str, path: str) -> None:
        if self.local:
            await asyncio.to_thread(self.local.load_adapter, name, path)
        else:
            # vLLM reads adapters from its own disk: a lake prefix is copied to a local directory
            # first, and a local directory is passed as an absolute path.
            local = Path(path)
            if local.is_dir():
                path = str(local.resolve())
            elif self.lake is not None and not path.startswith("/"):
                path = await self.sync_adapter(name, path)
            await self.engine.load_adapter(name, path)
        self.metrics.inc("vloop_adapter_loads_total", "adapter loads")

    async def unload(self, name: str) -> None:
        if self.local:
            await asyncio.to_thread(self.local.unload_adapter, name)
        else:
            await self.engine.unload_adapter(name)

    async def loaded_names(self) -> set[str]:
        if self.local:
            return set(self.local.adapters)
        return {m["id"] for m in await self.engine.models() if m.get("parent")}

    async def load_version(self, ref: str) -> None:
        """Load a registry version. The local engine reads the lake itself; an upstream server
        (vLLM) needs a directory it can read, so the files are copied under the state dir first
        (shared with vLLM's host in production)."""
        version = await asyncio.to_thread(self.registry.get, ref)
        path = version.path
        if not self.local:
            path = await self.sync_adapter(ref, path)
        await self.load(ref, path)

    async def sync_adapter(self, name: str, prefix: str) -> str:
        """Copy an adapter's files from the lake under the state dir (which production shares with
        the vLLM host) and return that directory's absolute path."""
        from vloop.store.lake import fetch_files

        keys = await asyncio.to_thread(self.lake.list, prefix.rstrip("/") + "/")
        if not keys:
            raise ApiError(400, f"lora_path {prefix!r} is neither a local directory nor an adapter in the lake")
        dest = (self.cfg.state_dir / "adapters" / name.replace("@", "_").replace("/", "_")).resolve()
        await asyncio.to_thread(shutil.rmtree, dest, True)  # no stale file from an earlier copy
        return str(await asyncio.to_thread(fetch_files, self.lake, keys, dest))

    async def reconcile(self) -> bool:
        """Make this replica serve what the registry's newest serving state says: load its
        adapters, apply its routes, unload what it no longer names. True if anything changed.
        Serialised, and only ever forward (a newer state is never undone by an older one). A
        champion that fails to load leaves the previous routes serving; a canary that fails is left
        out (the champion's routes apply, canary share 0). Either is retried next round."""
        if self.registry is None:
            return False
        async with self.reconcile_lock:
            want = await asyncio.to_thread(self.registry.serving_state)
            if want.seq <= self.applied_seq:
                return False
            names = [n for n in (want.champion, want.canary) if n]
            loaded = await self.loaded_names()
            canary, share, failed = want.canary, want.canary_share, None
            for ref in names:
                if ref not in loaded:
                    try:
                        await self.load_version(ref)
                    except Exception as e:
                        if ref != want.canary:
                            raise  # no champion: keep the previous routes, retry next round
                        # A canary that cannot load must not hold up the champion's routes.
                        canary, share, failed = None, 0.0, e
                        continue
                    self.reconciled.add(ref)
            salt = (want.experiment or {}).get("salt") or Routes.salt
            self.routes.set(Routes(champion=want.champion, canary=canary, canary_share=share,
                                   holdout_share=want.holdout_share, salt=salt).validate(await self.loaded_names()))
            for ref in sorted(self.reconciled - set(names)):
                await self.unload(ref)
                self.reconciled.discard(ref)
            if failed is not None:
                self.metrics.inc("vloop_reconcile_failures_total", "failed reconciliations with the registry")
                log.warning("serving state #%d applied without its canary %s, which failed to load: %s",
                            want.seq, want.canary, failed)
                raise failed  # applied_seq stays behind: the canary is retried next round
            self.applied_seq = want.seq
            log.info("serving state #%d applied: %s", want.seq, self.routes.routes)
            return True

    async def reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as e:  # the lake or an adapter is unavailable: keep serving, retry
                self.metrics.inc("vloop_reconcile_failures_total", "failed reconciliations with the registry")
                log.warning("reconciling with the registry failed: %s", e)
            await asyncio.sleep(self.cfg.reconcile_interval_s)

    def sync_opt_outs(self) -> None:
        """The lake's opt-outs and erased users are the truth shared by every replica (`vloop
        privacy opt-out`, another replica's /admin/opt-out, an erasure): take them, so additions
        and removals reach this one and an erased user's new requests are not logged."""
        from vloop.privacy import excluded_users

        if self.lake is not None:
            self.opted_out = excluded_users(self.lake) | self.opted_out_pending
            self.opted_out_pending.clear()

    async def sync_opt_outs_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.sync_opt_outs)
            except Exception as e:
                log.warning("reading the lake's opt-outs failed: %s", e)

    def loaded_adapters(self) -> set[str] | None:
        return set(self.local.adapters) if self.local else None

    async def image_bytes(self, url: str) -> bytes:
        """The bytes of a request's image: a data URL's decoded in place (microseconds), an http(s)
        URL fetched in a thread through the SSRF guard."""
        if url.startswith("data:"):
            return self.data_url_bytes(url)
        try:
            return await asyncio.to_thread(fetch_url, url, self.cfg.fetch)
        except FetchError as e:
            raise ApiError(400, f"image_url refused: {e}") from None

    def data_url_bytes(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URLs must be base64-encoded")
        if len(payload) * 3 // 4 > self.cfg.max_image_bytes:
            raise ApiError(413, f"image is over the limit of {self.cfg.max_image_bytes:,} bytes")
        try:
            return pybase64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data URL is not valid base64") from None


def parse_chat(body: dict, limit: int) -> tuple[str, list[str], dict]:
    """(question text, image URLs, sampling params) of the last user message, validated.

    Every message is checked, not only the one the model reads, so both backends refuse the same
    requests: the local one answers the last user message alone, the upstream gets them all."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"'messages'[{i}] must be an object")
        if not isinstance(m.get("role"), str):
            raise ApiError(400, f"'messages'[{i}].role must be a string")
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ApiError(400, "'messages' has no user message")
    texts, images = [], []
    for i, m in enumerate(msgs):
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        elif content is None and i != last_user:
            parts = []  # e.g. an assistant turn that only called a tool
        else:
            raise ApiError(400, f"'messages'[{i}].content must be a string or a list of parts")
        for part in parts:
            if not isinstance(part, dict):
                raise ApiError(400, "message content parts must be objects")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"'messages'[{i}]: a text part's 'text' must be a string")
                if i == last_user:
                    texts.append(part["text"])
            elif kind == "image_url":
                # The local model sees one image, the last user message's; an earlier one would be
                # silently dropped there (and vLLM would see what is never logged): refused on both.
                if i != last_user:
                    raise ApiError(400, "only the last user message may carry an image")
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str):
                    raise ApiError(400, "image_url part needs a url")
                images.append(url)
            else:
                raise ApiError(400, f"unsupported content part type {kind!r}")
    if len(images) > 1:
        raise ApiError(400, "at most one image per request is supported")
    question = " ".join(t for t in texts if t).strip()
    if not question:
        raise ApiError(400, "the user message has no text")
    if len(question) > MAX_QUESTION_CHARS:
        # The model's own limit (vloop.vlm.model.check_question): checked here so the request is
        # refused alone instead of failing in the engine, inside a batch of other users' requests.
        raise ApiError(400, f"the question is {len(question):,} characters; at most {MAX_QUESTION_CHARS:,} "
                            "are allowed")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
    temperature = body.get("temperature", 0.0)
    top = body.get("top_logprobs", 0) or 0
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise ApiError(400, f"max_tokens must be an integer between 1 and {limit}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ApiError(400, "temperature must be between 0 and 2")
    if not isinstance(top, int) or not 0 <= top <= 20:
        raise ApiError(400, "top_logprobs must be an integer between 0 and 20")
    if top and not body.get("logprobs"):
        raise ApiError(400, "top_logprobs requires logprobs: true")
    return question, images, {"max_tokens": max_tokens, "temperature": float(temperature),
                              "logprobs": bool(body.get("logprobs")), "top_logprobs": top}


def parse_metadata(body: dict) -> dict[str, str]:
    """The request's ``metadata`` (the app's ``session_id`` and ``category`` go into the record),
    validated up front with OpenAI's limits, so a bad value is refused before the model answers
    rather than failing the record afterwards. Null values count as absent."""
    meta = body.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ApiError(400, f"'metadata' must be an object of strings, got {type(meta).__name__}")
    if len(meta) > MAX_METADATA_PAIRS:
        raise ApiError(400, f"'metadata' has {len(meta)} keys; at most {MAX_METADATA_PAIRS} are allowed")
    out = {}
    for k, v in meta.items():
        if len(k) > MAX_METADATA_KEY_CHARS:
            raise ApiError(400, f"a 'metadata' key is {len(k):,} characters; at most {MAX_METADATA_KEY_CHARS} "
                                "are allowed")
        if v is None:
            continue
        if not isinstance(v, str):
            raise ApiError(400, f"'metadata.{k}' must be a string, got {type(v).__name__}")
        if len(v) > MAX_METADATA_VALUE_CHARS:
            raise ApiError(400, f"'metadata.{k}' is {len(v):,} characters; at most {MAX_METADATA_VALUE_CHARS} "
                                "are allowed")
        out[k] = v
    return out


def parse_bad_words(body: dict) -> tuple[str, ...]:
    """The request's own ``bad_words`` (vLLM's sampling parameter: phrases the answer must not
    contain), validated and with whitespace collapsed as the lake's policy stores phrases."""
    words = body.get("bad_words")
    if words is None:
        return ()
    if not isinstance(words, list):
        raise ApiError(400, "'bad_words' must be a list of strings")
    if len(words) > MAX_BAD_WORDS:
        raise ApiError(400, f"'bad_words' has {len(words)} phrases; at most {MAX_BAD_WORDS} are allowed")
    out = []
    for i, w in enumerate(words):
        if not isinstance(w, str):
            raise ApiError(400, f"'bad_words'[{i}] must be a string, got {type(w).__name__}")
        w = " ".join(w.split())
        if not w:
            raise ApiError(400, f"'bad_words'[{i}] is empty")
        if len(w) > MAX_PHRASE_CHARS:
            raise ApiError(400, f"'bad_words'[{i}] is {len(w)} characters; at most {MAX_PHRASE_CHARS} are allowed")
        out.append(w)
    return tuple(out)


def parse_options(body: dict) -> dict:
    """The request's ``vloop`` object (gateway options), validated; unknown keys are refused so a
    typo does not silently do nothing."""
    opts = body.get("vloop")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'vloop' must be an object")
    for k, v in opts.items():
        if k not in GATEWAY_OPTIONS:
            raise ApiError(400, f"unknown 'vloop' option {k!r}; known: {', '.join(GATEWAY_OPTIONS)}")
        if not isinstance(v, GATEWAY_OPTIONS[k]):
            raise ApiError(400, f"'vloop.{k}' must be a {GATEWAY_OPTIONS[k].__name__}")
    return opts


def image_quality(data: bytes) -> dict | None:
    """``vloop.image_quality`` of a response (flags and advice for the app); None when the
    check itself fails, which must never fail the answer."""
    from vloop.curate.imagequality import quick_summary

    try:
        return quick_summary(data)
    except Exception as e:  # noqa: BLE001 - a side result; the answer goes out regardless
        log.warning("image quality check failed: %r", e)
        return None


def upstream_messages(messages: list, stored, data_url: str | None = None) -> list:
    """The messages as the upstream server gets them: the image part of the last user message
    carries the logged image as a data URL (``data_url`` when the caller has it already: the
    user's own, when stripping changed nothing), so the upstream never fetches a user's URL (the
    gateway's SSRF-guarded fetch stays the only one) and answers from exactly the logged pixels.
    Images elsewhere in the conversation, and any part type but text and image_url, are refused."""
    last_user = max(i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, "every message must be an object")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    if i != last_user:
                        raise ApiError(400, "only the last user message may carry an image")
                    url = data_url or f"data:{stored.content_type};base64,{pybase64.b64encode_as_string(stored.data)}"
                    part = {"type": "image_url", "image_url": {"url": url}}
                elif kind != "text":
                    raise ApiError(400, f"unsupported content part type {kind!r}")
                parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out


class Turn:
    """One chat request on its way to the interaction log: logged exactly once, whichever way it
    ends (answered, failed, or for a stream, the client gone midway)."""

    def __init__(self, gw: Gateway, *, request_id: str, t0: float, now: dt.datetime, user_key: str | None,
                 meta: dict[str, str], question: str, stored, base: str, adapter: str | None, arm: str,
                 opted_out: bool, app: str | None = None):
        self.gw, self.request_id, self.t0, self.now, self.user_key = gw, request_id, t0, now, user_key
        self.app = app
        # Given with every answer, logged or not, so an app never has to tell them apart; feedback
        # about an unlogged answer is then accepted and dropped (its id says so).
        self.feedback_token = gw.tokens.issue(request_id, user_key)
        self.meta = meta  # validated by parse_metadata
        self.question, self.stored, self.base, self.adapter, self.arm = question, stored, base, adapter, arm
        self.opted_out = opted_out
        self.created = int(time.time())
        self.logged = False
        self.image_quality = None  # a task computing vloop.image_quality, for image requests
        # The image being written to the spool (Spool.stage_image in a thread) while the model answers.
        self.image_staging: asyncio.Future | None = None
        if stored is not None and not opted_out:
            self.image_staging = asyncio.ensure_future(
                asyncio.to_thread(gw.spool.stage_image, image_key(stored.sha256, stored.ext), stored.data))

    def extras(self, confidence: float | None) -> dict:
        return {"arm": self.arm, "confidence": confidence, "logged": not self.opted_out,
                "feedback_token": self.feedback_token}

    async def final_extras(self, confidence: float | None) -> dict:
        """The response's ``vloop`` fields; an image request's also carry its image quality
        (computed in a thread while the model answered, so usually ready by now)."""
        out = self.extras(confidence)
        if self.image_quality is not None:
            out["image_quality"] = await self.image_quality
        return out

    def log(self, status: str, text: str | None, lps: list[float] | None) -> float | None:
        """Spool the interaction (unless opted out) and count it; returns the confidence.
        Failed answers are logged too, with status "error", so the rollout's error-rate
        guardrail sees them."""
        conf = Confidence.from_logprobs(lps).geo_mean_prob if lps else None
        if self.logged:
            return conf
        self.logged = True
        latency_ms = (time.perf_counter() - self.t0) * 1000
        gw, m = self.gw, self.gw.metrics
        if status == "ok":
            m.inc("vloop_requests_total", "answered chat requests", arm=self.arm,
                  logged=str(not self.opted_out).lower())
            m.observe_latency(latency_ms / 1000, arm=self.arm)
        elif status == "disconnected":
            m.inc("vloop_requests_disconnected_total", "streamed chat requests the client left midway", arm=self.arm)
        if self.opted_out:
            return conf
        q_clean, n_q = redact(self.question)
        a_clean, n_a = redact(text) if text is not None else (None, 0)
        stored = self.stored
        record = {
            # No user id: logged under one marker key, in the "unassigned" arm.
            "request_id": self.request_id, "ts": self.now,
            "user_key": self.user_key or hmac_user_key("", gw.cfg.user_key_secret),
            "session_id": self.meta.get("session_id"), "category": self.meta.get("category"),
            "image_sha256": stored.sha256 if stored else None,
            "image_key": image_key(stored.sha256, stored.ext) if stored else None,
            "image_w": stored.width if stored else None, "image_h": stored.height if stored else None,
            "question": q_clean, "answer": a_clean, "token_logprobs": lps, "confidence": conf,
            "latency_ms": latency_ms, "base_model": self.base, "adapter": self.adapter, "arm": self.arm,
            "status": status, "redactions": n_q + n_a, "app": self.app,
        }
        row = INTERACTION.to_row(record)
        if stored:  # the image before the record that names it
            gw.spool.commit_image(record["image_key"], self.staged_image())
        gw.spool.append("interactions", row)
        return conf

    def staged_image(self):
        """The staged copy of the request's image; written now if staging has not finished (its
        copy is then dropped when it does)."""
        f = self.image_staging
        if f is not None and f.done() and not f.cancelled() and f.exception() is None:
            return f.result()
        if f is not None:
            f.add_done_callback(self._discard_staged)
        return self.gw.spool.stage_image(image_key(self.stored.sha256, self.stored.ext), self.stored.data)

    def _discard_staged(self, f: asyncio.Future) -> None:
        if not f.cancelled() and f.exception() is None:
            self.gw.spool.discard_image(f.result())

    def not_logged(self) -> None:
        """The request ends without a record: its staged image goes too."""
        self.logged = True
        if self.image_staging is not None:  # (a finished future runs the callback at once too)
            self.image_staging.add_done_callback(self._discard_staged)

    def engine_failed(self, e: Exception) -> None:
        """The request ends with ``e``: logged as an error when the model failed (not when the
        request was refused, e.g. an unknown adapter)."""
        if not isinstance(e, EngineError) or e.status >= 500:
            self.gw.metrics.inc("vloop_requests_failed_total", "chat requests the model failed to answer",
                                arm=self.arm)
            self.log("error", None, None)
        if isinstance(e, EngineError) and e.status == 404 and self.adapter is None and not self.gw.local:
            self.gw.engine.forget_base()  # the upstream may have restarted under another name
        if not self.logged:
            self.not_logged()


def create_app(cfg: ServeConfig) -> FastAPI:
    gw = Gateway(cfg)
    app = FastAPI(title="vloop serving", version="0.1.0")
    app.state.gateway = gw
    m = gw.metrics
    if cfg.cors_origins:
        # Only the configured origins: a page elsewhere cannot read answers with a user's cookies
        # or keys (there are none to ride on, but the allow-list keeps it that way).
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-User-Id", FEEDBACK_TOKEN_HEADER],
                           expose_headers=["X-Request-Id", FEEDBACK_TOKEN_HEADER], max_age=600)

    @app.on_event("startup")
    async def _startup():
        if gw.local is None:
            try:  # learn the upstream's base model id now; requests ask again while it is down
                await gw.base_id()
            except EngineError as e:
                log.warning("could not ask the upstream for its base model yet: %s", e.message)
        if gw.decoding is not None:  # banned phrases apply from the first request on
            await gw.decoding_policy()
        if gw.lake is not None:  # opt-outs and erasures apply from the first request on
            try:
                await asyncio.to_thread(gw.sync_opt_outs)
            except Exception as e:
                log.warning("could not read the lake's opt-outs yet: %s", e)
            # Every few seconds after, at the pace the registry is followed.
            app.state.opt_out_sync = asyncio.create_task(
                gw.sync_opt_outs_forever(cfg.reconcile_interval_s if cfg.reconcile_interval_s > 0 else 5.0))
        if gw.registry is not None and cfg.reconcile_interval_s > 0:
            try:  # serve what the registry says from the first request on (health waits for it)
                await gw.reconcile()
            except Exception as e:
                log.warning("first reconciliation with the registry failed (retrying in the background): %s", e)
            app.state.reconciler = asyncio.create_task(gw.reconcile_forever())

    @app.on_event("shutdown")
    async def _shutdown():
        for name in ("reconciler", "opt_out_sync"):
            task = getattr(app.state, name, None)
            if task is not None:
                task.cancel()
        if gw.local is None:
            await gw.engine.aclose()
        gw.close()

    def count_refused(request, status: int) -> None:
        # Chat requests refused as bad input: counted apart, never against an arm's error rate.
        if status < 500 and request.url.path == "/v1/chat/completions":
            m.inc("vloop_requests_refused_total", "chat requests refused as bad input (4xx)", status=str(status))

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        count_refused(request, e.status)
        return _error(e.status, e.message, e.type)

    @app.exception_handler(EngineError)
    async def _engine_error(request, e: EngineError):
        count_refused(request, e.status)
        return _error(e.status, e.message, "invalid_request_error" if e.status < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        # A bug, not the client's doing: an OpenAI-style 500 error body (Starlette re-raises the
        # exception after this, so its traceback still reaches the server log, not the client).
        return _error(500, f"internal error ({type(e).__name__}); see the server log", "server_error")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_request_bytes:
            raise ApiError(413, f"request body is over the limit of {cfg.max_request_bytes:,} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_request_bytes:
                raise ApiError(413, f"request body is over the limit of {cfg.max_request_bytes:,} bytes")
        try:
            body = msgspec.json.decode(raw)  # ~5x the standard library's speed on a 200 KB photo
        except msgspec.DecodeError:
            raise ApiError(400, "request body is not valid JSON") from None
        except UnicodeDecodeError:  # invalid UTF-8 inside a string (msgspec raises this, not DecodeError)
            raise ApiError(400, "request body is not valid UTF-8") from None
        except RecursionError:  # e.g. 100,000 nested lists: refused, never a 500
            raise ApiError(400, "request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "base_model": gw.base_name, "spool_segments": gw.spool.depth(),
                "routes": gw.routes.routes.__dict__,
                "decoding_policy": (await gw.decoding_policy()).version}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(m.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/sdk/vloop-feedback.js")
    async def feedback_sdk():
        return FileResponse(STATIC / "vloop-feedback.js", media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=300"})

    if cfg.playground:  # off unless asked: it is a page anyone who reaches the gateway can use
        @app.get("/playground")
        async def playground():
            return HTMLResponse((STATIC / "playground.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        data = gw.local.models() if gw.local else await gw.engine.models()
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        gw.check_admin(request)
        body = await read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ApiError(400, "need 'lora_name' and 'lora_path' strings")
        t0 = time.perf_counter()
        await gw.load(name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully "
                                 f"({(time.perf_counter() - t0) * 1000:.0f} ms).")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        gw.check_admin(request)
        body = await read_json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "need a 'lora_name' string")
        r = gw.routes.routes
        if name in (r.champion, r.canary):
            raise ApiError(409, f"adapter {name!r} is routed to ({'champion' if name == r.champion else 'canary'}); "
                                "change the routes first")
        await gw.unload(name)
        gw.reconciled.discard(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/admin/routes")
    async def get_routes(request: Request):
        gw.check_admin(request)
        return gw.routes.routes.__dict__

    @app.put("/admin/routes")
    async def put_routes(request: Request):
        gw.check_admin(request)
        body = await read_json(request)
        try:
            routes = Routes(**body).validate(gw.loaded_adapters())
        except TypeError as e:
            raise ApiError(400, f"unknown route field: {e}") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if "salt" in body:
            raise ApiError(400, "the salt belongs to an experiment (vloop.release.canary.start); it cannot be set here")
        scope = "this replica"
        if gw.registry is not None and all(n is None or "@" in n for n in (routes.champion, routes.canary)):
            # Registry versions: write the desired state every replica follows, not just ours.
            from vloop.learn.registry import RegistryConflict, RegistryError

            async with gw.reconcile_lock:
                head = await asyncio.to_thread(gw.registry.serving_state)
                changes = {"champion": routes.champion, "canary": routes.canary,
                           "canary_share": routes.canary_share, "holdout_share": routes.holdout_share}
                if head.experiment and any(changes[k] != getattr(head, k) for k in ("champion", "canary", "canary_share")):
                    # A hand-made change of the split ends the experiment: its figures would mix two splits.
                    changes["experiment"] = None
                try:
                    state = await asyncio.to_thread(
                        gw.registry.update_serving, changes, actor="admin api", reason="PUT /admin/routes",
                        expected_seq=head.seq)
                except RegistryConflict as e:
                    raise ApiError(409, str(e)) from None
                except RegistryError as e:
                    raise ApiError(400, str(e)) from None
                gw.applied_seq, scope = state.seq, "all replicas"
                routes = Routes(**{**routes.__dict__, "salt": (state.experiment or {}).get("salt") or Routes.salt})
        gw.routes.set(routes)
        log.info("routes changed to %s (%s)", routes, scope)
        return {**routes.__dict__, "scope": scope}

    @app.post("/admin/reconcile")
    async def reconcile_now(request: Request):
        """Apply the registry's serving state now instead of at the next interval (a deploy
        calls this to learn at once whether this replica can load the new adapter)."""
        gw.check_admin(request)
        if gw.registry is None:
            raise ApiError(400, "this server has no lake, so no registry to follow")
        try:
            changed = await gw.reconcile()
        except EngineError as e:
            raise ApiError(e.status if e.status < 500 else 502, f"could not apply the serving state: {e.message}") from None
        except Exception as e:
            raise ApiError(502, f"could not apply the serving state: {e}", "server_error") from None
        return {"applied_seq": gw.applied_seq, "changed": changed, "routes": gw.routes.routes.__dict__}

    @app.post("/admin/opt-out")
    async def opt_out(request: Request):
        gw.check_admin(request)
        body = await read_json(request)
        key = gw.user_key(body, request)
        if key is None:
            raise ApiError(400, "need 'user': the user id to opt out")
        gw.opted_out.add(key)
        gw.opted_out_pending.add(key)
        gw.opt_out_path.write_text(json.dumps(sorted(gw.opted_out)))
        if gw.lake is not None:  # the daily DAG and the dataset builder exclude these users
            from vloop.privacy import record_opt_out

            await asyncio.to_thread(record_opt_out, gw.lake, key)
        return {"user_key": key, "opted_out": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        app_name = gw.check_app(request)  # before the body is read: an unknown caller costs nothing
        body = await read_json(request)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false")
        stream_options = body.get("stream_options")
        if stream_options is not None and (not stream or not isinstance(stream_options, dict)):
            raise ApiError(400, "'stream_options' is an object and only allowed with stream: true")
        include_usage = bool((stream_options or {}).get("include_usage"))
        question, image_urls, params = parse_chat(body, cfg.max_tokens_limit)
        request_bad_words = parse_bad_words(body)
        options = parse_options(body)
        meta = parse_metadata(body)
        ukey = gw.user_key(body, request)
        now = gw.now(request)
        opted_out = request.headers.get("x-vloop-opt-out") == "1" or ukey in gw.opted_out
        routes = gw.routes.routes
        model = body.get("model") or ROUTED_ALIAS
        if not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string, got {type(model).__name__}")
        base = await gw.base_id()
        if model == ROUTED_ALIAS:  # the gateway picks the arm by the user's sticky bucket
            arm, adapter = routes.arm_for(ukey)
        else:  # an explicit model: the base, or an adapter by name
            adapter = None if gw.is_base(model) else model
            arm = routes.arm_of_model(adapter) if ukey is not None else "unassigned"
            if gw.local is not None and adapter is not None and adapter not in gw.local.adapters:
                # Refused before its photo is staged (the engine checks again on submission).
                raise EngineError(404, f"model {adapter!r} does not exist; see GET /v1/models")

        image = stored = quality = data_url = None
        if image_urls:
            data = await gw.image_bytes(image_urls[0])
            try:  # no decode: metadata is cut out of the file (vloop.store.images), ~0.15 ms for a photo
                stored = normalise_image(data, max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels)
                # The model sees exactly the pixels that are logged, so a later re-scoring from the
                # lake scores what was served; only the local backend decodes here (vLLM does its own).
                if gw.local is not None:
                    image = (await asyncio.to_thread(open_image, stored.data, max_bytes=cfg.max_image_bytes,
                                                     max_pixels=cfg.max_image_pixels)).convert("RGB")
            except ImageTooLarge as e:
                raise ApiError(413, str(e)) from None
            except ImageError as e:
                raise ApiError(400, f"image: {e}") from None
            if stored.data is data and image_urls[0].startswith(f"data:{stored.content_type};base64,"):
                data_url = image_urls[0]  # nothing to strip: forward the user's own data URL
            if options.get("image_quality"):  # in a thread alongside generation
                quality = asyncio.ensure_future(asyncio.to_thread(image_quality, stored.data))

        # The lake's banned phrases and the request's own, with the policy's exceptions (不可能).
        policy = await gw.decoding_policy()
        bad_words = tuple(sorted(set(policy.banned) | set(request_bad_words)))

        # An unlogged answer's id says so, so feedback about it is not logged by any replica.
        request_id = f"{UNLOGGED_PREFIX if opted_out else 'chatcmpl-'}{uuid.uuid4().hex}"
        served_model = adapter or base
        if gw.local is None:
            upstream_body = {**{k: v for k, v in body.items() if k not in GATEWAY_ONLY_FIELDS},
                             "messages": upstream_messages(body["messages"], stored, data_url),
                             "model": served_model, "logprobs": True,
                             "top_logprobs": params["top_logprobs"] or None,
                             # The gateway's validated settings, so both backends decode alike
                             # (vLLM would otherwise sample at the model's default temperature).
                             "max_tokens": params["max_tokens"], "temperature": params["temperature"]}
            upstream_body.pop("max_completion_tokens", None)
            # vLLM enforces the merged list as its own bad_words (it knows no exceptions).
            upstream_body.pop("bad_words", None)
            if bad_words:
                upstream_body["bad_words"] = list(bad_words)

        # Past every check of the request: from here on it ends logged, whatever happens.
        turn = Turn(gw, request_id=request_id, t0=t0, now=now, user_key=ukey, meta=meta,
                    question=question, stored=stored, base=base, adapter=adapter, arm=arm, opted_out=opted_out,
                    app=app_name)
        turn.image_quality = quality
        headers = {"X-Request-Id": turn.request_id, FEEDBACK_TOKEN_HEADER: turn.feedback_token}
        if stream:
            if gw.local is not None:
                try:
                    fut = gw.local.submit(GenRequest(image, question, adapter, params["max_tokens"],
                                                     params["temperature"], params["top_logprobs"],
                                                     bad_words=bad_words, exceptions=policy.exceptions))
                except EngineError as e:  # refused on submission: the staged image goes too
                    turn.engine_failed(e)
                    raise
                events = local_stream_events(gw.local, fut)
            else:
                upstream_body["stream_options"] = {"include_usage": True}
                try:
                    resp = await gw.engine.open_stream(upstream_body)
                except EngineError as e:
                    turn.engine_failed(e)
                    raise
                events = upstream_stream_events(gw.engine, resp)
            return SSEResponse(sse_stream(turn, events, served_model, params["logprobs"], include_usage),
                               headers={**headers, "Cache-Control": "no-cache"})

        try:
            if gw.local is not None:
                fut = gw.local.submit(GenRequest(image, question, adapter, params["max_tokens"],
                                                 params["temperature"], params["top_logprobs"],
                                                 bad_words=bad_words, exceptions=policy.exceptions))
                result = await asyncio.wrap_future(fut)
                text, lps, tops, tokens = result.text, result.token_logprobs, result.top_logprobs, result.tokens
                usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
                finish = result.finish_reason
            else:
                resp = await gw.engine.chat(upstream_body)
                choice = resp["choices"][0]
                text = choice["message"]["content"] or ""
                content = (choice.get("logprobs") or {}).get("content") or []
                if finish_ends_with_stop_token(choice.get("finish_reason"), text, content and content[-1]["token"]):
                    content = content[:-1]
                tokens = [c["token"] for c in content]
                lps = [c["logprob"] for c in content]
                tops = [[(t["token"], t["logprob"]) for t in c.get("top_logprobs") or []] for c in content]
                up = resp.get("usage") or {}
                usage = {"prompt_tokens": up.get("prompt_tokens", 0),
                         "completion_tokens": up.get("completion_tokens", len(lps))}
                finish = choice.get("finish_reason") or "stop"
        except Exception as e:
            turn.engine_failed(e)
            raise
        conf = turn.log("ok", text, lps)

        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        if params["logprobs"]:
            choice["logprobs"] = {"content": [
                logprob_entry(t, lp, top) for t, lp, top in zip(tokens, lps, tops or [[] for _ in tokens])]}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        out = {"id": turn.request_id, "object": "chat.completion", "created": turn.created,
               "model": served_model, "choices": [choice], "usage": usage, "vloop": await turn.final_extras(conf)}
        return JSONResponse(out, headers=headers)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = await read_json(request)  # read first: a beacon's API key comes in the body
        gw.check_app(request, body)
        allowed = {"request_id", "type", "edited_text", "dwell_ms", "rating", "user", "event_id",
                   "feedback_token", "api_key"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        ukey = gw.user_key(body, request)
        rid = body.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise ApiError(400, "need 'request_id': the answer's id")
        # Only whoever was given the answer may react to it (forged events could promote a bad
        # canary or poison training data): its token, from the body (sendBeacon) or the header.
        try:
            gw.tokens.verify(body.get("feedback_token") or request.headers.get(FEEDBACK_TOKEN_HEADER), rid, ukey)
        except TokenError as e:
            m.inc("vloop_feedback_refused_total", "feedback events refused, by reason", reason=e.reason)
            raise ApiError(e.status, e.message,
                           "authentication_error" if e.status == 401 else "permission_error") from None
        client_id = body.get("event_id")
        if client_id is None:
            event_id = uuid.uuid4().hex
        elif isinstance(client_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", client_id):
            # Scoped to the answer, so one client's ids can never collide with another answer's
            # events in the lake; the same (answer, id) is the same event, however often sent.
            event_id = hashlib.sha256(f"{rid}/{client_id}".encode()).hexdigest()[:32]
        else:
            raise ApiError(400, "'event_id' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
        # Feedback about a request that was not logged (its user opted out) is not logged either:
        # its id says so (whichever replica answered it), or the optional "user" is opted out.
        opted_out = (request.headers.get("x-vloop-opt-out") == "1" or rid.startswith(UNLOGGED_PREFIX)
                     or (ukey is not None and ukey in gw.opted_out))
        edited, n = redact(body.get("edited_text"))
        event = {"event_id": event_id, "ts": gw.now(request),
                 **{k: v for k, v in body.items() if k not in ("user", "feedback_token", "api_key")},
                 "event_id": event_id, "edited_text": edited}
        try:
            row = FEEDBACK.to_row(event)
        except RecordError as e:
            raise ApiError(400, str(e)) from None
        fresh = gw.take_feedback(rid, event_id)  # 429 past the bound; False for a retry
        logged = not opted_out
        if fresh and logged:
            gw.spool.append("feedback", row)
        if fresh:
            m.inc("vloop_feedback_total", "feedback events received", type=row["type"])
        else:
            m.inc("vloop_feedback_duplicates_total", "feedback events sent again (same event_id), not logged twice")
        return JSONResponse({"event_id": row["event_id"], "status": "accepted" if fresh else "duplicate",
                             "logged": logged}, status_code=202)

    return app
