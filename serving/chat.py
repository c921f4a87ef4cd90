"""The model routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A chat request goes intake (serving.intake: validated, its caller and image read) → arm
(serving.models / serving.routing) → the model: the local engine, or the upstream server with
the body it is sent (:func:`upstream_request`: the gateway's validated sampling settings, the
logged image as a data URL, the merged ``bad_words``) → a logged answer (serving.records.Turn),
whole (:class:`Answer`, :func:`completion`) or streamed (serving.streaming).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import pybase64
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.auth import FEEDBACK_TOKEN_HEADER
from serving.engine import GenRequest, GenResult
from serving.errors import ApiError
from serving.gateway import Gateway
from serving.intake import (ChatRequest, RequestImage, calling_app, image_quality, opted_out_by_header, read_image,
                            read_json, record_time, requested_model, user_key)
from serving.records import UNLOGGED_PREFIX, Turn
from serving.streaming import SSEResponse, finish_ends_with_stop_token, logprob_entry, open_events, sse_stream

# Request fields the gateway consumes and does not pass to an upstream server: the raw user id
# (only its HMAC is kept), the gateway's metadata and options, and the streaming switches it sets itself.
GATEWAY_ONLY_FIELDS = frozenset({"user", "metadata", "vloop", "stream", "stream_options"})


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


def upstream_request(req: ChatRequest, image: RequestImage | None, model: str, bad_words: tuple[str, ...]) -> dict:
    """The body the upstream server is sent for ``req``, answered by ``model``."""
    s = req.sampling
    body = {**{k: v for k, v in req.body.items() if k not in GATEWAY_ONLY_FIELDS},
            "messages": upstream_messages(req.body["messages"], image.stored if image else None,
                                          image.data_url if image else None),
            "model": model, "logprobs": True,
            "top_logprobs": s.top_logprobs or None,
            # The gateway's validated settings, so both backends decode alike
            # (vLLM would otherwise sample at the model's default temperature).
            "max_tokens": s.max_tokens, "temperature": s.temperature}
    body.pop("max_completion_tokens", None)
    # vLLM enforces the merged list as its own bad_words (it knows no exceptions).
    body.pop("bad_words", None)
    if bad_words:
        body["bad_words"] = list(bad_words)
    return body


@dataclass
class Answer:
    """A whole answer, from either backend: the answer's own tokens (no closing stop token)."""

    text: str
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[str, float]]] | None
    usage: dict  # prompt_tokens, completion_tokens
    finish_reason: str

    @classmethod
    def from_local(cls, result: GenResult) -> "Answer":
        return cls(result.text, result.tokens, result.token_logprobs, result.top_logprobs,
                   {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                   result.finish_reason)

    @classmethod
    def from_upstream(cls, resp: dict) -> "Answer":
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
        return cls(text, tokens, lps, tops, usage, choice.get("finish_reason") or "stop")


def completion(turn: Turn, model: str, answer: Answer, want_logprobs: bool, extras: dict) -> dict:
    """The ``chat.completion`` object of a whole answer; ``extras`` its ``vloop`` fields."""
    message = {"role": "assistant", "content": answer.text}
    choice = {"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}
    if want_logprobs:
        tops = answer.top_logprobs or [[] for _ in answer.tokens]
        choice["logprobs"] = {"content": [
            logprob_entry(t, lp, top) for t, lp, top in zip(answer.tokens, answer.token_logprobs, tops)]}
    usage = {**answer.usage, "total_tokens": answer.usage["prompt_tokens"] + answer.usage["completion_tokens"]}
    return {"id": turn.request_id, "object": "chat.completion", "created": turn.created,
            "model": model, "choices": [choice], "usage": usage, "vloop": extras}


def chat_router(gw: Gateway) -> APIRouter:
    cfg, models = gw.cfg, gw.models
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": await models.available_models()}

    @router.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        app_name = calling_app(request, cfg.api_keys, gw.metrics)  # before the body: an unknown caller costs nothing
        body = await read_json(request, cfg.max_request_bytes)
        req = ChatRequest.parse(body, cfg.max_tokens_limit)
        ukey = user_key(body, request, cfg.user_key_secret)
        now = record_time(request, cfg.simulation)
        opted_out = opted_out_by_header(request) or ukey in gw.opt_outs
        model = requested_model(body)
        base = await models.base_id()
        arm, adapter = models.choose_arm(model, ukey)

        image = quality = None
        if req.image_urls:
            image = await read_image(req.image_urls[0], fetch=cfg.fetch, max_bytes=cfg.max_image_bytes,
                                     max_pixels=cfg.max_image_pixels, decode=gw.local is not None)
            if req.options.get("image_quality"):  # in a thread alongside generation
                quality = asyncio.ensure_future(asyncio.to_thread(image_quality, image.stored.data))

        # The lake's banned phrases and the request's own, with the policy's exceptions (不可能).
        policy = await gw.decoding_policy()
        bad_words = tuple(sorted(set(policy.banned) | set(req.bad_words)))

        # An unlogged answer's id says so, so feedback about it is not logged by any replica.
        request_id = f"{UNLOGGED_PREFIX if opted_out else 'chatcmpl-'}{uuid.uuid4().hex}"
        served_model = adapter or base
        s = req.sampling
        gen = upstream_body = None
        if gw.local is not None:
            gen = GenRequest(image.decoded if image else None, req.question, adapter, s.max_tokens, s.temperature,
                             s.top_logprobs, bad_words=bad_words, exceptions=policy.exceptions)
        else:
            upstream_body = upstream_request(req, image, served_model, bad_words)

        # Past every check of the request: from here on it ends logged, whatever happens.
        turn = Turn(gw, request_id=request_id, t0=t0, now=now, user_key=ukey, meta=req.metadata,
                    question=req.question, stored=image.stored if image else None, base=base, adapter=adapter,
                    arm=arm, opted_out=opted_out, app=app_name)
        turn.image_quality = quality
        headers = {"X-Request-Id": turn.request_id, FEEDBACK_TOKEN_HEADER: turn.feedback_token}
        if req.stream:
            events = await open_events(turn, local=gw.local, request=gen, engine=gw.engine,
                                       upstream_body=upstream_body)
            return SSEResponse(sse_stream(turn, events, served_model, s.logprobs, req.include_usage),
                               headers={**headers, "Cache-Control": "no-cache"})

        try:
            if gw.local is not None:
                answer = Answer.from_local(await asyncio.wrap_future(gw.local.submit(gen)))
            else:
                answer = Answer.from_upstream(await gw.engine.chat(upstream_body))
        except Exception as e:
            turn.engine_failed(e)
            raise
        conf = turn.log("ok", answer.text, answer.token_logprobs)
        return JSONResponse(completion(turn, served_model, answer, s.logprobs, await turn.final_extras(conf)),
                            headers=headers)

    return router
