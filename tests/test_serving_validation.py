"""Bad chat requests are refused alone: every one gets a 4xx with a message before it reaches the
model, none fails another user's request, none is logged or counted against an arm, and none
leaves a staged photo behind. The gateway runs as in tests/test_serving.py (a subprocess on
loopback, shipping to a local lake), here on the tiny untrained model: only the plumbing counts."""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serving import Server, lake_table
from vloop.store.lake import open_lake
from vloop.vlm.model import MAX_QUESTION_CHARS
from vloop.store.schema import INTERACTION

_photo_lock = threading.Lock()
_photo_n = [0]


def photo_url() -> str:
    """A data URL of a photo no other request sends (so its image key is its own)."""
    with _photo_lock:
        _photo_n[0] += 1
        n = _photo_n[0]
    img = Image.new("RGB", (32, 32), (n % 256, n // 256 % 256, 77))
    img.putpixel((0, 0), (255 - n % 256, 3, n // 65536 % 256))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def body(question="what colour is it?", *, user="u", image=True, **kw) -> dict:
    content = [{"type": "text", "text": question}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": photo_url()}})
    return {"model": "vloop", "user": user, "max_tokens": 4, **kw,
            "messages": [{"role": "user", "content": content}]}


def raw(b: dict) -> bytes:
    return json.dumps(b).encode()


def bad_requests() -> list[tuple[str, bytes, str]]:
    """(name, request body, a word the error message must contain): the issue's malformed inputs,
    each carrying a photo of its own where it is JSON at all."""
    bad_utf8 = raw(body("QQQ")).replace(b"QQQ", b"colour \xff\xfe?")
    deep = b'{"model": "vloop", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    two_images = body()
    two_images["messages"] = [two_images["messages"][0], {"role": "assistant", "content": "red"},
                              body("and now?")["messages"][0]]
    return [
        ("invalid UTF-8 in a string", bad_utf8, "UTF-8"),
        ("JSON nested 100,000 deep", deep, "nested"),
        ("metadata as a list", raw(body(metadata=["shoes"])), "metadata"),
        ("session_id as an integer", raw(body(metadata={"session_id": 42})), "session_id"),
        ("a 2 MB question", raw(body("x" * 2_000_000)), "characters"),
        ("one character over the model's limit", raw(body("y" * (MAX_QUESTION_CHARS + 1))), "characters"),
        ("the limit, streamed", raw(body("z" * (MAX_QUESTION_CHARS + 1), stream=True)), "characters"),
        ("model as a number", raw(body(model=7)), "model"),
        ("a 1 MB category", raw(body(metadata={"category": "c" * 2**20})), "category"),
        ("images in two user messages", raw(two_images), "last user message"),
        ("a text part that is not text", raw(body(question={"nested": "object"})), "string"),
    ]


def metric_samples(url: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def check_nothing_left_behind(srv: Server, answered: set[str]) -> None:
    """After a clean stop: the lake holds a record for exactly the answered requests, none an
    error, and exactly their photos; no staged photo is left in the spool."""
    lake = open_lake((srv.home / "lake").as_uri())
    inter = lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()
    assert sorted(x["request_id"] for x in inter) == sorted(answered)
    assert {x["status"] for x in inter} == {"ok"}
    assert sorted(lake.list("raw/images/")) == sorted({x["image_key"] for x in inter if x["image_key"]})
    assert list((srv.home / "spool" / "images").iterdir()) == []


@pytest.fixture
def gateway(tiny_model_dir, tmp_path):
    srv = Server(tiny_model_dir, (tmp_path / "lake").as_uri(), tmp_path).start()
    yield srv
    srv.stop()


def test_each_malformed_request_is_a_4xx_with_a_message(gateway):
    srv = gateway
    with httpx.Client(base_url=srv.url, timeout=60, headers={"Content-Type": "application/json"}) as http:
        for name, data, word in bad_requests():
            r = http.post("/v1/chat/completions", content=data)
            # Today: 500s with a traceback (UTF-8, nesting, metadata, the 2 MB question), a 404 for
            # model 7, and a 200 for the 1 MB category and the dropped first image.
            assert r.status_code == 400, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and word in err["message"], (name, err)
        ok = http.post("/v1/chat/completions", content=raw(body(metadata={"session_id": "s1", "category": "bags"})))
        assert ok.status_code == 200, ok.text
        got = metric_samples(srv.url)
    n_bad = len(bad_requests())
    assert got[("vloop_requests_refused_total", (("status", "400"),))] == n_bad
    assert not [k for k in got if k[0] == "vloop_requests_failed_total"]  # nothing against an arm
    assert sum(v for k, v in got.items() if k[0] == "vloop_requests_total") == 1
    srv.stop()
    check_nothing_left_behind(srv, {ok.json()["id"]})
    lake = open_lake((srv.home / "lake").as_uri())
    rec = lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()[0]
    assert (rec["session_id"], rec["category"]) == ("s1", "bags")


def test_bad_requests_never_fail_their_neighbours(gateway):
    """Six app clients ask ordinary questions (through the official openai client, no retries)
    while two others send over-long and malformed requests: every ordinary request is answered,
    every bad one refused alone, and the arm's error count stays at zero."""
    from openai import OpenAI

    srv = gateway
    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    done = threading.Event()
    answered: list[str] = []
    refused: list[tuple[str, int, str]] = []

    def app_client(worker: int) -> None:
        for i in range(8):
            b = body(user=f"app{worker}-{i % 3}", image=i % 4 != 3)
            r = client.chat.completions.create(model="vloop", messages=b["messages"], max_tokens=4,
                                               user=b["user"], metadata={"session_id": f"s{worker}"})
            assert r.choices[0].message.content is not None
            answered.append(r.id)

    def bad_client(worker: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=120, headers={"Content-Type": "application/json"}) as http:
            while not done.is_set():
                for name, data, _ in bad_requests():
                    r = http.post("/v1/chat/completions", content=data)
                    refused.append((name, r.status_code, r.text[:200]))

    with ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(bad_client, w) for w in range(2)]
        apps = [pool.submit(app_client, w) for w in range(6)]
        try:
            for f in apps:
                f.result()  # today: openai.InternalServerError, the batch failed with the long question
        finally:
            done.set()
        for f in bad:
            f.result()
    assert len(answered) == 48
    assert len(refused) >= len(bad_requests()) and {s for _, s, _ in refused} == {400}, refused[:5]
    got = metric_samples(srv.url)
    assert not [k for k in got if k[0] == "vloop_requests_failed_total"], got
    assert sum(v for k, v in got.items() if k[0] == "vloop_requests_total") == 48
    assert got[("vloop_requests_refused_total", (("status", "400"),))] == len(refused)
    srv.stop()
    check_nothing_left_behind(srv, set(answered))


def test_a_failing_batch_is_split_so_only_the_bad_request_fails(tiny_model_dir, monkeypatch):
    """The engine's own guard, for whatever gets past validation: a batch that fails is split
    until the failing request is alone, and only that one fails (a bad input as a 400)."""
    import vloop.vlm.model
    from serving.engine import EngineError, GenRequest, LocalEngine

    real, calls = vloop.vlm.model.generate, []

    def generate(lm, images, questions, **kw):
        calls.append(len(questions))
        if any("POISON" in q for q in questions):
            raise vloop.vlm.model.InputError("this question cannot be encoded")
        return real(lm, images, questions, **kw)

    monkeypatch.setattr(vloop.vlm.model, "generate", generate)
    engine = LocalEngine(str(tiny_model_dir), batch_wait_s=0.5)  # wide window: one batch of all 8
    try:
        with pytest.raises(EngineError) as e:  # over the model's limit: refused on submission
            engine.submit(GenRequest(None, "q" * (MAX_QUESTION_CHARS + 1), None, 4))
        assert e.value.status == 400
        reqs = [GenRequest(None, "POISON" if i == 5 else f"question {i}?", None, 4) for i in range(8)]
        for r in reqs:
            engine._queue.put(("gen", r))  # past submit's check, as an unforeseen bad input would be
        results = [r.future.exception(timeout=120) or r.future.result() for r in reqs]
    finally:
        engine.close()
    assert calls[0] == 8  # they really were one batch
    assert isinstance(results[5], EngineError) and results[5].status == 400
    assert all(not isinstance(x, Exception) and x.text is not None for i, x in enumerate(results) if i != 5)
    # Split in halves down to the bad request: 8 fails, 0-3 pass, 4-7 fails, 4-5 fails, 4 passes,
    # 5 fails alone, 6-7 pass.
    assert calls == [8, 4, 4, 2, 1, 1, 2]
