#!/usr/bin/env python
"""Teacher-forced answer scoring: batched against one sample at a time, same model and inputs.

Builds the tiny Qwen3-VL (or uses --model DIR), then scores the same N (image, question, answer)
triples twice: ``score_answers`` with one forward pass per batch, and a loop calling it with one
sample per call. Checks both give the same log-probabilities, prints samples/s for each and the
ratio (goal: batched >= 10x).

On a shared machine other processes' load swings wall-clock times by whole factors, so each way
is timed in several interleaved rounds and the best round counts (``--rounds``); process CPU time
is printed alongside. Where the time goes: the preprocessing share (images, chat template,
tokeniser: ``vloop.vlm.model.encode``) is timed on its own, the rest is the model's forward pass and
the log-probability gather.

    python bench/scoring.py            # 512 samples, batch 64
    python bench/scoring.py --quick    # 128 samples
    python bench/scoring.py --threads 1
    python bench/scoring.py --quick --vllm          # also on a vLLM from .venv-vllm, same model
    python bench/scoring.py --server-url http://127.0.0.1:8100   # a running vLLM serving --model

With ``--vllm`` or ``--server-url`` the same samples are also scored on the server
(``vloop.vlm.scoring_client``: one request per sample, ``--server-concurrency`` at a time; see that
module for why 1 on a CPU vLLM), which the daily step uses when ``VLOOP_SCORING_URL`` is set: its
samples/s and its largest log-prob difference from the local scores are printed too. On a CPU
both compete for the same cores, so the figure says what a CPU-only host gets, not a GPU server.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from vloop.vlm.model import encode, load_model, score_answers
from vloop.sim.synth import World
from vloop.sim.tiny import build_tiny_model


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", help="a Qwen3-VL directory (default: build the tiny one)")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds, best counts (default 3, --quick 2)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--vllm", action="store_true", help="also score on a vLLM started from .venv-vllm")
    ap.add_argument("--server-url", help="also score on this running vLLM (serving the same model)")
    ap.add_argument("--server-concurrency", type=int, default=1)
    args = ap.parse_args()
    n = args.samples or (128 if args.quick else 512)
    rounds = args.rounds or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_tiny_model(f"{tmp}/tiny", seed=0)
        lm = load_model(path)
        print(f"model {path} on {lm.device} ({lm.model.num_parameters():,} parameters), "
              f"torch threads {torch.get_num_threads()}")
        ss = World(0).samples(n)
        images, questions, answers = [s.image for s in ss], [s.question for s in ss], [s.answer for s in ss]
        score_answers(lm, images[:8], questions[:8], answers[:8], batch_size=8)  # warm-up

        def batched_pass():
            return score_answers(lm, images, questions, answers, batch_size=args.batch_size)

        def single_pass():
            return [score_answers(lm, images[i:i + 1], questions[i:i + 1], answers[i:i + 1])[0] for i in range(n)]

        def encode_batched():  # the preprocessing share of batched_pass
            return [encode(lm.processor, images[s:s + args.batch_size], questions[s:s + args.batch_size],
                           answers[s:s + args.batch_size]) for s in range(0, n, args.batch_size)]

        def encode_single():  # the preprocessing share of single_pass
            return [encode(lm.processor, images[i:i + 1], questions[i:i + 1], answers[i:i + 1]) for i in range(n)]

        ways = (("batched", batched_pass), ("single", single_pass), ("encode_batched", encode_batched),
                ("encode_single", encode_single))
        best = {name: (float("inf"), 0.0) for name, _ in ways}
        outputs = {}
        for r in range(rounds):
            for name, fn in ways:
                outputs[name], wall, cpu = timed(fn)
                if not name.startswith("encode"):
                    print(f"  round {r + 1} {name:8s}: {n / wall:8.1f} samples/s  ({wall:.2f}s wall, {cpu:.2f}s cpu)",
                          flush=True)
                best[name] = min(best[name], (wall, cpu))
        batched, single = outputs["batched"], outputs["single"]
        (t_batch, c_batch), (t_single, c_single) = best["batched"], best["single"]
        t_enc_batch, t_enc_single = best["encode_batched"][0], best["encode_single"][0]
        server = None
        if args.vllm or args.server_url:
            server = server_scores(args, path, tmp, images, questions, answers, rounds)

    diff = max(float(np.max(np.abs(np.subtract(a.token_logprobs, b.token_logprobs)))) for a, b in zip(batched, single))
    ratio = t_single / t_batch
    for name, t, c, enc in (("batched", t_batch, c_batch, t_enc_batch), ("one at a time", t_single, c_single, t_enc_single)):
        print(f"{name:14s}: {n / t:8.1f} samples/s, {1e3 * t / n:6.2f} ms/sample "
              f"(preprocessing {1e3 * enc / n:5.2f}, model and gather {1e3 * max(t - enc, 0) / n:5.2f}; "
              f"cpu {1e3 * c / n:6.2f} ms/sample)")
    print(f"largest log-prob difference batched vs single: {diff:.2e}")
    print(f"speed-up {ratio:.1f}x (goal >= 10x) -> {'met' if ratio >= 10 else 'NOT met'}")
    extra = ""
    if server is not None:
        t_server, got = server
        sdiff = max(float(np.max(np.abs(np.subtract(a.token_logprobs, b)))) if b else 0.0
                    for a, b in zip(batched, got))
        print(f"{'vLLM server':14s}: {n / t_server:8.1f} samples/s, {1e3 * t_server / n:6.2f} ms/sample "
              f"({args.server_concurrency} request(s) at a time); largest log-prob difference from local: {sdiff:.2e}")
        extra = f" server_sps={n / t_server:.1f} server_max_logprob_diff={sdiff:.2e}"
    print(f"RESULT samples={n} batch_size={args.batch_size} threads={torch.get_num_threads()} "
          f"batched_sps={n / t_batch:.1f} single_sps={n / t_single:.1f} ratio={ratio:.2f} "
          f"cpu_ratio={c_single / c_batch:.2f} max_logprob_diff={diff:.2e}{extra}")


def server_scores(args, model_path, tmp, images, questions, answers, rounds):
    """(best wall time of ``rounds``, per-sample answer log-probabilities) on a vLLM server."""
    from vloop.vlm.model import as_image
    from vloop.vlm.scoring_client import ScoreRequest, ScoringClient

    srv = None
    url = args.server_url
    if args.vllm:
        from pathlib import Path

        import socket

        from serving.vllm import VllmServer, prepare_model_dir

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        model = prepare_model_dir(model_path, Path(tmp) / "vllm-model")
        srv = VllmServer(model, port, Path(tmp) / "vllm.log").start()
        url = srv.url
    try:
        with ScoringClient(url, concurrency=args.server_concurrency) as client:
            base = client.models().base
            reqs = [ScoreRequest(base, as_image(im), q, a) for im, q, a in zip(images, questions, answers)]
            client.score(reqs[:4])  # warm-up (and the answers' tokenisations are cached per client)
            best, got = float("inf"), None
            for r in range(rounds):
                client._tokens.clear()  # each round pays for its /tokenize calls, as the daily step does
                got, wall, _ = timed(lambda: client.score(reqs))
                print(f"  round {r + 1} vLLM    : {len(reqs) / wall:8.1f} samples/s  ({wall:.2f}s wall)", flush=True)
                best = min(best, wall)
            bad = [g for g in got if isinstance(g, Exception)]
            if bad:
                raise SystemExit(f"{len(bad)} samples not scored on the server: {bad[0]}")
            return best, got
    finally:
        if srv is not None:
            srv.stop()


if __name__ == "__main__":
    main()
