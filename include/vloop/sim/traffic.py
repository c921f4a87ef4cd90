"""Simulated traffic written straight into the lake: no model, no gateway.

:func:`simulated_day` lays down a day of interactions (hourly partitions, as the gateway's shipper
writes them), feedback events and product photos from the :mod:`vloop.sim.synth` world, with
answers right at a chosen rate. Tests of the daily and biweekly DAGs, erasure and late data use it,
and so do the benchmarks (``bench/daily_fixed_costs.py``, ``bench/label_studio_push.py``). The
demo (:mod:`vloop.sim.demo_loop`) sends its traffic through the running gateway instead.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa

from vloop.store.lake import FEEDBACK_DATASET, Lake
from vloop.store.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.store.schema import FEEDBACK, INTERACTION


def simulated_day(lake: Lake, day: dt.date, n: int = 1000, *, seed: int = 0, pool: int = 200,
                  accuracy: float = 0.6, missing_logprobs: float = 0.0, base_model: str = "sim-base",
                  adapter: str | None = None, canary_share: float = 0.0, corrupt: int = 0,
                  intents: tuple[str, ...] | None = None) -> dict:
    """A day of traffic without a model: ``n`` questions about ``pool`` product photos, answered
    right with probability ``accuracy`` (confidence drawn higher for right answers); users accept,
    dwell on or close a right answer and edit (with the true answer), regenerate, skip or close a
    wrong one. Fast enough for a million rows (benchmarks, DAG tests).
    ``missing_logprobs`` of the rows carry neither confidence nor logprobs (they need re-scoring);
    the first ``corrupt`` rows are broken (confidence 1.5, negative latency) for quality tests."""
    from vloop.sim.synth import World

    samples = World(seed).samples(pool, degraded=0.15, **({"intents": intents} if intents else {}))
    stored = [lake.put_image(s.image_bytes()) for s in samples]
    rng = np.random.default_rng([seed, day.toordinal()])
    pick = rng.integers(0, pool, n)
    right = rng.random(n) < accuracy
    conf = np.where(right, rng.beta(8, 2, n), rng.beta(2, 5, n))
    answers = [s.answer for s in samples]
    wrong = [answers[(i + 1 + j) % pool] for i, j in zip(pick, rng.integers(0, pool - 1, n))]
    start = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    ts = pd.to_datetime(start) + pd.to_timedelta(np.sort(rng.integers(0, 86_400_000_000, n)), unit="us")
    canary = rng.random(n) < canary_share
    no_lp = rng.random(n) < missing_logprobs
    ids = [f"{day:%Y%m%d}-{seed}-{i:08d}" for i in range(n)]
    lp = np.log(np.clip(conf, 1e-6, 1))
    inter = {
        "request_id": ids, "ts": ts, "user_key": [f"u{u:06d}" for u in rng.integers(0, max(n // 20, 1), n)],
        "session_id": [f"s{u:07d}" for u in rng.integers(0, max(n // 5, 1), n)],
        "category": [samples[i].category for i in pick],
        "image_sha256": [stored[i].sha256 for i in pick], "image_key": [stored[i].key for i in pick],
        "image_w": [stored[i].width for i in pick], "image_h": [stored[i].height for i in pick],
        "question": [samples[i].question for i in pick],
        "answer": [answers[i] if r else w for i, r, w in zip(pick, right, wrong)],
        "token_logprobs": [None if m else [float(x)] * 3 for x, m in zip(lp, no_lp)],
        "confidence": [None if m else float(c) for c, m in zip(conf, no_lp)],
        "latency_ms": rng.gamma(4, 40, n),
        "base_model": [base_model] * n, "adapter": [adapter if c else None for c in canary],
        "arm": np.where(canary, "canary", "champion"), "status": ["ok"] * n, "redactions": [0] * n,
        "app": [None] * n,
    }
    for i in range(min(corrupt, n)):
        inter["confidence"][i], inter["latency_ms"][i] = 1.5, -1.0
    kinds = np.where(right, rng.choice(["accept", "dwell", "close"], n, p=[0.8, 0.15, 0.05]),
                     rng.choice(["edit", "regenerate", "skip", "close"], n, p=[0.5, 0.2, 0.2, 0.1]))
    fb = {
        "event_id": [f"e{x}" for x in ids], "request_id": ids,
        "ts": ts + pd.to_timedelta(rng.integers(2, 90, n), unit="s"), "type": kinds,
        "edited_text": [answers[i] if k == "edit" else None for i, k in zip(pick, kinds)],
        "dwell_ms": [int(d) if k == "dwell" else None for d, k in zip(rng.integers(3000, 30000, n), kinds)],
        "rating": [None] * n,
    }
    lake.write_hourly(INTERACTIONS, pa.Table.from_pydict(inter, schema=INTERACTION.arrow), day)
    lake.write_partition(FEEDBACK_DATASET, pa.Table.from_pydict(fb, schema=FEEDBACK.arrow), day)
    return {"interactions": n, "feedback": n, "request_ids": ids, "right": right,
            "truth": {rid: answers[i] for rid, i in zip(ids, pick)}}
