#!/usr/bin/env python
"""The gateway's own cost: latency it adds and the request rate it logs without loss.

An instant stub OpenAI-compatible backend (canned answer with logprobs) runs on loopback; the
gateway fronts it with ``--upstream`` and logging on (spool + shipper into a local lake). The
same chat requests go (a) straight to the stub and (b) through the gateway, one at a time, and the
difference per percentile is the added latency. Then client processes with keep-alive
connections push as hard as they can for a fixed time; every acknowledged request id must reach
the lake (zero loss).

    python bench/gateway_overhead.py           # 2,000 latency samples, 3 load levels x 10 s
    python bench/gateway_overhead.py --quick   # 300 samples, 2 levels x 4 s
Goals: <= 1 ms added at p50; >= 1,000 logged requests/s on 2 cores.

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


def timed_requests(port: int, n: int, model: str = "vloop") -> np.ndarray:
    c = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for i in range(n):
        body = BODY.replace(b"bench-user", f"u{i}".encode()).replace(b'"vloop"', json.dumps(model).encode())
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        out.append(time.perf_counter() - t0)
        assert r.status == 200, r.status
    return np.array(out[n // 10:])  # drop warm-up


def _load_worker(port, seconds, worker, q):
    c = http.client.HTTPConnection("127.0.0.1", port)
    ids, errors, end, i = [], 0, time.time() + seconds, 0
    while time.time() < end:
        body = BODY.replace(b"bench-user", f"w{worker}-{i}".encode())
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


def load(port: int, clients: int, seconds: float) -> tuple[list[str], int, float]:
    q = mp.Queue()
    procs = [mp.Process(target=_load_worker, args=(port, seconds, w, q)) for w in range(clients)]
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
        direct = timed_requests(stub_port, n, model="base" if vllm else "vloop")
        via = timed_requests(gw_port, n)
        p = lambda a, q: float(np.percentile(a, q)) * 1000
        added50, added99 = p(via, 50) - p(direct, 50), p(via, 99) - p(direct, 99)
        print(f"latency, one request at a time ({len(direct)} each):")
        print(f"  direct to {backend:<6} p50 {p(direct, 50):.2f} ms  p99 {p(direct, 99):.2f} ms")
        print(f"  through gateway  p50 {p(via, 50):.2f} ms  p99 {p(via, 99):.2f} ms")
        print(f"  added            p50 {added50:.2f} ms  p99 {added99:.2f} ms (goal <= 1 ms at p50)")

        from vloop.lake import INTERACTIONS_DATASET, open_lake
        from vloop.schema import INTERACTION
        import datetime as dt

        lake = open_lake((tmp / "lake").as_uri())
        best = 0.0
        acked_all = []
        for clients in levels:
            ids, errors, elapsed = load(gw_port, clients, seconds)
            acked_all += ids
            rate = len(ids) / elapsed
            print(f"load: {clients} client processes for {seconds}s: {rate:,.0f} req/s acknowledged, {errors} errors",
                  flush=True)
            if errors == 0:
                best = max(best, rate)
        # Zero loss: every acknowledged id is in the lake once the shipper has caught up.
        expected = len(acked_all) + n  # the direct requests never passed the gateway
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
        sustained = best if lost == 0 else 0.0
        print(f"RESULT added_p50_ms={added50:.3f} added_p99_ms={added99:.3f} sustained_logged_rps={sustained:.0f} "
              f"lost={lost} direct_p50_ms={p(direct, 50):.3f} gateway_p50_ms={p(via, 50):.3f} backend={backend}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        if vllm is not None:
            vllm.stop()


if __name__ == "__main__":
    main()
