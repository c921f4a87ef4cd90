#!/usr/bin/env python
"""The gateway's own cost: latency it adds and the request rate it logs without loss.

An instant stub OpenAI-compatible backend (canned answer with logprobs) runs on loopback; the
gateway fronts it with ``--upstream`` and logging on (spool + shipper into a local lake). The
same chat requests go (a) straight to the stub and (b) through the gateway, one at a time, and the
difference per percentile is the added latency. Then client processes with keep-alive
connections push as hard as they can for a fixed time; every acknowledged request id must reach
the lake (zero loss).

Each is done twice: text-only requests, and requests carrying one phone photo (a 768x1024 JPEG of
about 160 KB with an EXIF orientation tag, in a data URL), since real traffic carries a photo.

    python bench/gateway_overhead.py           # 2,000 latency samples, 3 load levels x 10 s, per kind
    python bench/gateway_overhead.py --quick   # 300 samples, 2 levels x 4 s, per kind
Goals: text <= 1 ms added at p50 and >= 1,000 logged requests/s; image <= 2 ms and >= 500/s; on 2
cores, 0 lost.

    python bench/gateway_overhead.py --upstream-vllm [--quick]

replaces the stub with a real vLLM (``make vllm``) serving the tiny Qwen3-VL: the added latency
is then measured against a real model server, and the load levels are bounded by vLLM itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STUB = r'''
import json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ANSWER = {"id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
          "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "red"},
                       "logprobs": {"content": [{"token": "red", "logprob": -0.05, "top_logprobs": []}]}}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
BODY = json.dumps(ANSWER).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model", "parent": None}]}).encode()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):  # no Nagle: headers and body go out without a 40 ms delayed-ACK stall
        super().setup(); self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def _send(self, body):
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0))); self._send(BODY)
    def do_GET(self):
        self._send(MODELS)
    def log_message(self, *a): pass
class S(ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address): pass  # clients hanging up are not news
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

BODY = json.dumps({"model": "vloop", "user": "bench-user", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "What colour are these shoes?"}]}).encode()


def phone_photo(seed: int = 0, fine_noise: float = 7.0) -> bytes:
    """A phone-photo-like JPEG: 768x1024, smooth colour regions plus sensor-like noise, quality 85,
    an EXIF orientation tag (6: rotate on display), about 160 KB, which is what apps upload."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).resize((768, 1024), Image.BICUBIC)
    pixels = np.asarray(low).astype(np.float32) + rng.normal(0, fine_noise, (1024, 768, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, exif=exif)
    return buf.getvalue()


def image_body(photo: bytes) -> bytes:
    import base64

    url = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    return json.dumps({"model": "vloop", "user": "bench-user", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour are these shoes?"}]}]}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, path: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not come up")


def timed_requests(port: int, n: int, model: str = "vloop", template: bytes = BODY) -> np.ndarray:
    c = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for i in range(n):
        body = template.replace(b"bench-user", f"u{i}".encode(), 1).replace(b'"vloop"', json.dumps(model).encode(), 1)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        out.append(time.perf_counter() - t0)
        assert r.status == 200, r.status
    return np.array(out[n // 10:])  # drop warm-up


def _load_worker(port, seconds, worker, q, template=BODY):
    c = http.client.HTTPConnection("127.0.0.1", port)
    ids, errors, end, i = [], 0, time.time() + seconds, 0
    while time.time() < end:
        body = template.replace(b"bench-user", f"w{worker}-{i}".encode(), 1)
        i += 1
        try:
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status == 200:
                ids.append(json.loads(data)["id"])
            else:
                errors += 1
        except OSError:
            errors += 1
            c = http.client.HTTPConnection("127.0.0.1", port)
    q.put((ids, errors))


def load(port: int, clients: int, seconds: float, template: bytes = BODY) -> tuple[list[str], int, float]:
    q = mp.Queue()
    procs = [mp.Process(target=_load_worker, args=(port, seconds, w, q, template)) for w in range(clients)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    return [i for ids, _ in results for i in ids], sum(e for _, e in results), elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--upstream-vllm", action="store_true", help="a real vLLM instead of the stub (make vllm)")
    args = ap.parse_args()
    n = 300 if args.quick else 2000
    levels, seconds = ((2, 4), 4) if args.quick else ((2, 4, 8), 10)

    tmp = Path(tempfile.mkdtemp(prefix="vloop-bench-"))
    stub_port, gw_port = free_port(), free_port()
    env = {**os.environ, "VLOOP_HOME": str(tmp), "VLOOP_USER_KEY_SECRET": "bench", "VLOOP_ADMIN_TOKEN": "bench"}
    procs, vllm, backend = [], None, "stub"
    if args.upstream_vllm:
        from serving.vllm import VllmServer, prepare_model_dir
        from vloop.tiny import build_tiny_model

        n = 100 if args.quick else 500  # a real model answers in tens of ms, not tens of µs
        model = prepare_model_dir(build_tiny_model(tmp / "tiny"), tmp / "tiny-vllm")
        vllm = VllmServer(model, stub_port, tmp / "vllm.log").start()
        timed_requests(stub_port, 2, model="base")  # vLLM's first request warms it up (~20 s)
        backend = "vllm"
    else:
        procs.append(subprocess.Popen([sys.executable, "-c", STUB, str(stub_port)]))
    procs.append(subprocess.Popen([sys.executable, "-m", "serving", "--model", "stub", "--upstream",
                                   f"http://127.0.0.1:{stub_port}", "--lake", (tmp / "lake").as_uri(),
                                   "--port", str(gw_port), "--ship-interval", "0.5"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb")))
    try:
        wait_up(stub_port, "/v1/models")
        wait_up(gw_port, "/healthz")
        p = lambda a, q: float(np.percentile(a, q)) * 1000
        photo = phone_photo()
        kinds = {"text": (BODY, 1.0), "image": (image_body(photo), 2.0)}  # body, goal in ms at p50
        added, direct_p50, via_p50 = {}, {}, {}
        for kind, (template, goal) in kinds.items():
            direct = timed_requests(stub_port, n, model="base" if vllm else "vloop", template=template)
            via = timed_requests(gw_port, n, template=template)
            added[kind] = (p(via, 50) - p(direct, 50), p(via, 99) - p(direct, 99))
            direct_p50[kind], via_p50[kind] = p(direct, 50), p(via, 50)
            what = "text only" if kind == "text" else f"one {len(photo) // 1024} KB 768x1024 JPEG with EXIF"
            print(f"latency, {what}, one request at a time ({len(direct)} each):")
            print(f"  direct to {backend:<6} p50 {p(direct, 50):.2f} ms  p99 {p(direct, 99):.2f} ms")
            print(f"  through gateway  p50 {p(via, 50):.2f} ms  p99 {p(via, 99):.2f} ms")
            print(f"  added            p50 {added[kind][0]:.2f} ms  p99 {added[kind][1]:.2f} ms "
                  f"(goal <= {goal:g} ms at p50)", flush=True)

        from vloop.lake import INTERACTIONS_DATASET, open_lake
        from vloop.schema import INTERACTION
        import datetime as dt

        lake = open_lake((tmp / "lake").as_uri())
        best = dict.fromkeys(kinds, 0.0)
        acked_all = []
        for kind, (template, _) in kinds.items():
            for clients in levels:
                ids, errors, elapsed = load(gw_port, clients, seconds, template)
                acked_all += ids
                rate = len(ids) / elapsed
                print(f"load, {kind}: {clients} client processes for {seconds}s: {rate:,.0f} req/s acknowledged, "
                      f"{errors} errors", flush=True)
                if errors == 0:
                    best[kind] = max(best[kind], rate)
        # Zero loss: every acknowledged id is in the lake once the shipper has caught up.
        expected = len(acked_all) + n * len(kinds)  # the timed requests through the gateway too
        today = dt.datetime.now(dt.timezone.utc).date()
        deadline = time.time() + 120
        while time.time() < deadline:
            got = lake.read_partitions(INTERACTIONS_DATASET, today - dt.timedelta(days=1), today,
                                       columns=["request_id"], schema=INTERACTION.arrow)
            if got.num_rows >= expected:
                break
            time.sleep(1)
        ids = set(got.column("request_id").to_pylist())
        lost = len(set(acked_all) - ids)
        print(f"lake: {got.num_rows:,} records for {expected:,} acknowledged requests; lost {lost}, "
              f"duplicates {got.num_rows - len(ids)}")
        ok = lost == 0
        print(f"RESULT added_p50_ms={added['text'][0]:.3f} added_p99_ms={added['text'][1]:.3f} "
              f"sustained_logged_rps={best['text'] if ok else 0:.0f} image_added_p50_ms={added['image'][0]:.3f} "
              f"image_added_p99_ms={added['image'][1]:.3f} image_logged_rps={best['image'] if ok else 0:.0f} "
              f"lost={lost} image_kb={len(photo) // 1024} backend={backend}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        if vllm is not None:
            vllm.stop()


if __name__ == "__main__":
    main()
