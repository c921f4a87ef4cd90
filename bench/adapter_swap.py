#!/usr/bin/env python
"""Latency and failures of requests served while LoRA adapters are loaded and unloaded, against
the same traffic with no swap going on, in the same run.

Builds the tiny Qwen3-VL (pretrained briefly), trains two small LoRA adapters, starts the serving
container (``python -m serving``) on loopback and keeps steady traffic on the base model and on
adapter A from client threads. Meanwhile it alternates quiet windows (nothing happens) with swap
episodes (adapter B loaded through the admin API, kept for a moment, unloaded). Every request's
start and end are recorded: one that overlaps a swap episode counts as "during a swap", one that
lies wholly inside a quiet window as "baseline". Both sets come from the same threads, the same
server and interleaved time, so machine noise hits them alike; the ratios of their p50 and p99
latencies say what a swap costs the requests in flight. Also prints load/unload times and failed
requests. Goal: no failures, and a swap p99 close to the baseline p99.

    python bench/adapter_swap.py           # 20 swap cycles
    python bench/adapter_swap.py --quick   # 5 swap cycles
    python bench/adapter_swap.py --upstream-vllm [--quick]

With ``--upstream-vllm`` the gateway fronts a real vLLM (``make vllm``; about a minute to start and
20 s of warm-up) that loads and serves the adapters, and the bench also measures vLLM's decode
throughput with and without an adapter in the same run (tokens/s, one request at a time, 64
tokens each with ``ignore_eos``).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from training.lora import LoraTrainConfig, train_lora
from vloop.sim.pretrain import PretrainConfig, pretrain_base
from vloop.sim.synth import World
from vloop.sim.tiny import build_tiny_model

HOLD_S = 0.3  # how long adapter B stays loaded in each swap episode
MIN_QUIET_S = 1.0  # shortest quiet window; otherwise as long as the episode before it
CLIENTS = 4  # traffic threads: half on the base model, half on adapter A


@dataclass
class Sample:
    start: float
    end: float
    model: str
    ok: bool
    detail: str = ""


def overlaps(s: Sample, windows: list[tuple[float, float]]) -> bool:
    return any(s.start < b and s.end > a for a, b in windows)


def inside(s: Sample, windows: list[tuple[float, float]]) -> bool:
    return any(s.start >= a and s.end <= b for a, b in windows)


def latency_ms(samples: list[Sample], q: float) -> float:
    lat = [(s.end - s.start) * 1000 for s in samples if s.ok]
    return float(np.percentile(lat, q)) if lat else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cycles", type=int, help="swap episodes (default 20, 5 with --quick)")
    ap.add_argument("--upstream-vllm", action="store_true", help="the gateway fronts a real vLLM (make vllm)")
    args = ap.parse_args()
    cycles = args.cycles or (5 if args.quick else 20)
    tmp = Path(tempfile.mkdtemp(prefix="vloop-swap-"))
    quiet = lambda line: None
    build_tiny_model(tmp / "tiny")
    pretrain_base(tmp / "tiny", tmp / "base", PretrainConfig(steps=40), log=quiet)
    train_lora(tmp / "base", World(1).samples(64), tmp / "a", LoraTrainConfig(steps=5), log=quiet)
    train_lora(tmp / "base", World(2).samples(64), tmp / "b", LoraTrainConfig(steps=5, seed=1), log=quiet)

    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    token = "bench-token"
    env = {**os.environ, "VLOOP_HOME": str(tmp), "VLOOP_ADMIN_TOKEN": token, "VLOOP_USER_KEY_SECRET": "bench"}
    vllm, upstream = None, []
    if args.upstream_vllm:
        from serving.vllm import VllmServer, prepare_model_dir

        t0 = time.perf_counter()
        vllm = VllmServer(prepare_model_dir(tmp / "base", tmp / "base-vllm"), port + 1000, tmp / "vllm.log").start()
        print(f"vLLM ready in {time.perf_counter() - t0:.0f} s", flush=True)
        upstream = ["--upstream", vllm.url]
    # Popen kept (not vloop.services): the server under measurement lives only for this run, in the
    # bench's own process group so that a Ctrl-C of the bench stops it too.
    server = subprocess.Popen([sys.executable, "-m", "serving", "--model", str(tmp / "base"), "--lake",
                               (tmp / "lake").as_uri(), "--port", str(port), *upstream], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
    auth = {"Authorization": f"Bearer {token}"}
    throughput = {}
    samples: list[Sample] = []
    episodes: list[tuple[float, float]] = []  # [load call start, unload call end]
    quiet_windows: list[tuple[float, float]] = []
    loads, unloads = [], []
    try:
        for _ in range(120):
            try:
                if requests.get(url + "/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert requests.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(tmp / "a")},
                             headers=auth).ok
        img = io.BytesIO()
        World(3).sample(0).image.save(img, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(img.getvalue()).decode()
        stop, lock = threading.Event(), threading.Lock()

        def traffic(model):
            s = requests.Session()
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = s.post(url + "/v1/chat/completions", timeout=60, json={
                        "model": model, "user": "bench", "max_tokens": 4, "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": image_url}},
                            {"type": "text", "text": "What colour is this?"}]}]})
                    ok, detail = r.status_code == 200, f"{r.status_code} {r.text[:200]}"
                except requests.RequestException as e:  # a dropped connection is a failure too, not a dead thread
                    ok, detail = False, repr(e)[:200]
                with lock:
                    samples.append(Sample(t0, time.perf_counter(), model, ok, "" if ok else detail))

        base_id = requests.get(url + "/v1/models").json()["data"][0]["id"]
        if vllm is not None:
            throughput = decode_throughput(vllm.url, image_url, {"base": base_id, "adapter": "a"},
                                           n=3 if args.quick else 10)
        threads = [threading.Thread(target=traffic, args=(m,)) for m in [base_id, "a"] * (CLIENTS // 2)]
        for t in threads:
            t.start()
        # Warm-up outside both sets: a model's first requests allocate and compile.
        while len(samples) < 2 * CLIENTS:
            time.sleep(0.05)
        quiet_s = MIN_QUIET_S
        for i in range(cycles):
            # A quiet window first (and one after the last episode), as long as an episode, so
            # both sets get about as many requests from the same stretch of the run.
            t_q = time.perf_counter()
            time.sleep(quiet_s)
            quiet_windows.append((t_q, time.perf_counter()))
            t_ep = time.perf_counter()
            r = requests.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(tmp / "b")},
                              headers=auth)
            loads.append(time.perf_counter() - t_ep)
            assert r.ok, r.text
            time.sleep(HOLD_S)
            t0 = time.perf_counter()
            r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "b"}, headers=auth)
            unloads.append(time.perf_counter() - t0)
            assert r.ok, r.text
            episodes.append((t_ep, time.perf_counter()))
            quiet_s = max(MIN_QUIET_S, episodes[-1][1] - episodes[-1][0])
            print(f"cycle {i + 1}/{cycles}: load {loads[-1] * 1000:.0f} ms, unload {unloads[-1] * 1000:.0f} ms, "
                  f"{sum(s.ok for s in samples)} requests answered so far, "
                  f"{sum(not s.ok for s in samples)} failed", flush=True)
        t_q = time.perf_counter()
        time.sleep(quiet_s)
        quiet_windows.append((t_q, time.perf_counter()))
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=60)
        if vllm is not None:
            vllm.stop()

    failed = [s for s in samples if not s.ok]
    during = [s for s in samples if overlaps(s, episodes)]
    baseline = [s for s in samples if inside(s, quiet_windows) and not overlaps(s, episodes)]
    for f in failed[:5]:
        print("failed:", f.model, f.detail)
    print(f"\nload p50 {np.median(loads) * 1000:.0f} ms (max {max(loads) * 1000:.0f}), "
          f"unload p50 {np.median(unloads) * 1000:.0f} ms; {len(samples) - len(failed)} requests answered, "
          f"{len(failed)} failed (goal: none)")
    print(f"{'requests':26} {'n':>5} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for label, group in [("during a swap", during), ("baseline (quiet)", baseline)] + [
            (f"  {'base' if m == base_id else 'adapter ' + m}, during swap", [s for s in during if s.model == m])
            for m in (base_id, "a")] + [
            (f"  {'base' if m == base_id else 'adapter ' + m}, baseline", [s for s in baseline if s.model == m])
            for m in (base_id, "a")]:
        print(f"{label:26} {len(group):5} {sum(not s.ok for s in group):7} "
              f"{latency_ms(group, 50):8.1f} {latency_ms(group, 99):8.1f}")
    sp50, sp99 = latency_ms(during, 50), latency_ms(during, 99)
    bp50, bp99 = latency_ms(baseline, 50), latency_ms(baseline, 99)
    few = min(len(during), len(baseline)) < 100
    print(f"during a swap vs quiet: p50 x{sp50 / bp50:.2f}, p99 x{sp99 / bp99:.2f}"
          + (" (under 100 requests in a set: its p99 is about its maximum; run more --cycles)" if few else ""))
    extra = ""
    if throughput:
        ratio = throughput["adapter"] / throughput["base"]
        print(f"vLLM decode: {throughput['base']:.0f} tokens/s on the base, {throughput['adapter']:.0f} with an "
              f"adapter ({ratio:.2f}x)")
        extra = (f" backend=vllm vllm_tok_s_base={throughput['base']:.1f} vllm_tok_s_adapter={throughput['adapter']:.1f}"
                 f" adapter_ratio={ratio:.3f}")
    print(f"RESULT cycles={cycles} swap_n={len(during)} swap_p50_ms={sp50:.1f} swap_p99_ms={sp99:.1f} "
          f"baseline_n={len(baseline)} baseline_p50_ms={bp50:.1f} baseline_p99_ms={bp99:.1f} "
          f"p50_ratio={sp50 / bp50:.2f} p99_ratio={sp99 / bp99:.2f} "
          f"failures={len(failed)} swap_failures={sum(not s.ok for s in during)} "
          f"requests_ok={len(samples) - len(failed)} load_p50_ms={np.median(loads) * 1000:.1f} "
          f"load_max_ms={max(loads) * 1000:.1f} unload_p50_ms={np.median(unloads) * 1000:.1f}{extra}")


def decode_throughput(vllm_url: str, image_url: str, models: dict, n: int) -> dict:
    """Tokens/s of vLLM itself per model, one request at a time, 64 tokens each (ignore_eos), after
    a warm-up request per model (vLLM's first request compiles and allocates)."""
    out = {}
    for label, model in models.items():
        body = {"model": model, "max_tokens": 64, "ignore_eos": True, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What colour is this?"}]}]}
        requests.post(vllm_url + "/v1/chat/completions", json=body, timeout=300).raise_for_status()
        tokens, t0 = 0, time.perf_counter()
        for _ in range(n):
            r = requests.post(vllm_url + "/v1/chat/completions", json=body, timeout=120)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
        out[label] = tokens / (time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main()
