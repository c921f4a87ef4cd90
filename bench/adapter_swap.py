#!/usr/bin/env python
"""Adapter load time, and failed requests while adapters are loaded and unloaded under traffic.

Builds the tiny Qwen3-VL (pretrained briefly), trains two small LoRA adapters, starts the serving
container (``python -m serving``) on loopback, keeps steady traffic on the base model and on adapter
A from client threads, and meanwhile loads and unloads adapter B over and over through the admin
API. Prints load/unload times and the requests that failed (goal: none).

    python bench/adapter_swap.py           # 10 swap cycles
    python bench/adapter_swap.py --quick   # 3 swap cycles
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
from pathlib import Path

import numpy as np
import requests

from training.lora import LoraTrainConfig, train_lora
from vloop.pretrain import PretrainConfig, pretrain_base
from vloop.synth import World
from vloop.tiny import build_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--upstream-vllm", action="store_true", help="the gateway fronts a real vLLM (make vllm)")
    args = ap.parse_args()
    cycles = 3 if args.quick else 10
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
    server = subprocess.Popen([sys.executable, "-m", "serving", "--model", str(tmp / "base"), "--lake",
                               (tmp / "lake").as_uri(), "--port", str(port), *upstream], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
    auth = {"Authorization": f"Bearer {token}"}
    throughput = {}
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
        stop, ok, failed, lock = threading.Event(), [0], [], threading.Lock()

        def traffic(model):
            s = requests.Session()
            while not stop.is_set():
                r = s.post(url + "/v1/chat/completions", timeout=60, json={
                    "model": model, "user": "bench", "max_tokens": 4, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": "What colour is this?"}]}]})
                with lock:
                    if r.status_code == 200:
                        ok[0] += 1
                    else:
                        failed.append((model, r.status_code, r.text[:200]))

        base_id = requests.get(url + "/v1/models").json()["data"][0]["id"]
        if vllm is not None:
            throughput = decode_throughput(vllm.url, image_url, {"base": base_id, "adapter": "a"},
                                           n=3 if args.quick else 10)
        threads = [threading.Thread(target=traffic, args=(m,)) for m in (base_id, "a", base_id, "a")]
        for t in threads:
            t.start()
        loads, unloads = [], []
        for i in range(cycles):
            t0 = time.perf_counter()
            r = requests.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(tmp / "b")},
                              headers=auth)
            loads.append(time.perf_counter() - t0)
            assert r.ok, r.text
            time.sleep(0.3)
            t0 = time.perf_counter()
            r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "b"}, headers=auth)
            unloads.append(time.perf_counter() - t0)
            assert r.ok, r.text
            print(f"cycle {i + 1}/{cycles}: load {loads[-1] * 1000:.0f} ms, unload {unloads[-1] * 1000:.0f} ms, "
                  f"{ok[0]} requests answered so far, {len(failed)} failed", flush=True)
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=60)
        if vllm is not None:
            vllm.stop()
    for f in failed[:5]:
        print("failed:", f)
    print(f"load p50 {np.median(loads) * 1000:.0f} ms, unload p50 {np.median(unloads) * 1000:.0f} ms; "
          f"{ok[0]} requests answered, {len(failed)} failed (goal: none)")
    extra = ""
    if throughput:
        ratio = throughput["adapter"] / throughput["base"]
        print(f"vLLM decode: {throughput['base']:.0f} tokens/s on the base, {throughput['adapter']:.0f} with an "
              f"adapter ({ratio:.2f}x)")
        extra = (f" backend=vllm vllm_tok_s_base={throughput['base']:.1f} vllm_tok_s_adapter={throughput['adapter']:.1f}"
                 f" adapter_ratio={ratio:.3f}")
    print(f"RESULT cycles={cycles} load_p50_ms={np.median(loads) * 1000:.1f} load_max_ms={max(loads) * 1000:.1f} "
          f"unload_p50_ms={np.median(unloads) * 1000:.1f} requests_ok={ok[0]} requests_failed={len(failed)}{extra}")


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
