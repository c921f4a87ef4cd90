"""Request intake: everything between the bytes a client sends and a validated request.

* the JSON body, bounded (:func:`read_json`);
* who is calling: the app by its API key (:func:`calling_app`), the user as an HMAC
  (:func:`user_key`), and the record's timestamp (:func:`record_time`);
* a chat request, typed and validated up front (:class:`ChatRequest`, :class:`SamplingParams`:
  messages, sampling settings, ``bad_words``, ``metadata``, the ``vloop`` options), so every
  backend refuses the same requests with the same message before the model is asked;
* the request's image: fetched (a data URL decoded in place, an http(s) URL through the SSRF
  guard), its metadata stripped without a decode, decoded only for the local model
  (:func:`read_image`), and its optional quality summary (:func:`image_quality`).

Every refusal is an :class:`~serving.errors.ApiError` with the message the client sees.
"""

from __future__ import annotations

import asyncio
import binascii
import datetime as dt
import logging
from dataclasses import dataclass

import msgspec
import pybase64
from fastapi import Request

from serving.auth import ApiKeys
from serving.errors import ApiError
from serving.metrics import Metrics
from serving.routing import ROUTED_ALIAS
from vloop.capture.netguard import FetchError, FetchPolicy, fetch_url
from vloop.privacy import user_key as hmac_user_key
from vloop.store.images import ImageError, ImageTooLarge, NormalisedImage, normalise_image, open_image
from vloop.vlm.decoding import MAX_PHRASE_CHARS
from vloop.vlm.model import MAX_QUESTION_CHARS

log = logging.getLogger(__name__)
GATEWAY_OPTIONS = {"image_quality": bool}  # the request's "vloop" object: what an app may ask for
MAX_BAD_WORDS = 100  # a request's own bad_words; each at most vloop.vlm.decoding.MAX_PHRASE_CHARS
# A request's metadata, as OpenAI limits it: at most 16 pairs, keys up to 64 characters, string
# values up to 512 (session_id and category are stored with every record).
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


# -- the body and the caller ----------------------------------------------------------------------
async def read_json(request: Request, max_bytes: int) -> dict:
    """The request's JSON object, read at most ``max_bytes`` far (413 past it)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, f"request body is over the limit of {max_bytes:,} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise ApiError(413, f"request body is over the limit of {max_bytes:,} bytes")
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


def calling_app(request: Request, keys: ApiKeys, metrics: Metrics, body: dict | None = None) -> str | None:
    """The calling app's name, from its API key (``Authorization: Bearer``; feedback may
    also carry it as ``api_key`` in the body, as ``navigator.sendBeacon`` sets no headers).
    None when no keys are configured; 401 when they are and the key is missing or unknown."""
    if not keys:
        return None
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    if key is None and body is not None and isinstance(body.get("api_key"), str):
        key = body["api_key"]
    app = keys.app_for(key)
    if app is None:
        metrics.inc("vloop_auth_refused_total", "requests refused for a missing or unknown API key",
                    route=request.url.path)
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'" if not key else
                       "unknown API key", "authentication_error")
    return app


def user_key(body: dict, request: Request, secret: str) -> str | None:
    """The HMAC of the caller's user id (the OpenAI ``user`` field, or ``X-User-Id``); None when
    the request names no user."""
    uid = body.get("user") or request.headers.get("x-user-id")
    if uid is None:
        return None
    if not isinstance(uid, str):
        raise ApiError(400, "'user' must be a string")
    return hmac_user_key(uid, secret)


def record_time(request: Request, simulation: bool) -> dt.datetime:
    """The record's timestamp: the server's clock, or in simulation mode X-Vloop-Sim-Time."""
    sim = request.headers.get("x-vloop-sim-time")
    if sim and simulation:
        try:
            t = dt.datetime.fromisoformat(sim)
        except ValueError:
            raise ApiError(400, "X-Vloop-Sim-Time must be an ISO 8601 time") from None
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    return dt.datetime.now(dt.timezone.utc)


def opted_out_by_header(request: Request) -> bool:
    """The request asks not to be logged (``X-Vloop-Opt-Out: 1``)."""
    return request.headers.get("x-vloop-opt-out") == "1"


# -- a chat request ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """The sampling settings both backends decode with, validated."""

    max_tokens: int
    temperature: float
    logprobs: bool
    top_logprobs: int


@dataclass(frozen=True)
class ChatRequest:
    """A ``POST /v1/chat/completions`` body, validated: what the gateway reads from it. ``body``
    is the request as sent (an upstream server gets its messages and unknown fields)."""

    body: dict
    stream: bool
    include_usage: bool  # stream_options.include_usage
    question: str  # the last user message's text
    image_urls: list[str]  # at most one, the last user message's
    sampling: SamplingParams
    bad_words: tuple[str, ...]  # the request's own
    options: dict  # the "vloop" object
    metadata: dict[str, str]

    @classmethod
    def parse(cls, body: dict, max_tokens_limit: int) -> "ChatRequest":
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false")
        stream_options = body.get("stream_options")
        if stream_options is not None and (not stream or not isinstance(stream_options, dict)):
            raise ApiError(400, "'stream_options' is an object and only allowed with stream: true")
        question, image_urls, sampling = parse_chat(body, max_tokens_limit)
        return cls(body=body, stream=stream, include_usage=bool((stream_options or {}).get("include_usage")),
                   question=question, image_urls=image_urls, sampling=sampling,
                   bad_words=parse_bad_words(body), options=parse_options(body), metadata=parse_metadata(body))


def requested_model(body: dict) -> str:
    """The request's ``model``: the routed alias when absent (the gateway picks the arm)."""
    model = body.get("model") or ROUTED_ALIAS
    if not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {type(model).__name__}")
    return model


def parse_chat(body: dict, limit: int) -> tuple[str, list[str], SamplingParams]:
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
    return question, images, SamplingParams(max_tokens=max_tokens, temperature=float(temperature),
                                            logprobs=bool(body.get("logprobs")), top_logprobs=top)


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


# -- the request's image ------------------------------------------------------------------------------
@dataclass
class RequestImage:
    """A request's image as the gateway logs and serves it."""

    stored: NormalisedImage  # the bytes that are logged (metadata stripped) and what the model sees
    decoded: object | None  # the RGB PIL image, for the local model only (vLLM decodes its own)
    data_url: str | None  # the user's own data URL, when stripping changed nothing (forwarded as is)


async def image_bytes(url: str, fetch: FetchPolicy, max_bytes: int) -> bytes:
    """The bytes of a request's image: a data URL's decoded in place (microseconds), an http(s)
    URL fetched in a thread through the SSRF guard."""
    if url.startswith("data:"):
        return data_url_bytes(url, max_bytes)
    try:
        return await asyncio.to_thread(fetch_url, url, fetch)
    except FetchError as e:
        raise ApiError(400, f"image_url refused: {e}") from None


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ApiError(400, "image data URLs must be base64-encoded")
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, f"image is over the limit of {max_bytes:,} bytes")
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image data URL is not valid base64") from None


async def read_image(url: str, *, fetch: FetchPolicy, max_bytes: int, max_pixels: int,
                     decode: bool) -> RequestImage:
    """The request's image, fetched and normalised; ``decode`` for the local model, which is
    given exactly the logged pixels (so a later re-scoring from the lake scores what was served)."""
    data = await image_bytes(url, fetch, max_bytes)
    decoded = None
    try:  # no decode: metadata is cut out of the file (vloop.store.images), ~0.15 ms for a photo
        stored = normalise_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
        if decode:
            decoded = (await asyncio.to_thread(open_image, stored.data, max_bytes=max_bytes,
                                               max_pixels=max_pixels)).convert("RGB")
    except ImageTooLarge as e:
        raise ApiError(413, str(e)) from None
    except ImageError as e:
        raise ApiError(400, f"image: {e}") from None
    data_url = None
    if stored.data is data and url.startswith(f"data:{stored.content_type};base64,"):
        data_url = url  # nothing to strip: forward the user's own data URL
    return RequestImage(stored, decoded, data_url)


def image_quality(data: bytes) -> dict | None:
    """``vloop.image_quality`` of a response (flags and advice for the app); None when the
    check itself fails, which must never fail the answer."""
    from vloop.curate.imagequality import quick_summary

    try:
        return quick_summary(data)
    except Exception as e:  # noqa: BLE001 - a side result; the answer goes out regardless
        log.warning("image quality check failed: %r", e)
        return None
