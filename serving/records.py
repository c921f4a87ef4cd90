"""What the gateway writes to its spool: an interaction record per chat turn, a feedback record
per reaction, and the opt-outs that decide whether either is written.

* :class:`Turn`: one chat request on its way to the ``interactions`` stream (PII redacted, user
  id only as an HMAC, the image committed before the record that names it), logged exactly once
  however the request ends: ``ok``, ``error`` or, for a stream, ``disconnected``.
* :class:`FeedbackEvents`: feedback events to the ``feedback`` stream, each answer's event ids
  remembered so a retry is logged once and a flood is bounded (429); :func:`feedback_row`
  builds the record.
* :class:`OptOuts`: the users whose requests and feedback are never logged (this replica's
  file plus the lake's opt-outs and erasures, which every replica shares). An unlogged answer's
  id starts with :data:`UNLOGGED_PREFIX`, so no replica logs feedback about it.

The shipper (vloop.capture.spool) moves the spool to the lake; nothing here waits for it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from serving.engine import EngineError
from serving.errors import ApiError
from serving.metrics import Metrics
from vloop.capture.spool import Spool
from vloop.privacy import redact, user_key as hmac_user_key
from vloop.store.images import image_key
from vloop.store.schema import FEEDBACK, INTERACTION, RecordError
from vloop.vlm.model import Confidence

if TYPE_CHECKING:
    from serving.gateway import Gateway

log = logging.getLogger(__name__)
UNLOGGED_PREFIX = "chatcmpl-nolog-"  # the id of an answer that was not logged (opted out)
# Request ids whose feedback events this replica remembers (event ids for dedupe, the count for
# the per-answer bound); the oldest are forgotten first. In memory, per replica.
FEEDBACK_MEMORY = 50_000


class OptOuts:
    """The user keys never logged: this replica's own list (``opt_out.json`` in the state dir)
    and, with a lake, the lake's opt-outs and erased users, which every replica follows."""

    def __init__(self, path: Path, lake=None):
        self.path, self.lake = path, lake
        self.keys: set[str] = set(json.loads(path.read_text())) if path.is_file() else set()
        self.pending: set[str] = set()  # added here since the last sync with the lake

    def __contains__(self, user_key: str | None) -> bool:
        return user_key in self.keys

    async def add(self, user_key: str) -> None:
        """Opt a user out here at once, and in the lake, where the daily DAG and the dataset
        builder exclude them too."""
        self.keys.add(user_key)
        self.pending.add(user_key)
        self.path.write_text(json.dumps(sorted(self.keys)))
        if self.lake is not None:
            from vloop.privacy import record_opt_out

            await asyncio.to_thread(record_opt_out, self.lake, user_key)

    def sync(self) -> None:
        """The lake's opt-outs and erased users are the truth shared by every replica (`vloop
        privacy opt-out`, another replica's /admin/opt-out, an erasure): take them, so additions
        and removals reach this one and an erased user's new requests are not logged."""
        from vloop.privacy import excluded_users

        if self.lake is not None:
            self.keys = excluded_users(self.lake) | self.pending
            self.pending.clear()

    async def sync_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.sync)
            except Exception as e:
                log.warning("reading the lake's opt-outs failed: %s", e)


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
        self.meta = meta  # validated by serving.intake.parse_metadata
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
        if isinstance(e, EngineError) and e.status == 404 and self.adapter is None:
            self.gw.models.base_missing()  # the upstream may have restarted under another name
        if not self.logged:
            self.not_logged()


def feedback_row(body: dict, event_id: str, ts: dt.datetime) -> dict:
    """The feedback record of a validated ``POST /v1/feedback`` body: its edited text redacted,
    the caller's user id, token and API key left out (400 for a field the schema refuses)."""
    edited, _ = redact(body.get("edited_text"))
    event = {"event_id": event_id, "ts": ts,
             **{k: v for k, v in body.items() if k not in ("user", "feedback_token", "api_key")},
             "event_id": event_id, "edited_text": edited}
    try:
        return FEEDBACK.to_row(event)
    except RecordError as e:
        raise ApiError(400, str(e)) from None


class FeedbackEvents:
    """Feedback events on their way to the spool. Each answer's event ids are remembered (the
    newest :data:`FEEDBACK_MEMORY` answers, in memory, per replica): an event sent again is
    logged once, and an answer takes at most ``max_events``."""

    def __init__(self, spool: Spool, metrics: Metrics, max_events: int):
        self.spool, self.metrics, self.max_events = spool, metrics, max_events
        self.seen: OrderedDict[str, set[str]] = OrderedDict()  # request id -> event ids taken

    def take(self, request_id: str, event_id: str) -> bool:
        """Count one event against its answer's bound; False if this event id was taken already
        (a retry: answered as accepted, logged once). 429 past the bound."""
        seen = self.seen.get(request_id)
        if seen is None:
            seen = self.seen[request_id] = set()
            if len(self.seen) > FEEDBACK_MEMORY:
                self.seen.popitem(last=False)
        else:
            self.seen.move_to_end(request_id)
        if event_id in seen:
            return False
        if len(seen) >= self.max_events:
            self.metrics.inc("vloop_feedback_refused_total", "feedback events refused, by reason", reason="flood")
            raise ApiError(429, f"this answer has had {len(seen)} feedback events, the most one answer takes",
                           "rate_limit_error")
        seen.add(event_id)
        return True

    def record(self, request_id: str, event_id: str, row: dict, *, logged: bool) -> bool:
        """Take the event (429 past its answer's bound) and spool it unless ``logged`` is False
        (an opted-out user) or it was taken already; True when it is new."""
        fresh = self.take(request_id, event_id)
        if fresh and logged:
            self.spool.append("feedback", row)
        if fresh:
            self.metrics.inc("vloop_feedback_total", "feedback events received", type=row["type"])
        else:
            self.metrics.inc("vloop_feedback_duplicates_total", "feedback events sent again (same event_id), not logged twice")
        return fresh
