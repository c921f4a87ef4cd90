"""A small day through the whole ``feedback_daily`` DAG under ``dag.test()``: what a first run costs.

A simulated day of ``--rows`` interactions (default 500, the demo's size) is written to a local lake
in a temporary directory, Airflow's metadata DB is migrated there (not counted), and the DAG runs
under ``dag.test()`` (every task in this process, one after another, as the tests and the demo run
it), without Label Studio (push and pull are skipped). It prints each task's time, the number of
task instances and the wall time of the run; the goal (issue #20) is <= 10 s for 500 rows.

    python bench/daily_dag_test.py
    python bench/daily_dag_test.py --rows 5000 --slice-rows 1000

Last line: ``RESULT dag_test_s=… rows=… task_instances=… slices=…``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAY = dt.date(2026, 9, 14)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--slice-rows", type=int, default=None, help="Variable vloop_slice_rows (default: the DAG's)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vloop-dagtest-"))
    lake_root = tmp / "lake"
    os.environ.update({
        "AIRFLOW_HOME": str(tmp / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW_CONN_VLOOP_LAKE": json.dumps({"conn_type": "generic", "extra": {"lake_url": lake_root.as_uri()}}),
        "AIRFLOW_VAR_VLOOP_LATE_DATA_GRACE_MINUTES": "0",  # the simulated day is long over
    })
    os.environ.pop("AIRFLOW_CONN_VLOOP_LABEL_STUDIO", None)
    if args.slice_rows:
        os.environ["AIRFLOW_VAR_VLOOP_SLICE_ROWS"] = str(args.slice_rows)
    sys.path.insert(0, str(ROOT / "plugins"))
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], check=True, capture_output=True)
    from vloop.sim.traffic import simulated_day
    from vloop.store.lake import LocalLake

    lake = LocalLake(lake_root, max_image_bytes=2**21, max_image_pixels=2**20)
    simulated_day(lake, DAY, args.rows, seed=2, pool=max(args.rows // 5, 1))
    print(f"metadata DB migrated and {args.rows} interactions simulated in {time.perf_counter() - t:.0f}s "
          "(not counted)", flush=True)

    from airflow.dag_processing.dagbag import DagBag

    t = time.perf_counter()
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["feedback_daily"]
    parse_s = time.perf_counter() - t
    t = time.perf_counter()
    logical = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    if os.environ.get("VLOOP_BENCH_PROFILE"):
        import cProfile
        cProfile.runctx("dag.test(logical_date=logical)", globals(), locals(), os.environ["VLOOP_BENCH_PROFILE"])
    run = dag.test(logical_date=logical)
    wall = time.perf_counter() - t
    tis = run.get_task_instances()
    for ti in sorted(tis, key=lambda ti: (ti.start_date is None, ti.start_date or 0)):
        secs = (ti.end_date - ti.start_date).total_seconds() if ti.start_date and ti.end_date else float("nan")
        name = ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else "")
        print(f"  {name:28s} {ti.state:8s} {secs:6.2f} s")
    slices = sum(1 for ti in tis if ti.task_id == "ingest")
    print(f"feedback_daily under dag.test(): {run.state} in {wall:.1f} s for {args.rows} rows "
          f"({len(tis)} task instances, {slices} slice(s); the DAG file parsed in {parse_s:.1f} s; goal <= 10 s)")
    print(f"RESULT dag_test_s={wall:.1f} rows={args.rows} task_instances={len(tis)} slices={slices} state={run.state}")


if __name__ == "__main__":
    main()
