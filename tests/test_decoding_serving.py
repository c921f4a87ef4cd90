"""The decoding policy and image quality in the real serving process (`python -m serving`).

A gateway subprocess serves the pretrained tiny Qwen3-VL on a local-directory lake with a short
policy TTL: a word the model is seen to say is banned in the lake (`vloop decoding ban`) and is
never said after the replica reloads the policy, on plain and streamed answers; a request's own
``bad_words`` ban a word for that request only (a request without them, batched alongside,
still says it). Image requests carry ``vloop.image_quality``; text-only ones do not. The
upstream path is checked against a recording stand-in for vLLM: the merged list is forwarded as
``bad_words`` (tests/test_vllm.py checks that real vLLM honours it).
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
from PIL import Image

from tests.conftest import free_port
from tests.test_serving import Server, chat_body, wait_for
from vloop.vlm.decoding import ban, contains_banned, current, unban
from vloop.curate.imagequality import quick_summary
from vloop.store.images import normalise_image
from vloop.store.lake import open_lake
from vloop.sim.synth import World

TTL_S = 0.5


@pytest.fixture(scope="module")
def gateway(base_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("decoding-serve")
    srv = Server(base_model_dir, (home / "lake").as_uri(), home)
    srv.args += ["--decoding-ttl", str(TTL_S)]
    srv.lake_url = (home / "lake").as_uri()
    srv.start()
    yield srv
    srv.stop()


def ask(srv, sample, **kw) -> tuple[str, dict]:
    """(answer, vloop fields) of a plain request."""
    r = srv.post("/v1/chat/completions", chat_body(sample, max_tokens=12, **kw))
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0]["message"]["content"], out["vloop"]


def ask_streamed(srv, sample, **kw) -> tuple[str, dict]:
    """(answer joined from the deltas, vloop fields of the final chunk) of a streamed request."""
    r = requests.post(srv.url + "/v1/chat/completions", json=chat_body(sample, max_tokens=12, stream=True, **kw),
                      stream=True, timeout=60)
    assert r.status_code == 200, r.text
    events = [json.loads(line[5:]) for line in r.iter_lines()
              if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]
    assert not [e for e in events if "error" in e], events
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    finals = [e for e in events if "vloop" in e]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"], events[-2:]
    return text, finals[0]["vloop"]


def said_word(answers: list[str], avoid=()) -> str:
    """A word the model actually says: the one in the most answers (letters only, 2+ of them)."""
    counts = Counter(w for a in answers for w in set(re.findall(r"[^\W\d_]{2,}", a)) if w not in avoid)
    assert counts, f"the model said no word at all: {answers}"
    return counts.most_common(1)[0][0]


def wait_policy(srv, version: int) -> None:
    wait_for(lambda: requests.get(srv.url + "/healthz", timeout=5).json()["decoding_policy"] == version,
             10, f"the replica to load decoding policy version {version}")


SAMPLES = World(41).samples(4)


def test_a_banned_word_is_never_said_after_the_policy_reloads(gateway):
    from vloop.cli import main

    free = [ask(gateway, s)[0] for s in SAMPLES]
    word = said_word(free)
    said = [i for i, a in enumerate(free) if contains_banned(a, [word], ())]
    # Streaming answers the same before the ban (same greedy decoding).
    assert [ask_streamed(gateway, s)[0] for s in SAMPLES] == free

    assert main(["decoding", "ban", word, "--reason", "test: the model says it", "--url", gateway.lake_url]) == 0
    wait_policy(gateway, 1)  # no restart: the replica re-reads the lake within its TTL
    banned = [ask(gateway, s)[0] for s in SAMPLES]
    streamed = [ask_streamed(gateway, s)[0] for s in SAMPLES]
    for a in banned + streamed:
        assert not contains_banned(a, [word], ()), (word, a)
    assert all(banned[i] != free[i] for i in said), (word, free, banned)  # it said something else
    assert streamed == banned

    # Lifted again: the word comes back, so it was the policy that kept it out.
    unban(open_lake(gateway.lake_url), [word], actor="test", reason="lifted")
    wait_policy(gateway, 2)
    assert [ask(gateway, s)[0] for s in SAMPLES] == free


def test_request_bad_words_hold_for_that_request_only(gateway):
    lake = open_lake(gateway.lake_url)
    assert current(lake).banned == ()  # (the test above lifts its ban)
    wait_policy(gateway, current(lake).version)
    free = [ask(gateway, s)[0] for s in SAMPLES]
    word = said_word(free)
    said = [i for i, a in enumerate(free) if contains_banned(a, [word], ())]
    # Each question with and without bad_words at the same moment, so they meet in one batch.
    with ThreadPoolExecutor(8) as pool:
        with_bw = [pool.submit(ask, gateway, s, bad_words=[word]) for s in SAMPLES]
        without = [pool.submit(ask, gateway, s) for s in SAMPLES]
        streamed = [pool.submit(ask_streamed, gateway, s, bad_words=[f"  {word} "]) for s in SAMPLES]
    with_bw = [f.result()[0] for f in with_bw]
    for a in with_bw + [f.result()[0] for f in streamed]:
        assert not contains_banned(a, [word], ()), (word, a)
    assert all(with_bw[i] != free[i] for i in said)
    assert [f.result()[0] for f in without] == free  # the ban did not leak into its batch-mates

    # With a policy in force too, both apply.
    other = said_word(with_bw, avoid={word})
    p = ban(lake, [other], actor="test", reason="both")
    try:
        wait_policy(gateway, p.version)
        for a in [ask(gateway, s, bad_words=[word])[0] for s in SAMPLES]:
            assert not contains_banned(a, [word, other], ()), (word, other, a)
    finally:
        unban(lake, [other], actor="test", reason="done")


@pytest.mark.parametrize("bad_words, message", [
    ("maybe", "must be a list of strings"),
    ([1], "'bad_words'[0] must be a string"),
    (["ok", "  "], "'bad_words'[1] is empty"),
    (["x" * 51], "at most 50"),
    (["w"] * 101, "at most 100"),
])
def test_bad_bad_words_are_refused(gateway, bad_words, message):
    for stream in (False, True):
        r = gateway.post("/v1/chat/completions", chat_body(SAMPLES[0], bad_words=bad_words, stream=stream))
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]


def test_image_quality_in_the_response_when_asked(gateway):
    s = SAMPLES[0]
    dark = SimpleNamespace(image=Image.eval(s.image.convert("RGB"), lambda v: v // 8), question=s.question)
    asked = {"vloop": {"image_quality": True}}
    _, extras = ask(gateway, s, **asked)
    # The very check the library makes, on the very bytes logged (PNG: the user's pixels, metadata cut).
    logged = normalise_image(s.image_bytes(), max_bytes=2**24, max_pixels=2**24).data
    assert extras["image_quality"] == quick_summary(logged)
    assert set(extras["image_quality"]) == {"flags", "poor", "advice"}  # NIQE: the daily check's
    assert "dark" not in extras["image_quality"]["flags"]

    for extras in (ask(gateway, dark, **asked)[1], ask_streamed(gateway, dark, **asked)[1]):
        q = extras["image_quality"]
        assert "dark" in q["flags"] and q["poor"] is True and "frontal photo" in q["advice"]
        assert extras["arm"] and "confidence" in extras  # beside the other vloop fields

    # Opt-in: the photo is not decoded for it otherwise.
    assert "image_quality" not in ask(gateway, dark)[1]
    text_only = {"model": "vloop", "user": "alice", "max_tokens": 4, **asked,
                 "messages": [{"role": "user", "content": s.question}]}
    r = gateway.post("/v1/chat/completions", text_only)
    assert r.status_code == 200 and "image_quality" not in r.json()["vloop"]
    for bad, message in (({"image_qualty": True}, "unknown 'vloop' option"), ({"image_quality": "yes"}, "bool"),
                         ("on", "must be an object")):
        r = gateway.post("/v1/chat/completions", chat_body(s, vloop=bad))
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


# -- the upstream path: what the gateway sends vLLM --------------------------------------------------

class FakeUpstream(http.server.ThreadingHTTPServer):
    """Answers like vLLM (one base model, "red" as every answer, plain or streamed) and keeps
    every chat request body it got."""

    def __init__(self):
        self.bodies: list[dict] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body: bytes, ctype="application/json"):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(json.dumps({"object": "list", "data": [{"id": "base", "object": "model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                srv.bodies.append(body)
                lp = {"content": [{"token": "red", "logprob": -0.1, "top_logprobs": []}]}
                if not body.get("stream"):
                    self._send(json.dumps({"id": "u", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "red"}, "logprobs": lp,
                         "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}).encode())
                    return
                events = [{"choices": [{"index": 0, "delta": {"content": "red"}, "logprobs": lp, "finish_reason": None}]},
                          {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                          {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}]
                self._send(("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode(),
                           "text/event-stream")

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_upstream_gets_the_merged_bad_words(tmp_path):
    upstream = FakeUpstream()
    lake_url = (tmp_path / "lake").as_uri()
    lake = open_lake(lake_url)
    ban(lake, ["可能", "maybe"], actor="test", reason="hedges")
    srv = Server("unused-local-model", lake_url, tmp_path)
    srv.args += ["--upstream", upstream.url, "--decoding-ttl", str(TTL_S)]
    srv.start()
    try:
        s = SAMPLES[0]
        r = srv.post("/v1/chat/completions", chat_body(s, bad_words=["probably", "maybe"], vloop={"image_quality": True}))
        assert r.status_code == 200, r.text
        assert upstream.bodies[-1]["bad_words"] == sorted({"maybe", "probably", "可能"})  # policy ∪ request
        assert "dark" not in r.json()["vloop"]["image_quality"]["flags"]  # image quality on this path too
        assert "vloop" not in upstream.bodies[-1]  # the gateway's options stay with the gateway
        # Nothing to strip from this PNG: vLLM gets the user's own data URL, not a copy of it.
        image_part = upstream.bodies[-1]["messages"][0]["content"][0]
        assert image_part["image_url"]["url"] == chat_body(s)["messages"][0]["content"][0]["image_url"]["url"]

        ban(lake, ["大概"], actor="test", reason="more")
        wait_policy(srv, 2)
        r = requests.post(srv.url + "/v1/chat/completions", json=chat_body(s, stream=True, vloop={"image_quality": True}),
                          timeout=30)
        assert r.status_code == 200 and b"image_quality" in r.content
        assert upstream.bodies[-1]["stream"] is True
        assert upstream.bodies[-1]["bad_words"] == sorted({"maybe", "大概", "可能"})

        n = len(upstream.bodies)
        assert srv.post("/v1/chat/completions", chat_body(s, bad_words=[""])).status_code == 400
        assert len(upstream.bodies) == n  # refused before anything reached vLLM
    finally:
        srv.stop()
        upstream.shutdown()
