"""Streaming on the local backend, read by the official ``openai`` client, and honest usage.

A gateway subprocess serves the pretrained tiny Qwen3-VL; the upstream (vLLM) half of streaming
is in tests/test_vllm.py. Each streamed interaction must land in the lake exactly once.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import requests

from tests.test_serving import chat_body, data_url, lake_table, server, wait_for  # noqa: F401 (fixture)
from vloop.store.lake import open_lake
from vloop.store.schema import INTERACTION
from vloop.sim.synth import World


def client(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def messages(sample, with_image=True):
    parts = [{"type": "image_url", "image_url": {"url": data_url(sample.image)}}] if with_image else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": sample.question}]}]


def logged(srv, *request_ids) -> dict:
    """The gateway's interaction records by request id, once ``request_ids`` have been shipped."""
    lake = open_lake((srv.home / "lake").as_uri())

    def rows():
        got = {r["request_id"]: r for r in lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()}
        return set(request_ids) <= set(got) and got
    wait_for(rows, 30, "the records to be shipped")
    time.sleep(0.5)  # a second copy, if one were coming, would be shipped by now
    table = lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()
    ids = [r["request_id"] for r in table]
    assert len(ids) == len(set(ids)), "an interaction was logged twice"
    return {r["request_id"]: r for r in table}


def test_stream_matches_the_plain_answer_and_is_logged_once(server):
    c = client(server)
    s = World(21).sample(0, intents=("colour",))
    plain = c.chat.completions.create(model="vloop", user="ann", messages=messages(s), max_tokens=16,
                                      logprobs=True, top_logprobs=2)
    chunks = list(c.chat.completions.create(model="vloop", user="ann", messages=messages(s), max_tokens=16,
                                            logprobs=True, top_logprobs=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content and text
    streamed_lps = [lp for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for lp in ch.choices[0].logprobs.content]
    assert [x.logprob for x in streamed_lps] == pytest.approx([x.logprob for x in plain.choices[0].logprobs.content])
    assert all(len(x.top_logprobs) == 2 for x in streamed_lps)
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finals[0].model_extra["vloop"]["arm"] == "champion"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(ch.usage is None for ch in chunks[:-1])
    assert usage_chunk.usage.model_dump() == plain.usage.model_dump()
    # The closing stop token counts as generated, but has no logprob entry (it is not in the text).
    assert usage_chunk.usage.completion_tokens == len(streamed_lps) + (finals[0].choices[0].finish_reason == "stop")

    # Without include_usage no usage chunk; without logprobs none in the chunks.
    bare = list(c.chat.completions.create(model="vloop", user="ann", messages=messages(s), max_tokens=16,
                                          stream=True))
    assert all(ch.choices and ch.usage is None and ch.choices[0].logprobs is None for ch in bare)
    assert "".join(ch.choices[0].delta.content or "" for ch in bare) == text

    rows = logged(server, chunks[0].id, bare[0].id, plain.id)
    rec = rows[chunks[0].id]
    assert rec["status"] == "ok" and rec["answer"] == text and rec["arm"] == "champion"
    assert rec["token_logprobs"] == pytest.approx([x.logprob for x in streamed_lps], abs=1e-5)
    assert rec["confidence"] == pytest.approx(finals[0].model_extra["vloop"]["confidence"])
    assert bare[0].id in rows and plain.id in rows


def test_usage_counts_the_prompt_and_length_cuts(server):
    c = client(server)
    s = World(22).sample(0, intents=("colour",))
    with_image = c.chat.completions.create(model="vloop", messages=messages(s), max_tokens=1)
    text_only = c.chat.completions.create(model="vloop", messages=messages(s, with_image=False), max_tokens=1)
    # A 128x128 picture is 16 image tokens between <|vision_start|> and <|vision_end|>.
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 18
    assert text_only.usage.prompt_tokens > 5
    assert with_image.choices[0].finish_reason == "length" and with_image.usage.completion_tokens == 1
    streamed = list(c.chat.completions.create(model="vloop", messages=messages(s), max_tokens=1, stream=True,
                                              stream_options={"include_usage": True}))
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] == "length"
    assert streamed[-1].usage.prompt_tokens == with_image.usage.prompt_tokens
    # Long enough to finish by itself: the pretrained base ends its short answers.
    free = c.chat.completions.create(model="vloop", messages=messages(s), max_tokens=32)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 32


def test_stream_errors_are_plain_4xx_before_the_stream(server):
    s = World(23).sample(0, intents=("colour",))
    r = server.post("/v1/chat/completions", chat_body(s, model="no-such-adapter", stream=True))
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", chat_body(s, stream="yes"))
    assert r.status_code == 400 and "'stream'" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", chat_body(s, stream_options={"include_usage": True}))
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


def test_a_client_leaving_midway_is_logged_as_disconnected(server):
    """The client reads the first chunk and hangs up while its request waits behind others in
    the engine: the interaction is logged once, as disconnected, and never generated.

    Whether the engine is still busy when the client leaves is up to the machine (the busy
    requests may end early at an end token, or their threads start late under load), so the
    scene is played again, at most five times, until the client left first; each earlier
    leaver's answer was complete, so it must be logged once as answered."""
    s = World(24).sample(0, intents=("colour",))
    answered = []
    for attempt in range(5):
        # Keep the engine's single worker busy: different max_tokens are generated one after another.
        busy = [threading.Thread(target=server.post, args=("/v1/chat/completions",
                                                             chat_body(s, user=f"b{attempt}{i}", max_tokens=200 + i,
                                                                       temperature=1.5)))
                for i in range(6)]
        for t in busy:
            t.start()
        time.sleep(0.5)  # their requests reach the engine before the leaver's
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", server.url + "/v1/chat/completions",
                             json=chat_body(s, user="leaver", stream=True, max_tokens=64)) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                rid = r.headers["x-request-id"]
                first = next(r.iter_lines())
                assert first.startswith("data: ") and '"role":"assistant"' in first
            # leaving the block closes the connection before the answer came
        for t in busy:
            t.join()
        rec = logged(server, rid)[rid]
        if rec["status"] == "disconnected":
            break
        assert rec["status"] == "ok" and rec["answer"] is not None, rec
        answered.append(rid)
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'vloop_requests_disconnected_total{arm="champion"} 1' in metrics, f"{len(answered)} leavers were answered"
    assert rec["status"] == "disconnected" and rec["answer"] is None and rec["token_logprobs"] is None
