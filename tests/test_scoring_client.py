"""Scoring on a vLLM server (vloop.vlm.scoring_client), without one: the response parsing on a
recorded vLLM response, the error types, and the daily step's server path against a fake server
that answers in vLLM's shape. tests/test_vllm.py checks the same against a real vLLM."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import io
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vloop.vlm.scoring_client import (RowScoringError, ScoreRequest, ScoringClient, ScoringUnavailable,
                                      answer_logprobs, chat_body)

RECORDED = json.loads((Path(__file__).parent / "data" / "vllm_prompt_logprobs.json").read_text())
DAY = dt.date(2026, 11, 20)


def test_answer_logprobs_from_a_recorded_vllm_response():
    chat, ids = RECORDED["chat"], RECORDED["tokenize"]["tokens"]
    assert answer_logprobs(chat, ids) == pytest.approx([-13.550419807434082, -13.261409759521484, -13.423482894897461])
    assert answer_logprobs(chat, []) == []
    # The prompt must end with the answer's tokens.
    with pytest.raises(RowScoringError, match="does not end with the answer's 2 tokens"):
        answer_logprobs(chat, [553, 552])
    with pytest.raises(RowScoringError):
        answer_logprobs(chat, chat["prompt_token_ids"] + [1])
    # vLLM writes -inf as -9999.0 in JSON.
    clamped = copy.deepcopy(chat)
    clamped["prompt_logprobs"][-1]["504"]["logprob"] = -9999.0
    assert answer_logprobs(clamped, ids)[-1] == -math.inf
    # A server without prompt log-probabilities (or another shape) is not silently scored as nothing.
    for broken in ({k: v for k, v in chat.items() if k != "prompt_logprobs"},
                   {**chat, "prompt_token_ids": chat["prompt_token_ids"][1:]},
                   {**chat, "prompt_logprobs": chat["prompt_logprobs"][:-1] + [{"9": {"logprob": -1.0}}]}):
        with pytest.raises(ScoringUnavailable):
            answer_logprobs(broken, ids)


def test_chat_body_prefills_the_answer():
    img = Image.new("RGB", (20, 10), (1, 2, 3))
    body = chat_body(ScoreRequest("colours@v1", img, "  what colour? ", "red"))
    assert body["model"] == "colours@v1" and body["prompt_logprobs"] == 0 and body["max_tokens"] == 1
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["return_token_ids"] is True and "stream" not in body
    user, assistant = body["messages"]
    assert user["content"][1] == {"type": "text", "text": "what colour?"}
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
    url = user["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (20, 10) and sent.getpixel((0, 0)) == (1, 2, 3)  # lossless
    assert len(chat_body(ScoreRequest("base", None, "q", "a"))["messages"][0]["content"]) == 1


def _decoded_image(body) -> Image.Image | None:
    parts = body["messages"][0]["content"]
    if parts[0]["type"] != "image_url":
        return None
    return Image.open(io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])))


class FakeVllm:
    """vLLM's scoring routes in its response shapes: one token per answer character, log-prob
    -1 per token with a real image and -3 with a uniform (grey) one; a question over 200
    characters is 'too long' (400, as vLLM's max_model_len)."""

    def __init__(self, adapters=("vqa@v1",), status=None):
        self.adapters, self.status, self.calls = set(adapters), status, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.url.path, body))
        if self.status:
            return httpx.Response(self.status, json={"error": {"message": "boom", "code": self.status}})
        if request.url.path == "/v1/models":
            data = [{"id": "base", "parent": None}] + [{"id": a, "parent": "base"} for a in sorted(self.adapters)]
            return httpx.Response(200, json={"object": "list", "data": data})
        if body["model"] not in self.adapters | {"base"}:
            return httpx.Response(404, json={"error": {"message": f"The model `{body['model']}` does not exist."}})
        if request.url.path == "/tokenize":
            ids = [100 + ord(c) % 50 for c in body["prompt"]]
            return httpx.Response(200, json={"count": len(ids), "max_model_len": 512, "tokens": ids})
        question = body["messages"][0]["content"][-1]["text"]
        if len(question) > 200:
            return httpx.Response(400, json={"error": {"message": "This model's maximum context length is 512 tokens.",
                                                       "code": 400}})
        image = _decoded_image(body)
        assert image is None or image.mode == "RGB"  # flattened before it is sent
        grey = image is not None and image.getextrema() == ((128, 128),) * 3
        answer = [100 + ord(c) % 50 for c in body["messages"][1]["content"][0]["text"]]
        prompt = [1, 541, 205] + [7] * len(question) + [2, 1, 395, 205] + answer
        lp = -3.0 if grey else (-1.0 if body["model"] == "base" else -0.5)
        lps = [None] + [{str(t): {"logprob": lp, "rank": 1, "decoded_token": "x"}} for t in prompt[1:]]
        return httpx.Response(200, json={**RECORDED["chat"], "model": body["model"], "prompt_token_ids": prompt,
                                         "prompt_logprobs": lps})


def test_client_errors_are_typed(free_port_url):
    fake = FakeVllm()
    c = ScoringClient("http://vllm:8000/v1", transport=httpx.MockTransport(fake))
    assert c.models().base == "base" and c.models().adapters == {"vqa@v1"}
    img = Image.new("RGB", (8, 8), (10, 200, 30))
    got = c.score([ScoreRequest("base", img, "q?", "ab"), ScoreRequest("base", img, "x" * 300, "ab"),
                   ScoreRequest("gone@v1", img, "q?", "ab"), ScoreRequest("base", img, "q?", "")])
    assert got[0] == [-1.0, -1.0] and got[3] == []
    assert isinstance(got[1], RowScoringError) and "maximum context length" in str(got[1])
    assert isinstance(got[2], RowScoringError) and "does not exist" in str(got[2])
    # The answer's tokenisation is asked once per (model, answer).
    assert sum(path == "/tokenize" for path, _ in fake.calls) == 2
    for status in (401, 500, 503):
        with pytest.raises(ScoringUnavailable):
            ScoringClient("http://vllm:8000", transport=httpx.MockTransport(FakeVllm(status=status))).score(
                [ScoreRequest("base", img, "q?", "ab")])
    with pytest.raises(ScoringUnavailable, match="cannot reach"):
        ScoringClient(free_port_url, timeout_s=5).models()

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)
    with pytest.raises(ScoringUnavailable, match="timed out"):
        ScoringClient("http://vllm:8000", transport=httpx.MockTransport(slow)).models()
    # Several at a time (a GPU vLLM): the same answers in the same order.
    many = [ScoreRequest("base" if i % 2 else "vqa@v1", img, "q?", "abc"[:1 + i % 3]) for i in range(12)]
    par = ScoringClient("http://vllm:8000", concurrency=4, transport=httpx.MockTransport(FakeVllm()))
    assert par.score(many) == c.score(many)


@pytest.fixture
def free_port_url():
    from tests.conftest import free_port

    return f"http://127.0.0.1:{free_port()}"


def _curated_hour(lake, tmp_path):
    """Five answered rows (an RGBA photo among them), one of each adapter case, in a curated hour."""
    from vloop.curate import daily
    from vloop.learn.registry import AdapterVersion, Registry

    registry = Registry(lake)
    for name in ("vqa", "gone"):
        lake.put_bytes(f"adapters/{name}/v1/adapter_config.json", b"{}")
        registry.register(AdapterVersion(name=name, version="v1", path=f"adapters/{name}/v1/", base_model="base"),
                          actor="test")
    photos = [Image.new("RGB", (16, 16), (200, 10, 10)), Image.new("RGBA", (16, 16), (10, 10, 200, 90))]
    keys = []
    for im in photos:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        keys.append(lake.put_image(buf.getvalue()).key)
    rows = pd.DataFrame({
        "request_id": ["base", "rgba", "adapted", "unknown", "gone", "long", "logged", "no-image"],
        "image_key": [keys[0], keys[1], keys[0], keys[0], keys[0], keys[0], keys[0], None],
        "question": ["colour?"] * 5 + ["x" * 300, "colour?", "hi"],
        "answer": ["red", "blue", "red", "red", "red", "red", "red", "hello"],
        "adapter": [None, None, "vqa@v1", "unknown@v9", "gone@v1", None, None, None],
        "confidence": [np.nan] * 6 + [0.5, np.nan],
        "token_logprobs": [None] * 7 + [[-1.0, -1.0]]})
    daily.put_frame(lake, daily.slice_key(daily.CURATED, DAY, 0, "interactions.parquet"), rows)
    daily.put_frame(lake, daily.slice_key(daily.CURATED, DAY, 0, "feedback.parquet"), pd.DataFrame({"request_id": []}))
    return rows


def test_daily_step_scores_on_the_server_by_the_version_that_answered(local_lake, tmp_path, monkeypatch, caplog):
    import vloop.vlm.scoring_client as sc
    from vloop.curate import daily

    _curated_hour(local_lake, tmp_path)
    fake = FakeVllm()
    monkeypatch.setattr(sc, "ScoringClient", lambda url, **kw: ScoringClient(url, transport=httpx.MockTransport(fake),
                                                                             **kw))

    def no_model():
        raise AssertionError("the model was loaded although a scoring server is set")

    monkeypatch.setenv("VLOOP_SCORING_URL", "http://vllm:8000")
    summary = daily.score_confidence_slice(local_lake, DAY, 0, no_model)
    out = daily.get_frame(local_lake, daily.slice_key(daily.CURATED, DAY, 0, "confidence.parquet")).set_index("request_id")
    # Real image: -1 per token on the base, -0.5 on the adapter; grey: -3 (3 tokens in "red").
    assert out.loc["base", "confidence"] == pytest.approx(math.exp(-1)) and out.loc["base", "grounding"] == pytest.approx(6)
    assert out.loc["rgba", "grounding"] == pytest.approx(8)
    assert out.loc["adapted", "confidence"] == pytest.approx(math.exp(-0.5))
    assert out.loc["adapted", "grounding"] == pytest.approx(7.5)
    assert out.loc["unknown", "confidence"] == pytest.approx(math.exp(-1))  # not in the registry: the base
    for rid in ("gone", "long"):  # not scorable: no score, a reason in the log, the hour goes on
        assert np.isnan(out.loc[rid, "confidence"]) and np.isnan(out.loc[rid, "grounding"])
        assert out.loc[rid, "confidence_source"] == "missing"
    assert out.loc["logged", "confidence"] == 0.5 and out.loc["logged", "grounding"] == pytest.approx(6)
    assert out.loc["no-image", "confidence_source"] == "logprobs" and np.isnan(out.loc["no-image", "grounding"])
    assert summary["scored_on"] == "server" and summary["unscored"] == 2 and summary["rescored"] == 4
    assert summary["grounded"] == 5 and summary["missing"] == 2
    assert "gone@v1 is not loaded" in caplog.text and "maximum context length" in caplog.text
    # Models asked: the adapter by its own name, everything else by the served base.
    asked = {b["model"] for p, b in fake.calls if p == "/v1/chat/completions"}
    assert asked == {"base", "vqa@v1"}

    # Grounding off: only the rows without a confidence are sent, once each.
    fake.calls.clear()
    summary = daily.score_confidence_slice(local_lake, DAY, 0, no_model, grounding=False)
    assert sum(p == "/v1/chat/completions" for p, _ in fake.calls) == 5  # once per row to re-score; never for "gone"
    assert summary["grounded"] == 0 and summary["rescored"] == 4

    # A server that is down fails the step (Airflow retries it), it does not write empty scores.
    fake.status = 503
    with pytest.raises(ScoringUnavailable):
        daily.score_confidence_slice(local_lake, DAY, 0, no_model)
    # "" turns the server off: the local path, which needs the model.
    with pytest.raises(AssertionError, match="the model was loaded"):
        daily.score_confidence_slice(local_lake, DAY, 0, no_model, scoring_url="")
