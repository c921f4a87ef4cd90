"""Streamed chat completions: server-sent events the way the OpenAI and vLLM servers send them.

One ``data: {chat.completion.chunk}`` event per piece of text (the first one carries only the
role, the last one only ``finish_reason``), then with ``stream_options.include_usage`` a chunk
with no choices and the token counts, then ``data: [DONE]``. Both backends feed the same writer,
:func:`sse_stream`, through a small event protocol (:class:`Delta`, :class:`Finish`), started by
:func:`open_events`:

* the local backend generates the whole answer in its batching worker, then its tokens are sent
  one by one (the first chunk goes out at once, so a client that leaves during generation is
  noticed; the text itself arrives when the batch is done);
* an upstream (vLLM) stream is read event by event and forwarded as it comes.

The interaction is logged exactly once: when the answer is complete (before the final chunk, so
feedback sent on seeing it finds its record), as ``error`` when generation fails midway (the
client then gets an error event), or as ``disconnected`` with the text sent so far when the
client goes away first.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
from starlette.responses import StreamingResponse

from serving.engine import EngineError


@dataclass
class Delta:
    text: str
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] = field(default_factory=list)  # (token, lp, top)


@dataclass
class Finish:
    reason: str  # "stop" or "length"
    usage: dict  # prompt_tokens, completion_tokens


def finish_ends_with_stop_token(finish_reason: str | None, text: str, last_token: str | None) -> bool:
    """Whether the last logprob entry is the closing stop token (vLLM reports ``<|im_end|>``'s
    logprob; its text is not in the answer). The gateway leaves it out, as the local engine does,
    so token_logprobs and confidence mean the same on both backends: the answer's own tokens."""
    return finish_reason == "stop" and bool(last_token) and not text.endswith(last_token)


def logprob_entry(token: str, logprob: float, top) -> dict:
    """One position of an OpenAI ``logprobs.content`` list."""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top or []]}


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its generator, even when the client leaves
    midway, so the generator's cleanup (logging the interaction, closing the upstream stream,
    which makes vLLM abort the generation) runs at once rather than whenever it is collected."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def local_stream_events(engine, fut):
    """Events of a request submitted to the local engine (``fut`` its future)."""
    result = await asyncio.wrap_future(fut)  # cancelling this cancels the request if still queued
    tops = result.top_logprobs or [[] for _ in result.tokens]
    for piece, token, lp, top in zip(engine.text_pieces(result), result.tokens, result.token_logprobs, tops):
        yield Delta(piece, [(token, lp, top)])
    yield Finish(result.finish_reason, {"prompt_tokens": result.prompt_tokens,
                                        "completion_tokens": result.completion_tokens})


async def upstream_stream_events(engine, resp):
    """Events of an upstream stream opened with ``UpstreamEngine.open_stream``; closes it."""
    finish, usage, n_tokens, sent = None, None, 0, ""
    try:
        async for event in engine.events(resp):
            if event.get("usage"):
                usage = event["usage"]  # the include_usage chunk (or continuous usage stats)
            for choice in event.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                content = (choice.get("logprobs") or {}).get("content") or []
                lps = [(c["token"], c["logprob"], [(t["token"], t["logprob"]) for t in c.get("top_logprobs") or []])
                       for c in content]
                text = (choice.get("delta") or {}).get("content") or ""
                sent += text
                if lps and finish_ends_with_stop_token(choice.get("finish_reason"), sent, lps[-1][0]):
                    lps = lps[:-1]
                n_tokens += len(lps)
                if text or lps:
                    yield Delta(text, lps)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        usage = usage or {}
        yield Finish(finish or "stop", {"prompt_tokens": usage.get("prompt_tokens", 0),
                                        "completion_tokens": usage.get("completion_tokens", n_tokens)})
    finally:
        with anyio.CancelScope(shield=True):
            await resp.aclose()


async def open_events(turn, *, local=None, request=None, engine=None, upstream_body: dict | None = None):
    """The events of a streamed answer, its generation started: ``request`` (a GenRequest)
    submitted to the ``local`` engine, or an upstream stream opened with ``upstream_body`` (asking
    for the usage chunk). A refusal on the way ends ``turn`` (its staged image goes) and is raised."""
    try:
        if local is not None:
            return local_stream_events(local, local.submit(request))
        resp = await engine.open_stream({**upstream_body, "stream_options": {"include_usage": True}})
    except EngineError as e:
        turn.engine_failed(e)
        raise
    return upstream_stream_events(engine, resp)


def _event(obj: dict) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


async def sse_stream(turn, events, model: str, want_logprobs: bool, include_usage: bool):
    """The server-sent events of one streamed answer; logs ``turn`` once, however it ends."""

    def chunk(choices: list, **extra) -> str:
        out = {"id": turn.request_id, "object": "chat.completion.chunk", "created": turn.created,
               "model": model, "choices": choices, **extra}
        if include_usage:
            out.setdefault("usage", None)  # as OpenAI: null on every chunk but the last
        return _event(out)

    def choice(delta: dict, logprobs=None, finish_reason=None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    text: list[str] = []
    lps: list[float] = []
    try:
        yield chunk([choice({"role": "assistant", "content": ""})])
        finish = None
        async with aclosing(events) as evs:
            async for ev in evs:
                if isinstance(ev, Finish):
                    finish = ev
                    continue
                text.append(ev.text)
                lps += [lp for _, lp, _ in ev.logprobs]
                logprobs = {"content": [logprob_entry(*x) for x in ev.logprobs]} if want_logprobs else None
                yield chunk([choice({"content": ev.text}, logprobs)])
        conf = turn.log("ok", "".join(text), lps)
        yield chunk([choice({}, None, finish.reason)], vloop=await turn.final_extras(conf))
        if include_usage:
            usage = {**finish.usage, "total_tokens": finish.usage["prompt_tokens"] + finish.usage["completion_tokens"]}
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    except Exception as e:  # the model failed midway: the status line has gone, so an error event
        turn.engine_failed(e)
        status = e.status if isinstance(e, EngineError) else 500
        message = e.message if isinstance(e, EngineError) else f"generation failed: {e}"
        yield _event({"error": {"message": message, "type": "server_error" if status >= 500 else
                                "invalid_request_error", "code": status}})
    finally:
        # Neither finished nor failed: the client went away (GeneratorExit or cancellation).
        if not turn.logged:
            turn.log("disconnected", "".join(text) or None, lps or None)
