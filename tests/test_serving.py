"""The serving container over real HTTP, on the tiny Qwen3-VL with real PEFT adapters.

Each server runs as a subprocess (`python -m serving`) on a free loopback port, shipping to a
temporary lake: a local directory, or S3 through moto's server.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageOps

from tests.conftest import S3_KEYS, free_port
from vloop.services import Service
from vloop.store.images import open_image
from vloop.store.lake import open_lake
from vloop.store.schema import FEEDBACK, INTERACTION
from vloop.sim.synth import World

TOKEN = "test-admin-token"
SECRET = "test-user-key-secret"


def data_url(img) -> str:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def minted(request_id, user=None, **kw):
    """A feedback token as any replica with the tests' secret would issue it (what another
    replica's answer carries)."""
    from serving.auth import FeedbackTokens, derive_secret
    from vloop.privacy import user_key

    return FeedbackTokens(derive_secret(SECRET), **kw).issue(request_id, user_key(user or "", SECRET))


def chat_body(sample, model="vloop", user="alice", **kw):
    return {"model": model, "user": user, "max_tokens": 8, **kw,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(sample.image)}},
                {"type": "text", "text": sample.question}]}]}


class Server:
    def __init__(self, model, lake_url, home: Path, env_extra=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("VLOOP_")},
                    "VLOOP_HOME": str(home), "VLOOP_ADMIN_TOKEN": TOKEN, "VLOOP_USER_KEY_SECRET": SECRET,
                    "VLOOP_MAX_IMAGE_PIXELS": str(512 * 512), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
        self.args = [sys.executable, "-m", "serving", "--model", str(model), "--lake", lake_url,
                     "--port", str(self.port), "--ship-interval", "0.2"]
        self.service: Service | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        """The running server process (a test may signal it directly, e.g. SIGKILL for a crash)."""
        return self.service.proc if self.service else None

    def start(self):
        # A new log for every start (`args` may have changed since the last one).
        self.service = Service("serving", self.args, log_file=self.home / f"server-{time.time_ns()}.log",
                               env=self.env, stop_signal=signal.SIGTERM, grace=60)
        self.service.start(health_url=self.url + "/healthz", timeout=90)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.service:
            self.service.stop(sig)

    def post(self, path, body=None, token=None, **kw):
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(self.url + path, json=body, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def server(base_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve")
    srv = Server(base_model_dir, (home / "lake").as_uri(), home).start()
    yield srv
    srv.stop()


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def lake_table(lake, dataset, schema):
    today = dt.datetime.now(dt.timezone.utc).date()
    return lake.read_partitions(dataset, today - dt.timedelta(days=1), today, schema=schema)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_chat_and_feedback_land_in_the_lake(backend, base_model_dir, tmp_path, s3_endpoint):
    if backend == "s3":
        lake_url, extra = "s3://vloop-serving/lake", {"VLOOP_S3_ENDPOINT": s3_endpoint,
                                                       "VLOOP_S3_ACCESS_KEY": S3_KEYS["access_key"],
                                                       "VLOOP_S3_SECRET_KEY": S3_KEYS["secret_key"]}
    else:
        lake_url, extra = (tmp_path / "lake").as_uri(), {}
    srv = Server(base_model_dir, lake_url, tmp_path, extra).start()
    try:
        s = World(1).sample(0, intents=("colour",))
        r = srv.post("/v1/chat/completions", chat_body(s, user="alice@example.com", logprobs=True, top_logprobs=2,
                                                       metadata={"session_id": "s1", "category": s.category}))
        assert r.status_code == 200, r.text
        out = r.json()
        rid = out["id"]
        assert r.headers["X-Request-Id"] == rid
        assert out["choices"][0]["message"]["content"]
        lps = out["choices"][0]["logprobs"]["content"]
        assert lps and all(c["logprob"] <= 0 and len(c["top_logprobs"]) == 2 for c in lps)
        assert r.headers["X-Vloop-Feedback-Token"] == out["vloop"]["feedback_token"]
        f = srv.post("/v1/feedback", {"request_id": rid, "type": "edit", "edited_text": "it is red",
                                      "feedback_token": out["vloop"]["feedback_token"]})
        assert f.status_code == 202, f.text
    finally:
        srv.stop()  # a clean stop drains the spool into the lake
    lake = open_lake(lake_url, settings=__import__("vloop.store.config", fromlist=["x"]).load_settings(
        {**extra, "VLOOP_LAKE_URL": lake_url}))
    inter = lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()
    assert [x["request_id"] for x in inter] == [rid]
    rec = inter[0]
    assert rec["user_key"] != "alice@example.com" and len(rec["user_key"]) == 64
    assert rec["arm"] == "champion" and rec["adapter"] is None and rec["status"] == "ok"
    assert rec["session_id"] == "s1" and rec["category"] == s.category
    assert rec["token_logprobs"] == pytest.approx([c["logprob"] for c in lps], abs=1e-5)
    assert 0 < rec["confidence"] <= 1 and rec["latency_ms"] > 0
    assert lake.exists(rec["image_key"]) and rec["image_w"] == s.image.width
    fb = lake_table(lake, "raw/feedback", FEEDBACK.arrow).to_pylist()
    assert [(e["request_id"], e["type"], e["edited_text"]) for e in fb] == [(rid, "edit", "it is red")]


def test_adapters_load_serve_and_fail_cleanly(server, adapters, tmp_path):
    yellow = World(5).samples(8, intents=("colour",), colours=("yellow",))
    base_answers = [server.post("/v1/chat/completions", chat_body(s, model="model")).json()
                    ["choices"][0]["message"]["content"] for s in yellow]
    r = server.post("/v1/load_lora_adapter", {"lora_name": "colours", "lora_path": str(adapters["colours"])})
    assert r.status_code == 401  # admin route without the token
    r = server.post("/v1/load_lora_adapter", {"lora_name": "colours", "lora_path": str(adapters["colours"])},
                    token=TOKEN)
    assert r.status_code == 200, r.text
    models = requests.get(server.url + "/v1/models").json()["data"]
    assert {"id": "colours", "parent": "model"}.items() <= {k: v for k, v in models[1].items()}.items()
    assert models[0]["id"] == "model" and models[0]["parent"] is None
    adapter_answers = [server.post("/v1/chat/completions", chat_body(s, model="colours")).json()
                       ["choices"][0]["message"]["content"] for s in yellow]
    assert adapter_answers != base_answers
    # The adapter answers with the colours it was taught (30 steps: it may still mix white and
    # yellow up); the base never learned them.
    taught = ("yellow", "黄色", "white", "白色")
    assert sum(a in taught for a in adapter_answers) > sum(a in taught for a in base_answers) + 4, \
        (adapter_answers, base_answers)

    # Bad loads answer 4xx with a reason and leave the loaded adapter serving.
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"x")
    for path, why in [(tmp_path / "nope", "neither a local directory"), (tmp_path / "empty", "no adapter_config"),
                      (bad, "does not parse")]:
        r = server.post("/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(path)}, token=TOKEN)
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
    r = server.post("/v1/load_lora_adapter", {"lora_name": "colours", "lora_path": str(adapters["colours"])},
                    token=TOKEN)
    assert r.status_code == 400 and "already loaded" in r.text
    again = [server.post("/v1/chat/completions", chat_body(s, model="colours")).json()
             ["choices"][0]["message"]["content"] for s in yellow]
    assert again == adapter_answers
    r = server.post("/v1/chat/completions", chat_body(yellow[0], model="no-such-adapter"))
    assert r.status_code == 404 and "does not exist" in r.text


def test_concurrent_mixed_requests_get_their_own_adapter(server, adapters):
    server.post("/v1/load_lora_adapter", {"lora_name": "count", "lora_path": str(adapters["count"])}, token=TOKEN)
    server.post("/v1/load_lora_adapter", {"lora_name": "colours", "lora_path": str(adapters["colours"])}, token=TOKEN)
    samples = World(6).samples(6, intents=("colour", "count"))
    jobs = [(m, s) for m in ("model", "colours", "count") for s in samples]

    def ask(job):
        m, s = job
        r = server.post("/v1/chat/completions", chat_body(s, model=m, logprobs=True))
        assert r.status_code == 200, r.text
        return r.json()["model"], r.json()["choices"][0]["message"]["content"]

    sequential = [ask(j) for j in jobs]
    assert len({a for _, a in sequential}) > 2  # the three models really answer differently
    with ThreadPoolExecutor(12) as pool:
        concurrent = list(pool.map(ask, jobs * 2))
    assert concurrent == sequential * 2


def test_routing_is_sticky_and_close_to_the_share(server, adapters):
    server.post("/v1/load_lora_adapter", {"lora_name": "colours", "lora_path": str(adapters["colours"])}, token=TOKEN)
    r = requests.put(server.url + "/admin/routes", json={"canary": "colours", "canary_share": 0.3},
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    bad = requests.put(server.url + "/admin/routes", json={"canary": "ghost", "canary_share": 0.1},
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 400 and "not loaded" in bad.text
    s = World(7).sample(0, intents=("colour",))
    arms = {}
    for u in range(40):
        seen = {server.post("/v1/chat/completions", chat_body(s, user=f"user{u}")).json()["vloop"]["arm"]
                for _ in range(2)}
        assert len(seen) == 1  # a user stays on one arm
        arms[u] = seen.pop()
    share = sum(a == "canary" for a in arms.values()) / len(arms)
    assert 0.1 <= share <= 0.5
    r = server.post("/v1/unload_lora_adapter", {"lora_name": "colours"}, token=TOKEN)
    assert r.status_code == 409  # routed to: refuse to pull it from under live traffic
    requests.put(server.url + "/admin/routes", json={}, headers={"Authorization": f"Bearer {TOKEN}"})


def test_share_over_many_users_matches_config():
    from serving.routing import Routes

    routes = Routes(champion="a", canary="b", canary_share=0.1, holdout_share=0.05)
    arms = [routes.arm_for(f"user-{i}")[0] for i in range(20000)]
    assert abs(arms.count("canary") / 20000 - 0.10 * 0.95) < 0.01  # the canary share is of non-holdout users
    assert abs(arms.count("holdout") / 20000 - 0.05) < 0.01
    bigger = Routes(champion="a", canary="b", canary_share=0.2, holdout_share=0.05)
    moved = [i for i in range(20000) if routes.arm_for(f"user-{i}")[0] == "canary"
             and bigger.arm_for(f"user-{i}")[0] != "canary"]
    assert moved == []  # raising the share never moves canary users out
    # Changing the holdout share moves nobody between canary and champion.
    more_holdout = Routes(champion="a", canary="b", canary_share=0.1, holdout_share=0.2)
    swapped = [i for i in range(20000) if {routes.arm_for(f"user-{i}")[0], more_holdout.arm_for(f"user-{i}")[0]}
               == {"canary", "champion"}]
    assert swapped == []
    # A new experiment (new salt) draws other users: the overlap is about share², not share.
    other = Routes(champion="a", canary="b", canary_share=0.1, salt="exp-2")
    first = {i for i in range(20000) if Routes(champion="a", canary="b", canary_share=0.1).arm_for(f"user-{i}")[0] == "canary"}
    second = {i for i in range(20000) if other.arm_for(f"user-{i}")[0] == "canary"}
    assert len(first & second) / len(first) < 0.2
    # No user id: the champion answers, counted apart from the experiment.
    assert routes.arm_for(None) == ("unassigned", "a")


def test_privacy_opt_out_pii_and_limits(base_model_dir, tmp_path):
    srv = Server(base_model_dir, (tmp_path / "lake").as_uri(), tmp_path).start()
    planted = ["jane.doe@example.com", "13812345678", "11010519491231002X", "4111 1111 1111 1111"]
    try:
        s = World(8).sample(0, intents=("colour",))
        body = chat_body(s, user="bob")
        body["messages"][0]["content"][1]["text"] = f"mail {planted[0]} or call {planted[1]}, id {planted[2]}, what colour?"
        logged = srv.post("/v1/chat/completions", body).json()
        srv.post("/v1/feedback", {"request_id": logged["id"], "type": "edit",
                                  "edited_text": f"pay with {planted[3]}"},
                 headers={"X-Vloop-Feedback-Token": logged["vloop"]["feedback_token"]})
        skipped = srv.post("/v1/chat/completions", chat_body(s, user="carol"), headers={"X-Vloop-Opt-Out": "1"})
        assert skipped.status_code == 200 and skipped.json()["vloop"]["logged"] is False
        assert srv.post("/admin/opt-out", {"user": "dave"}, token=TOKEN).ok
        dave = srv.post("/v1/chat/completions", chat_body(s, user="dave")).json()
        assert dave["vloop"]["logged"] is False
        # Feedback about unlogged answers is not logged either (the text could name the user).
        for answer in (skipped.json(), dave):
            r = srv.post("/v1/feedback", {"request_id": answer["id"], "type": "edit", "edited_text": "I am carol, it's blue",
                                          "feedback_token": answer["vloop"]["feedback_token"]})
            assert r.status_code == 202 and r.json()["logged"] is False
        r = srv.post("/v1/feedback", {"request_id": "answered-elsewhere", "type": "accept", "user": "dave",
                                      "feedback_token": minted("answered-elsewhere", "dave")})
        assert r.json()["logged"] is False  # an opted-out user named in the feedback

        # Bad requests: clear 4xx, nothing logged.
        assert srv.post("/v1/chat/completions", data=b"{oops", headers={"Content-Type": "application/json"}).status_code == 400
        r = srv.post("/v1/chat/completions", {"messages": []})
        assert r.status_code == 400 and "non-empty" in r.json()["error"]["message"]
        big = World(8).sample(1).image.resize((600, 600))
        r = srv.post("/v1/chat/completions", chat_body(type("S", (), {"image": big, "question": "colour?"})))
        assert r.status_code == 413 and "pixels" in r.text
        r = srv.post("/v1/chat/completions", data=b"x" * (21 * 2**20), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = srv.post("/v1/feedback", {"request_id": "r", "type": "like", "feedback_token": minted("r")})
        assert r.status_code == 400 and "not one of" in r.text
        assert srv.post("/v1/feedback", {"request_id": "from-another-replica", "type": "accept",
                                         "feedback_token": minted("from-another-replica")}).status_code == 202
        # SSRF: loopback, private and metadata targets are refused before any connection.
        for url in (f"{srv.url}/healthz", "http://10.0.0.1/a.png", "http://169.254.169.254/latest/meta-data"):
            body = chat_body(s)
            body["messages"][0]["content"][0]["image_url"]["url"] = url
            r = srv.post("/v1/chat/completions", body)
            assert r.status_code == 400 and "refused" in r.json()["error"]["message"], url
        # A phone photo with a GPS position and a serial number, shown turned (EXIF orientation 6),
        # and a refused request's photo (an unknown adapter: 404, no record, so no image either).
        exif = Image.Exif()
        exif[0x010F], exif[0xA431], exif[0x8825], exif[0x0112] = "SecretCam", "SN-4242", {2: (39.0, 54.0, 26.0)}, 6
        buf = io.BytesIO()
        World(8).sample(2).image.convert("RGB").save(buf, "JPEG", quality=90, exif=exif.tobytes())
        photo = buf.getvalue()
        body = chat_body(s, user="erin")
        body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
        turned = srv.post("/v1/chat/completions", body)
        assert turned.status_code == 200, turned.text
        refused = srv.post("/v1/chat/completions", chat_body(World(8).sample(3), model="no-such-adapter"))
        assert refused.status_code == 404, refused.text

        metrics = requests.get(srv.url + "/metrics").text
        assert 'vloop_requests_total{arm="champion",logged="true"}' in metrics
        assert "vloop_request_latency_seconds_bucket" in metrics and "vloop_spool_segments" in metrics
    finally:
        srv.stop()
    lake = open_lake((tmp_path / "lake").as_uri())
    inter = lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()
    fb = lake_table(lake, "raw/feedback", FEEDBACK.arrow).to_pylist()
    assert [x["request_id"] for x in inter] == [logged["id"], turned.json()["id"]]  # no opted-out request
    # Images: exactly the logged requests' (not the refused one's), nothing half-written left behind.
    assert sorted(lake.list("raw/images/")) == sorted({x["image_key"] for x in inter})
    assert list((tmp_path / "spool" / "images").iterdir()) == []
    # The photo: its pixels exactly, shown the way the user saw it, with no metadata but which way up.
    erin = inter[1]
    stored = lake.get_bytes(erin["image_key"])
    assert b"SecretCam" not in stored and b"SN-4242" not in stored
    assert dict(Image.open(io.BytesIO(stored)).getexif()) == {0x0112: 6}
    seen = ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).convert("RGB")
    assert (erin["image_w"], erin["image_h"]) == seen.size
    assert open_image(stored, max_bytes=2**24, max_pixels=2**24).convert("RGB").tobytes() == seen.tobytes()
    assert {e["request_id"] for e in fb} == {logged["id"], "from-another-replica"}
    from vloop.privacy import read_opt_outs

    assert len(read_opt_outs(lake)) == 1  # dave's key, for the daily DAG and the dataset builder
    rec = inter[0]
    assert "[EMAIL]" in rec["question"] and "[PHONE]" in rec["question"] and "[CN_ID]" in rec["question"]
    assert rec["redactions"] >= 3
    everything = json.dumps(inter + fb, default=str)
    for secret in planted + ["bob", "dave", "carol"]:
        assert secret not in everything
    assert any("[BANK_CARD]" in (e["edited_text"] or "") for e in fb)


def distinct_photo(sample, n: int):
    """``sample``'s picture with ``n`` written into its top row of pixels: a different photo (a
    different content hash) for every request."""
    img = sample.image.convert("RGB").copy()
    for bit in range(24):
        img.putpixel((bit, 0), (255, 255, 255) if n >> bit & 1 else (0, 0, 0))
    return img


def test_kill_9_loses_no_acknowledged_record(base_model_dir, tmp_path):
    """kill -9 three times under load, every request with its own photo: every acknowledged record
    is in the lake once, and the image behind each is there, hashes to its key and has the pixels
    that were sent (a record that outlives a crash must not point at a lost or cut-short photo)."""
    import hashlib
    from itertools import count

    import numpy as np

    lake_url = (tmp_path / "lake").as_uri()
    srv = Server(base_model_dir, lake_url, tmp_path)
    s = World(9).sample(0, intents=("colour",))
    acked, sent, numbers = [], {}, count()

    def traffic(worker, stop):
        while not stop.is_set():
            n = next(numbers)
            img = distinct_photo(s, n)
            body = chat_body(s, user=f"w{worker}-{n}")
            body["messages"][0]["content"][0]["image_url"]["url"] = data_url(img)
            try:
                r = srv.post("/v1/chat/completions", body)
            except requests.RequestException:
                return
            if r.status_code == 200:
                sent[r.json()["id"]] = np.asarray(img)
                acked.append(r.json()["id"])

    for _ in range(3):
        srv.start()  # the same spool and state each time: what the dead process left is shipped
        stop, first = threading.Event(), len(acked)
        threads = [threading.Thread(target=traffic, args=(w, stop)) for w in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acked) >= first + 20, 60, "traffic")
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        stop.set()
        for t in threads:
            t.join()
    n_acked = len(acked)
    srv.start()
    try:
        lake = open_lake(lake_url)
        wait_for(lambda: len(lake_table(lake, "raw/interactions", INTERACTION.arrow)) >= n_acked, 60, "shipping")
        time.sleep(1)
    finally:
        srv.stop()
    table = lake_table(lake, "raw/interactions", INTERACTION.arrow)
    ids = table.column("request_id").to_pylist()
    assert set(acked) <= set(ids)
    assert len(ids) == len(set(ids))  # exactly once
    keys = dict(zip(ids, table.column("image_key").to_pylist()))
    verified = 0
    for rid in acked:
        data = lake.get_bytes(keys[rid])  # present
        assert hashlib.sha256(data).hexdigest() in keys[rid], rid  # the bytes the key names
        got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(got, sent[rid]), rid  # the pixels that were sent
        verified += 1
    assert len({keys[r] for r in acked}) == n_acked  # distinct photos
    print(f"kill -9 x3: {n_acked} acknowledged, {len(set(acked) & set(ids))} found once in the lake, "
          f"{verified} images verified (present, hash, pixels)")


def test_adapter_loads_from_a_lake_prefix(server, adapters):
    """lora_path may name an adapter stored in the lake (adapters/<name>/<version>/)."""
    lake = open_lake((server.home / "lake").as_uri())
    for f in adapters["count"].iterdir():
        lake.put_bytes(f"adapters/count/7/{f.name}", f.read_bytes())
    r = server.post("/v1/load_lora_adapter", {"lora_name": "count@7", "lora_path": "adapters/count/7"}, token=TOKEN)
    assert r.status_code == 200, r.text
    s = World(4).sample(0, intents=("count",))
    from_lake = server.post("/v1/chat/completions", chat_body(s, model="count@7")).json()
    server.post("/v1/load_lora_adapter", {"lora_name": "count", "lora_path": str(adapters["count"])}, token=TOKEN)
    from_disk = server.post("/v1/chat/completions", chat_body(s, model="count")).json()
    assert from_lake["choices"][0]["message"]["content"] == from_disk["choices"][0]["message"]["content"]
    r = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "adapters/none/1"}, token=TOKEN)
    assert r.status_code == 400
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "count@7"}, token=TOKEN).ok


def test_routes_persist_across_restarts(tmp_path):
    from serving.routing import Routes, RouteStore

    store = RouteStore(tmp_path / "routes.json")
    assert store.routes == Routes()
    store.set(Routes(champion="a@1", canary="a@2", canary_share=0.1, holdout_share=0.05))
    again = RouteStore(tmp_path / "routes.json")
    assert again.routes == Routes(champion="a@1", canary="a@2", canary_share=0.1, holdout_share=0.05)
    with pytest.raises(ValueError, match="holdout_share must be below 1"):
        store.set(Routes(canary="b", canary_share=0.8, holdout_share=1.0))
    with pytest.raises(ValueError, match="needs a canary adapter"):
        store.set(Routes(canary_share=0.1))
    assert RouteStore(tmp_path / "routes.json").routes.canary == "a@2"  # a refused change is not saved
