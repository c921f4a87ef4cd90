"""Test fixtures: a day answered by a real model and written to the lake, and its read-back check.

Only tests use these (``tests/test_cli.py``): they answer with the model and so need one (the
``base_model_dir`` fixture). The traffic that tests, benchmarks and the DAG tests write without a
model is :func:`vloop.sim.traffic.simulated_day`; the demo is :mod:`vloop.sim.demo_loop`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import time
import uuid
from collections import Counter

import numpy as np

from vloop.store.lake import FEEDBACK_DATASET, Lake, partition_prefix
from vloop.store.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.store.schema import ARMS, FEEDBACK, INTERACTION


def _reaction(sample, right: bool, rng: random.Random) -> tuple[str, str | None]:
    """How a user reacts to an answer, given whether it was right."""
    if right:
        return rng.choices(["accept", "dwell", "close"], weights=[80, 15, 5])[0], None
    kind = rng.choices(["edit", "regenerate", "skip", "close"], weights=[50, 20, 20, 10])[0]
    return kind, (sample.answer if kind == "edit" else None)


def model_answered_day(lake: Lake, lm, day: dt.date, n: int = 300, seed: int = 0, batch_size: int = 32,
                       log=print) -> dict:
    """``n`` users of the :mod:`vloop.sim.synth` world ask ``lm`` (a loaded model) about product
    photos (some degraded) on ``day``; its answers carry their per-token log-probabilities and
    confidence, and each user reacts as the ground truth dictates (:func:`_reaction`). Interactions
    go to the lake in hourly partitions, as the gateway's shipper lays them out, with the feedback
    events and the images. Returns what was written (``request_ids`` for :func:`verify_day`)."""
    from vloop.vlm.model import generate, normalise_answer
    from vloop.sim.synth import World

    rng = random.Random(seed * 1_000_003 + day.toordinal())
    samples = World(seed + day.toordinal()).samples(n, degraded=0.15)
    rows, events = [], []
    t0 = time.perf_counter()
    for s in range(0, n, batch_size):
        chunk = samples[s:s + batch_size]
        started = time.perf_counter()
        gens = generate(lm, [x.image for x in chunk], [x.question for x in chunk], max_new_tokens=8)
        latency_ms = (time.perf_counter() - started) * 1000 / len(chunk)
        for x, g in zip(chunk, gens):
            stored = lake.put_image(x.image_bytes())
            ts = dt.datetime.combine(day, dt.time(rng.randrange(24), rng.randrange(60), rng.randrange(60)),
                                     dt.timezone.utc)
            request_id = str(uuid.UUID(int=rng.getrandbits(128)))
            rows.append({
                "request_id": request_id, "ts": ts,
                "user_key": hashlib.sha256(f"user{rng.randrange(80)}".encode()).hexdigest()[:32],
                "session_id": f"s{rng.randrange(200)}", "category": x.category,
                "image_sha256": stored.sha256, "image_key": stored.key,
                "image_w": stored.width, "image_h": stored.height,
                "question": x.question, "answer": g.text, "token_logprobs": g.token_logprobs,
                "confidence": g.confidence.geo_mean_prob, "latency_ms": latency_ms,
                "base_model": lm.name, "adapter": None, "arm": "champion", "status": "ok", "redactions": 0,
            })
            kind, edited = _reaction(x, normalise_answer(g.text) == normalise_answer(x.answer), rng)
            events.append({
                "event_id": str(uuid.UUID(int=rng.getrandbits(128))), "request_id": request_id,
                "ts": ts + dt.timedelta(seconds=rng.randint(2, 90)), "type": kind, "edited_text": edited,
                "dwell_ms": rng.randint(3000, 30000) if kind == "dwell" else None, "rating": None,
            })
        done = min(s + batch_size, n)
        el = time.perf_counter() - t0
        log(f"  answered {done}/{n} ({done / el:.0f}/s, eta {(n - done) * el / done:.0f}s)")
    # Hourly partitions as the gateway's shipper lays them out; re-running the day replaces it.
    hour_keys = lake.write_hourly(INTERACTIONS, INTERACTION.to_table(rows), day)
    lake.write_partition(FEEDBACK_DATASET, FEEDBACK.to_table(events), day)
    return {"interactions": n, "feedback": len(events), "hours": len(hour_keys),
            "request_ids": sorted(r["request_id"] for r in rows)}


def verify_day(lake: Lake, day: dt.date, expected_ids: list[str], out=print) -> dict:
    """Read ``day`` back from the lake (a column subset), raise RuntimeError unless it holds exactly
    ``expected_ids`` and their images, and return (and ``out``) what the users made of the answers:
    counts, arms, feedback types, partition files, acceptance and how well confidence predicts it
    (AUROC), all computed from what came back."""
    from vloop.vlm.model import auroc
    from vloop.curate.report import outcome_flags

    t0 = time.perf_counter()
    inter = lake.read_partitions(INTERACTIONS, day, day,
                                 columns=["request_id", "arm", "category", "confidence", "image_key"],
                                 schema=INTERACTION.arrow)
    fb = lake.read_partitions(FEEDBACK_DATASET, day, day, schema=FEEDBACK.arrow)
    t_read = time.perf_counter() - t0
    got_ids = sorted(inter.column("request_id").to_pylist())
    if got_ids != sorted(expected_ids):
        raise RuntimeError(f"read back {len(got_ids)} interactions for {day}, expected {len(expected_ids)}")
    images = set(inter.column("image_key").to_pylist())
    missing = [k for k in images if not lake.exists(k)]
    if missing:
        raise RuntimeError(f"{len(missing)} image objects are missing, e.g. {missing[0]}")
    out(f"read back {inter.num_rows} interactions ({len(inter.column_names)} of "
        f"{len(INTERACTION.names)} columns) and {fb.num_rows} feedback events in {t_read:.2f}s; "
        f"all request ids match, all {len(images)} images present")

    arms = Counter(inter.column("arm").to_pylist())
    types = Counter(fb.column("type").to_pylist())
    conf = dict(zip(inter.column("request_id").to_pylist(), inter.column("confidence").to_pylist()))
    # Acceptance as the report and the canary rollout define it (an ``accept`` event; dwell is not one).
    flags = outcome_flags(inter.select(["request_id"]).to_pandas(), fb.select(["request_id", "type"]).to_pandas())
    accepted = dict(zip(flags["request_id"], flags["accepted"]))
    ids = list(conf)
    acceptance = sum(accepted[r] for r in ids) / max(1, len(ids))
    sep = auroc([conf[r] for r in ids], [bool(accepted[r]) for r in ids])
    cats = Counter(inter.column("category").to_pylist())
    out("arms: " + ", ".join(f"{a}={arms.get(a, 0)}" for a in ARMS))
    out("feedback: " + ", ".join(f"{t}={c}" for t, c in types.most_common()))
    out("categories: " + ", ".join(f"{c}={k}" for c, k in sorted(cats.items())))
    c = np.asarray(list(conf.values()), dtype=float)
    out(f"acceptance {acceptance:.1%}; confidence mean {c.mean():.3f}, below 0.6: {(c < 0.6).mean():.1%}; "
        f"confidence predicts acceptance with AUROC {sep:.3f}")
    files = lake.list(partition_prefix(INTERACTIONS, day))
    out(f"partition files for {day}: {len(files)}")
    return {"interactions": inter.num_rows, "feedback": fb.num_rows, "images": len(images),
            "arms": dict(arms), "feedback_types": dict(types), "files": len(files),
            "acceptance": acceptance, "confidence_auroc": sep}
