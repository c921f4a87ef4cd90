"""The fixed costs of one feedback_daily slice task, paid whatever the slice's size (issue 20).

In one process, as ``dag.test()`` or a warm worker runs the slice tasks one after another: the
Great Expectations import, building its context, suites and validation definitions (once per
process, ``vloop.curate.quality._validations``), one validation run of 21 rows, and
``daily.validate_slice`` (both suites, the lake reads and writes) on the first slice and then on
the next 23 slices of a 500-row day cut into slices of 21 rows.

    python bench/daily_fixed_costs.py

The last line is ``RESULT import_gx_s=… build_ms=… run_interactions_ms=… run_feedback_ms=…
validate_slice_first_s=… validate_slice_ms=…`` (medians).
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path


def _ms(f, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    t = time.perf_counter()
    import great_expectations  # noqa: F401

    import_s = time.perf_counter() - t
    from vloop.curate import daily, quality
    from vloop.sim.traffic import simulated_day
    from vloop.curate.ingest import ingest_day
    from vloop.store.lake import LocalLake

    day = dt.date(2026, 9, 14)
    run_time = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), dt.timezone.utc)
    lake = LocalLake(Path(tempfile.mkdtemp()) / "lake", max_image_bytes=2**21, max_image_pixels=2**20)
    simulated_day(lake, day, 500, seed=2, pool=100)
    batch = ingest_day(lake, day, run_time)
    inter, fb = batch.interactions.iloc[:21], batch.feedback.iloc[:21]
    start = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    end = start + dt.timedelta(days=1)
    cfg = quality.QualityConfig()
    limits = (cfg.max_question_chars, cfg.max_answer_chars, cfg.max_latency_ms)

    def build():
        quality._validations.cache_clear()
        quality._validations(limits)

    build_ms = _ms(build)
    run_i = _ms(lambda: quality.validate_interactions(inter, start, end, lake=lake))
    run_f = _ms(lambda: quality.validate_feedback(fb))
    slices = daily.plan(lake, day, 21, run_time)
    for s in slices:
        daily.ingest_slice(lake, day, s, run_time)
    quality._validations.cache_clear()
    t = time.perf_counter()
    daily.validate_slice(lake, day, 0)
    first_s = time.perf_counter() - t
    later = statistics.median(_ms(lambda s=s: daily.validate_slice(lake, day, s), 1) for s in slices[1:24])
    print(f"import great_expectations {import_s:.2f} s; context + both suites + validation definitions "
          f"{build_ms:.0f} ms (once per process); validate_interactions of 21 rows {run_i:.0f} ms, "
          f"validate_feedback {run_f:.0f} ms (each call); validate_slice first {first_s:.2f} s, then {later:.0f} ms")
    print(f"RESULT import_gx_s={import_s:.2f} build_ms={build_ms:.0f} run_interactions_ms={run_i:.0f} "
          f"run_feedback_ms={run_f:.0f} validate_slice_first_s={first_s:.2f} validate_slice_ms={later:.0f}")


if __name__ == "__main__":
    main()
