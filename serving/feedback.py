"""The feedback route: ``POST /v1/feedback``, an app's reaction to an answer (accept, edit,
rating, dwell, ...), taken only from whoever was given the answer (its feedback token,
serving.auth), deduplicated by event id and spooled as a feedback record (serving.records)."""

from __future__ import annotations

import hashlib
import re
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.auth import FEEDBACK_TOKEN_HEADER, TokenError
from serving.errors import ApiError
from serving.gateway import Gateway
from serving.intake import calling_app, opted_out_by_header, read_json, record_time, user_key
from serving.records import UNLOGGED_PREFIX, feedback_row

FEEDBACK_FIELDS = frozenset({"request_id", "type", "edited_text", "dwell_ms", "rating", "user", "event_id",
                             "feedback_token", "api_key"})
CLIENT_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def event_id_of(request_id: str, client_id: object) -> str:
    """The event's id: a fresh one, or the client's scoped to the answer, so one client's ids can
    never collide with another answer's events in the lake; the same (answer, id) is the same
    event, however often sent."""
    if client_id is None:
        return uuid.uuid4().hex
    if isinstance(client_id, str) and CLIENT_EVENT_ID.fullmatch(client_id):
        return hashlib.sha256(f"{request_id}/{client_id}".encode()).hexdigest()[:32]
    raise ApiError(400, "'event_id' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")


def feedback_router(gw: Gateway) -> APIRouter:
    cfg, m = gw.cfg, gw.metrics
    router = APIRouter()

    @router.post("/v1/feedback")
    async def feedback(request: Request):
        body = await read_json(request, cfg.max_request_bytes)  # read first: a beacon's API key comes in the body
        calling_app(request, cfg.api_keys, m, body)
        unknown = sorted(set(body) - FEEDBACK_FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(FEEDBACK_FIELDS))}")
        ukey = user_key(body, request, cfg.user_key_secret)
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
        event_id = event_id_of(rid, body.get("event_id"))
        # Feedback about a request that was not logged (its user opted out) is not logged either:
        # its id says so (whichever replica answered it), or the optional "user" is opted out.
        opted_out = (opted_out_by_header(request) or rid.startswith(UNLOGGED_PREFIX)
                     or (ukey is not None and ukey in gw.opt_outs))
        row = feedback_row(body, event_id, record_time(request, cfg.simulation))
        logged = not opted_out
        fresh = gw.feedback.record(rid, event_id, row, logged=logged)  # 429 past the bound; False for a retry
        return JSONResponse({"event_id": row["event_id"], "status": "accepted" if fresh else "duplicate",
                             "logged": logged}, status_code=202)

    return router
