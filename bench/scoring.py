#!/usr/bin/env python
"""Teacher-forced answer scoring: batched against one sample at a time, same model and inputs.

Builds the tiny Qwen3-VL (or uses --model DIR), then scores the same N (image, question, answer)
triples twice: ``score_answers`` with one forward pass per batch, and a loop calling it with one
sample per call. Checks both give the same log-probabilities, prints samples/s for each and the
ratio (goal: batched >= 10x on CPU).

    python bench/scoring.py            # 512 samples, batch 64
    python bench/scoring.py --quick    # 128 samples
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from vloop.model import load_model, score_answers
from vloop.synth import World
from vloop.tiny import build_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", help="a Qwen3-VL directory (default: build the tiny one)")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    n = args.samples or (128 if args.quick else 512)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_tiny_model(f"{tmp}/tiny", seed=0)
        lm = load_model(path)
        print(f"model {path} on {lm.device} ({lm.model.num_parameters():,} parameters), "
              f"torch threads {torch.get_num_threads()}")
        ss = World(0).samples(n)
        images, questions, answers = [s.image for s in ss], [s.question for s in ss], [s.answer for s in ss]
        score_answers(lm, images[:8], questions[:8], answers[:8], batch_size=8)  # warm-up

        t0 = time.perf_counter()
        batched = score_answers(lm, images, questions, answers, batch_size=args.batch_size)
        t_batch = time.perf_counter() - t0
        print(f"batched   (batch {args.batch_size}): {n / t_batch:8.1f} samples/s  ({t_batch:.2f}s)", flush=True)

        t0 = time.perf_counter()
        single = []
        for i in range(n):
            single += score_answers(lm, images[i:i + 1], questions[i:i + 1], answers[i:i + 1])
            if (i + 1) % max(1, n // 4) == 0:
                el = time.perf_counter() - t0
                print(f"  one at a time: {i + 1}/{n}, {(i + 1) / el:.1f} samples/s, eta {(n - i - 1) * el / (i + 1):.0f}s",
                      flush=True)
        t_single = time.perf_counter() - t0
        print(f"one at a time:          {n / t_single:8.1f} samples/s  ({t_single:.2f}s)")

    diff = max(float(np.max(np.abs(np.subtract(a.token_logprobs, b.token_logprobs)))) for a, b in zip(batched, single))
    ratio = t_single / t_batch
    print(f"largest log-prob difference batched vs single: {diff:.2e}")
    print(f"speed-up {ratio:.1f}x (goal >= 10x) -> {'met' if ratio >= 10 else 'NOT met'}")
    print(f"RESULT samples={n} batch_size={args.batch_size} batched_sps={n / t_batch:.1f} "
          f"single_sps={n / t_single:.1f} ratio={ratio:.2f} max_logprob_diff={diff:.2e}")


if __name__ == "__main__":
    main()
