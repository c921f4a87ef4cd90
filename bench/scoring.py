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

    diff = max(float(np.max(np.abs(np.subtract(a.token_logprobs, b.token_logprobs)))) for a, b in zip(batched, single))
    ratio = t_single / t_batch
    for name, t, c, enc in (("batched", t_batch, c_batch, t_enc_batch), ("one at a time", t_single, c_single, t_enc_single)):
        print(f"{name:14s}: {n / t:8.1f} samples/s, {1e3 * t / n:6.2f} ms/sample "
              f"(preprocessing {1e3 * enc / n:5.2f}, model and gather {1e3 * max(t - enc, 0) / n:5.2f}; "
              f"cpu {1e3 * c / n:6.2f} ms/sample)")
    print(f"largest log-prob difference batched vs single: {diff:.2e}")
    print(f"speed-up {ratio:.1f}x (goal >= 10x) -> {'met' if ratio >= 10 else 'NOT met'}")
    print(f"RESULT samples={n} batch_size={args.batch_size} threads={torch.get_num_threads()} "
          f"batched_sps={n / t_batch:.1f} single_sps={n / t_single:.1f} ratio={ratio:.2f} "
          f"cpu_ratio={c_single / c_batch:.2f} max_logprob_diff={diff:.2e}")


if __name__ == "__main__":
    main()
