"""How long the daily pipeline takes on a big day, and how much memory it needs.

A simulated day (``vloop.demo.simulated_day``: N interactions about a pool of product photos,
one feedback event each) goes through ingest → validate → mine → confidence → select → report
on a local lake, the Label Studio push excluded (see bench/label_studio_push.py). Each step runs
in its own fresh process, as an Airflow task would, and prints its wall time and peak RSS.
Goal (issue #5): 1,000,000 interactions in <= 60 s in total and <= 4 GB on 2 cores.

    python bench/daily_pipeline.py            # 1,000,000 interactions
    python bench/daily_pipeline.py --quick    # 100,000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ["ingest", "validate", "mine_feedback", "score_confidence", "select_for_labelling", "report"]
DAY = dt.date(2026, 11, 20)

CHILD = """
import datetime as dt, json, resource, sys, time
from vloop import daily
from vloop.lake import LocalLake
lake = LocalLake(sys.argv[1], max_image_bytes=2**24, max_image_pixels=2**24)
day = dt.date.fromisoformat(sys.argv[3])
step = getattr(daily, sys.argv[2])
t = time.perf_counter()
if sys.argv[2] == "ingest":
    step(lake, day, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), dt.timezone.utc))
elif sys.argv[2] == "select_for_labelling":
    daily.check_images(lake, day)
    step(lake, day)
else:
    step(lake, day)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = args.rows or (100_000 if args.quick else 1_000_000)
    from vloop.demo import simulated_day
    from vloop.lake import LocalLake

    with tempfile.TemporaryDirectory() as tmp:
        lake = LocalLake(Path(tmp) / "lake", max_image_bytes=2**24, max_image_pixels=2**24)
        t = time.perf_counter()
        simulated_day(lake, DAY, n, seed=1, corrupt=n // 1000)
        print(f"simulated {n:,} interactions + {n:,} feedback events in {time.perf_counter() - t:.1f}s "
              "(not counted)", flush=True)
        total, peak = 0.0, 0.0
        for step in STEPS:
            out = subprocess.run([sys.executable, "-c", CHILD, str(lake.root), step, DAY.isoformat()],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{step} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            total += r["seconds"]
            peak = max(peak, r["peak_rss_mb"])
            print(f"{step:22s} {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
        print(f"total {total:.1f} s (goal <= 60 s), peak {peak / 1024:.2f} GB (goal <= 4 GB)")
        print(f"RESULT rows={n} total_s={total:.1f} peak_gb={peak / 1024:.2f} "
              f"goal_time_met={total <= 60} goal_memory_met={peak <= 4096}")


if __name__ == "__main__":
    main()
