"""The main job on embedded defaults: what `make demo` runs.

Today it runs the parts of the loop that exist, for real, on the configured lake (a local
directory by default):

1. the model: the base named by ``VLOOP_BASE_MODEL``, or else the tiny Qwen3-VL built and
   pretrained into a mediocre champion under ``$VLOOP_HOME/models`` (once, about 2 minutes);
2. a day of traffic: synthetic users from :mod:`vloop.sim.synth` ask about product photos (some of
   them degraded), the model answers with per-token log-probabilities and a confidence, and the
   users react as their ground truth dictates (accept a right answer; edit, regenerate or skip a
   wrong one);
3. the lake: interactions in hourly Parquet partitions, feedback events, content-addressed images;
4. the read-back: the day is read from the lake with a column subset and checked against what was
   written, and the figures printed (accuracy, acceptance, how well confidence predicts it) are
   computed from what came back.

Serving, the daily and the biweekly DAGs plug in here as they land. Nothing is faked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from vloop.store.lake import FEEDBACK_DATASET, Lake, partition_prefix
from vloop.store.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.store.schema import ARMS, FEEDBACK, INTERACTION


def ensure_base_model(home: Path, log=print) -> Path:
    """The tiny pretrained base under ``home/models/base``, built on first use."""
    from vloop.sim.pretrain import pretrain_base
    from vloop.sim.tiny import build_tiny_model

    base = Path(home) / "models" / "base"
    if (base / "eval.json").is_file():
        return base
    tiny = Path(home) / "models" / "tiny"
    log(f"building the tiny Qwen3-VL in {tiny} ...")
    build_tiny_model(tiny, seed=0)
    log("pretraining it into the base model (about 2 minutes on 2 cores) ...")
    pretrain_base(tiny, base, log=lambda line: log("  " + line))
    return base


def _reaction(sample, right: bool, rng: random.Random) -> tuple[str, str | None]:
    """How a user reacts to an answer, given whether it was right."""
    if right:
        return rng.choices(["accept", "dwell", "close"], weights=[80, 15, 5])[0], None
    kind = rng.choices(["edit", "regenerate", "skip", "close"], weights=[50, 20, 20, 10])[0]
    return kind, (sample.answer if kind == "edit" else None)


def synthetic_day(lake: Lake, lm, day: dt.date, n: int = 300, seed: int = 0, batch_size: int = 32,
                  log=print) -> dict:
    """``n`` users ask ``lm`` about product photos on ``day``; interactions, feedback and images go
    to ``lake``. Returns what was written."""
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


def simulated_day(lake: Lake, day: dt.date, n: int = 1000, *, seed: int = 0, pool: int = 200,
                  accuracy: float = 0.6, missing_logprobs: float = 0.0, base_model: str = "sim-base",
                  adapter: str | None = None, canary_share: float = 0.0, corrupt: int = 0,
                  intents: tuple[str, ...] | None = None) -> dict:
    """A day of traffic without a model: ``n`` questions about ``pool`` product photos, answered
    right with probability ``accuracy`` (confidence drawn higher for right answers), with the user
    reactions of :func:`synthetic_day`. Fast enough for a million rows (benchmarks, DAG tests).
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


def run_demo(lake: Lake, day: dt.date, n: int = 300, seed: int = 0, base_model: str | None = None,
             home: Path | None = None, out=print) -> dict:
    """Answer a synthetic day with the base model, store it, read it back, check it, report it."""
    from vloop.store.config import load_settings
    from vloop.vlm.model import load_model

    settings = load_settings()
    out(f"lake: {lake.url}")
    model_path = base_model or settings.base_model or ensure_base_model(home or settings.home, log=out)
    lm = load_model(model_path)
    out(f"model: {model_path} ({lm.model.num_parameters():,} parameters, {lm.device})")
    t0 = time.perf_counter()
    written = synthetic_day(lake, lm, day, n=n, seed=seed, log=out)
    out(f"wrote {written['interactions']} interactions in {written['hours']} hourly partitions "
        f"and {written['feedback']} feedback events for {day} in {time.perf_counter() - t0:.1f}s")
    result = verify_day(lake, day, written["request_ids"], out=out)
    result["daily"] = run_daily(lake, day, out=out)
    return result


def run_daily(lake: Lake, day: dt.date, out=print) -> dict:
    """The feedback_daily DAG's steps on ``day``, in-process (Label Studio left out: the demo
    needs no server), ending with the HTML report."""
    from vloop.curate import daily

    run_time = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), dt.timezone.utc)
    steps = [("ingest", lambda: daily.ingest(lake, day, run_time)), ("validate", lambda: daily.validate(lake, day)),
             ("mine", lambda: daily.mine_feedback(lake, day)), ("confidence", lambda: daily.score_confidence(lake, day)),
             ("image quality", lambda: daily.check_images(lake, day)),
             ("select", lambda: daily.select_for_labelling(lake, day)), ("report", lambda: daily.report(lake, day))]
    results = {}
    for name, step in steps:
        t0 = time.perf_counter()
        results[name] = step()
        shown = {k: v for k, v in results[name].items() if k != "day" and not isinstance(v, dict)}
        out(f"daily {name:13s} {time.perf_counter() - t0:5.1f}s  {shown}")
    page = daily.key(daily.REPORTS, day, "index.html")
    out(f"report: {lake.browser_url(page)}")
    return results


def verify_day(lake: Lake, day: dt.date, expected_ids: list[str], out=print) -> dict:
    """Read ``day`` back from the lake, check it holds exactly ``expected_ids`` and their images,
    and report what the users made of the answers."""
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
