"""How long the daily pipeline takes on a big day, and how much memory its mapped tasks need.

A simulated day of N interactions (one feedback event each) about a catalogue of at least
100,000 distinct product photos (``--images``; the photos are the simulation's renders, each made
distinct by a stamp of a few pixels, so every per-image step runs once per photo, as on real
traffic) is written to a local lake the way the gateways' shippers write it: interactions in
hourly partitions, feedback in segment files. Then ``feedback_daily``'s steps run as the DAG runs
them, without Airflow's scheduler: the day is cut into slices of ``--slice-rows`` interactions
(the DAG's Variable ``vloop_slice_rows``), and the slice steps (ingest, validate_slice, then
mine, confidence, image_quality) run as one task per slice on ``--workers`` worker processes (the local executor's
parallelism; default: one per core), each task a fresh process forked from a warm worker (the
libraries imported, no data), and the reduces (the quality gate, phrasings, select, report) one
at a time. The Label Studio push/pull is left out (see bench/label_studio_push.py).

It prints each stage's wall time, each task kind's summed task seconds (its work, without process
start-up or waiting for a worker) and largest peak RSS (the imported libraries included: the
baseline is printed too), and the total. Goals (issue #15): 1,000,000 rows in
<= 60 s in total; the largest task's peak at 4,000,000 rows <= 1.15x its peak at 1,000,000 (issue #20).

    python bench/daily_pipeline.py                 # 1,000,000 interactions
    python bench/daily_pipeline.py --rows 4000000
    python bench/daily_pipeline.py --quick         # 100,000 interactions, 10,000 photos
    python bench/daily_pipeline.py --scheduler     # also the DAG itself under Airflow's scheduler
    python bench/daily_pipeline.py --compare-rows 4000000   # also a 4M day: peak_task_mb_4m_ratio
    python bench/daily_pipeline.py --lake /tmp/bench-lakes   # keep the simulated day for the next run

``--scheduler`` then runs the same day through ``feedback_daily`` in a real Airflow (``airflow
standalone`` on a fresh SQLite DB, LocalExecutor with ``--workers`` parallel tasks) and prints its
wall time beside the library figure: the difference is what the scheduler, the task processes
and the metadata DB cost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAY = dt.date(2026, 11, 20)
RUN_TIME = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(1), dt.timezone.utc)
BASE_RENDERS = 400  # the simulation's photos the catalogue is stamped from

GENERATE = r"""
import sys
sys.path.insert(0, sys.argv[5])
from daily_pipeline import generate
generate(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
"""


def _lake(root):
    from vloop.store.lake import LocalLake

    return LocalLake(root, max_image_bytes=2**24, max_image_pixels=2**24)


def _store_photos(args) -> list[tuple[str, str, int, int]]:
    """Photos ``start..stop`` of the catalogue: render ``i % BASE_RENDERS`` with ``i`` stamped into
    its top row, stored content-addressed; (sha256, key, width, height) each."""
    import io

    from vloop.sim.synth import World

    root, start, stop = args
    lake, samples = _lake(root), World(1).samples(BASE_RENDERS, degraded=0.15)
    out = []
    for i in range(start, stop):
        img = samples[i % BASE_RENDERS].image.copy()
        for bit in range(24):  # the index in 24 pixels: a distinct photo, the same picture to the eye
            img.putpixel((bit, 0), (255, 255, 255) if (i >> bit) & 1 else (0, 0, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        s = lake.put_image(buf.getvalue())
        out.append((s.sha256, s.key, s.width, s.height))
    return out


def generate(root: str, rows: int, photos: int, workers: int) -> None:
    """The simulated day (see the module docstring), an hour at a time so that 4M rows fit."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from vloop.store.lake import FEEDBACK_DATASET, INTERACTIONS_DATASET, partition_prefix
    from vloop.store.schema import FEEDBACK, INTERACTION
    from vloop.sim.synth import World

    t0 = time.perf_counter()
    chunks = [(root, s, min(s + 5000, photos)) for s in range(0, photos, 5000)]
    stored = []
    with mp.get_context("fork").Pool(workers) as pool:
        for part in pool.imap(_store_photos, chunks):
            stored += part
            print(f"  stored {len(stored):,}/{photos:,} photos ({time.perf_counter() - t0:.0f}s)", flush=True)
    samples = World(1).samples(BASE_RENDERS, degraded=0.15)
    sha = np.array([s[0] for s in stored], dtype=object)
    keys = np.array([s[1] for s in stored], dtype=object)
    width = np.array([s[2] for s in stored])
    height = np.array([s[3] for s in stored])
    base = np.arange(photos) % BASE_RENDERS
    question = np.array([samples[b].question for b in range(BASE_RENDERS)], dtype=object)
    answer = np.array([samples[b].answer for b in range(BASE_RENDERS)], dtype=object)
    category = np.array([samples[b].category for b in range(BASE_RENDERS)], dtype=object)
    lake = _lake(root)
    rng = np.random.default_rng(7)
    per_hour = np.bincount(rng.integers(0, 24, rows), minlength=24)
    done = 0
    for hour, n in enumerate(per_hour):
        pick = rng.integers(0, photos, n)
        b = base[pick]
        right = rng.random(n) < 0.6
        conf = np.where(right, rng.beta(8, 2, n), rng.beta(2, 5, n))
        wrong = answer[(b + 1 + rng.integers(0, BASE_RENDERS - 1, n)) % BASE_RENDERS]
        start = pd.Timestamp(dt.datetime.combine(DAY, dt.time(hour), dt.timezone.utc))
        ts = start + pd.to_timedelta(np.sort(rng.integers(0, 3_600_000_000, n)), unit="us")
        ids = [f"{DAY:%Y%m%d}-{hour:02d}-{i:08d}" for i in range(n)]
        lp = np.log(np.clip(conf, 1e-6, 1))
        bad = rng.random(n) < 0.001  # broken rows for the quarantine (0.1%: under the gate)
        latency = np.where(bad, -1.0, rng.gamma(4, 40, n))
        inter = {
            "request_id": ids, "ts": ts, "user_key": [f"u{u:07d}" for u in rng.integers(0, max(rows // 20, 1), n)],
            "session_id": [f"s{u:08d}" for u in rng.integers(0, max(rows // 5, 1), n)],
            "category": category[b], "image_sha256": sha[pick], "image_key": keys[pick],
            "image_w": width[pick], "image_h": height[pick], "question": question[b],
            "answer": np.where(right, answer[b], wrong), "token_logprobs": [[float(x)] * 3 for x in lp],
            "confidence": np.where(bad, 1.5, conf), "latency_ms": latency,
            "base_model": ["sim-base"] * n, "adapter": [None] * n, "arm": ["champion"] * n, "status": ["ok"] * n,
            "redactions": [0] * n, "app": [None] * n,
        }
        kinds = np.where(right, rng.choice(["accept", "dwell", "close"], n, p=[0.8, 0.15, 0.05]),
                         rng.choice(["edit", "regenerate", "skip", "close"], n, p=[0.5, 0.2, 0.2, 0.1]))
        fb = {"event_id": [f"e{x}" for x in ids], "request_id": ids,
              "ts": ts + pd.to_timedelta(rng.integers(2, 90, n), unit="s"), "type": kinds,
              "edited_text": np.where(kinds == "edit", answer[b], None),
              "dwell_ms": [int(d) if k == "dwell" else None for d, k in zip(rng.integers(3000, 30000, n), kinds)],
              "rating": [None] * n}
        lake.write_partition(INTERACTIONS_DATASET, pa.Table.from_pydict(inter, schema=INTERACTION.arrow), DAY, hour)
        # Feedback as a shipper's segment: one file per hour of requests, at the day level.
        lake.write_parquet(partition_prefix(FEEDBACK_DATASET, DAY) + f"seg-{hour:02d}.parquet",
                           pa.Table.from_pydict(fb, schema=FEEDBACK.arrow))
        done += n
        print(f"  wrote hour {hour:02d}: {done:,}/{rows:,} rows ({time.perf_counter() - t0:.0f}s)", flush=True)


# -- the run ----------------------------------------------------------------------------------------
def _task(job):
    """One task in a fresh forked process: (name, slice, seconds, peak RSS MB, summary)."""
    name, part, root = job
    from vloop.curate import daily

    lake = _lake(root)
    t = time.perf_counter()
    if name == "slices":
        out = daily.plan(lake, DAY, part, RUN_TIME)
    elif name == "ingest":
        out = daily.ingest_slice(lake, DAY, part, RUN_TIME)
    elif name == "validate_slice":
        out = daily.validate_slice(lake, DAY, part)
    elif name == "validate":
        out = daily.gate(lake, DAY, part)
    elif name == "mine":
        out = daily.mine_slice(lake, DAY, part)
    elif name == "confidence":
        out = daily.score_confidence_slice(lake, DAY, part)
    elif name == "image_quality":
        out = daily.check_images_slot(lake, DAY, part)
    elif name == "phrasings":
        out = daily.mine_day_phrasings(lake, DAY)
    elif name == "select":
        out = daily.select_for_labelling(lake, DAY)
    else:
        out = daily.report(lake, DAY)
    return name, part, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out


def run(root: str, workers: int, slice_rows: int) -> dict:
    # A warm worker: the libraries the steps use, imported once, no data (the local executor's
    # task processes start from the same kind of parent).
    t0 = time.perf_counter()
    import great_expectations  # noqa: F401
    import pandas  # noqa: F401
    import PIL.Image  # noqa: F401

    import vloop.curate.imagequality  # noqa: F401
    import vloop.curate.mining  # noqa: F401
    import vloop.curate.quality  # noqa: F401
    import vloop.curate.report  # noqa: F401
    from vloop.curate import daily  # noqa: F401

    # Not numba (vloop.curate.image_kernels): only the image checks use it, and each imports it (~0.1 s, ~100 MB
    # of LLVM) as an Airflow task would, in its own time and memory.
    print(f"warm worker: libraries imported in {time.perf_counter() - t0:.1f}s (not counted)", flush=True)
    ctx = mp.get_context("fork")
    peaks: dict[str, float] = {}
    total = 0.0
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        def stage(label: str, jobs: list) -> list:
            nonlocal total
            t = time.perf_counter()
            results, busy = [], {}
            for name, part, secs, peak, out in pool.imap_unordered(_task, jobs):
                peaks[name] = max(peaks.get(name, 0.0), peak)
                busy[name] = busy.get(name, 0.0) + secs
                results.append((name, part, out))
            wall = time.perf_counter() - t
            total += wall
            kinds = sorted({j[0] for j in jobs})
            # Per kind: the tasks' own seconds added up (the step's work, without process start-up or
            # waiting for a free worker), and the largest peak RSS.
            print(f"{label:44s} {wall:7.2f} s   " + "  ".join(f"{k} {busy[k]:.1f} task-s, peak {peaks[k]:.0f} MB"
                                                          for k in kinds), flush=True)
            return results

        [(_, _, slices)] = stage("slices (the plan; feedback routed)", [("slices", slice_rows, root)])
        stage(f"ingest x{len(slices)}", [("ingest", s, root) for s in slices])
        stage(f"validate_slice x{len(slices)}", [("validate_slice", s, root) for s in slices])
        [(_, _, gate)] = stage("validate (the gate: reduce)", [("validate", slices, root)])
        stage(f"mine, confidence, image_quality x{len(slices)}",
              [(n, s, root) for s in slices for n in ("image_quality", "mine", "confidence")])
        results = stage("phrasings, select (reduces)", [("phrasings", None, root), ("select", None, root)])
        stage("report (reduce)", [("report", None, root)])
    mapped = ("ingest", "validate_slice", "mine", "confidence", "image_quality")
    reduces = ("slices", "validate", "phrasings", "select", "report")
    selected = next(out for name, _, out in results if name == "select")
    return {"total": total, "slices": len(slices), "peaks": peaks,
            "peak_mapped": max(peaks[k] for k in mapped), "peak_mapped_kind": max(mapped, key=lambda k: peaks[k]),
            "peak_task": max(peaks.values()), "peak_task_kind": max(peaks, key=peaks.get),
            "peak_reduce": max(peaks[k] for k in reduces),
            "interactions": gate["interactions"], "quarantined": gate["quarantined_interactions"],
            "selected": selected["selected"]}


# -- the same DAG under Airflow's scheduler ---------------------------------------------------------
def run_scheduled(root: str, workers: int, slice_rows: int, timeout: float = 3600) -> dict:
    """``feedback_daily`` for the day, triggered in a real Airflow (``airflow standalone``: scheduler,
    DAG processor, API server, LocalExecutor with ``workers`` parallel tasks) on a fresh SQLite
    metadata DB, over the same lake. Returns the run's wall time (its start to its end, as the
    scheduler recorded them; Airflow's own start-up not counted), the task instances it ran and the
    slowest of them."""
    import shutil
    import socket
    import sqlite3

    from vloop.services import Service

    repo = Path(__file__).resolve().parents[1]
    home = Path(tempfile.mkdtemp(prefix="vloop-bench-airflow-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VLOOP_"))} | {
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(repo / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": str(workers),
        "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        # Only the run the bench triggers: no scheduled runs of the (unpaused) DAG beside it.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW_CONN_VLOOP_LAKE": json.dumps({"conn_type": "generic", "extra": {"lake_url": f"file://{root}"}}),
        "AIRFLOW_VAR_VLOOP_SLICE_ROWS": str(slice_rows), "VLOOP_MAX_IMAGE_BYTES": str(2**24),
        "VLOOP_MAX_IMAGE_PIXELS": str(2**24), "PYTHONPATH": str(repo / "plugins"),
        "VLOOP_AIRFLOW_BIN": str(venv_bin / "airflow"),
        "PATH": f"{repo / 'bin' / 'airflow-shim'}:{venv_bin}:{os.environ.get('PATH', '')}"}
    airflow = Service("airflow", [str(venv_bin / "airflow"), "standalone"], log_file=home / "standalone.log", env=env)
    db = home / "airflow.db"

    def query(sql: str, *args):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
            return c.execute(sql, args).fetchall()

    def wait(what: str, done, limit: float) -> None:
        t = time.monotonic()
        while not done():
            if time.monotonic() - t > limit:
                raise TimeoutError(f"{what}: not within {limit:.0f} s")
            time.sleep(2)

    t0 = time.perf_counter()
    try:
        airflow.start(health_url=f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=300)
        wait("feedback_daily parsed", lambda: db.exists() and query(
            "select 1 from dag where dag_id='feedback_daily'"), 300)
        def cli(*args: str) -> None:
            r = subprocess.run([str(venv_bin / "airflow"), *args], env=env, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"airflow {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

        for pool, slots in (("vloop_label_studio", 2), ("vloop_gpu", 1)):  # as bin/stack makes them
            cli("pools", "set", pool, str(slots), "vloop")
        print(f"airflow standalone up, DAGs parsed in {time.perf_counter() - t0:.0f}s (not counted)", flush=True)
        run_id = f"bench_{int(time.time())}"
        cli("dags", "trigger", "feedback_daily", "--run-id", run_id, "--conf", json.dumps({"day": DAY.isoformat()}))
        cli("dags", "unpause", "feedback_daily")
        state = lambda: query("select state from dag_run where run_id=?", run_id)[0][0]  # noqa: E731
        wait("the run", lambda: state() in ("success", "failed"), timeout)
        start, end = query("select start_date, end_date from dag_run where run_id=?", run_id)[0]
        tis = query("select task_id, map_index, state, duration from task_instance where run_id=?", run_id)
    except BaseException:
        log = home / "standalone.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        print(f"--- the end of {log} (removed with the Airflow home) ---\n{tail}", flush=True)
        raise
    finally:
        airflow.stop()
        shutil.rmtree(home, ignore_errors=True)
    wall = (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()
    slowest = sorted((t for t in tis if t[3] is not None), key=lambda t: -t[3])[:5]
    print(f"under the scheduler: {state_of(tis)} in {wall:.1f} s, {len(tis)} task instances; slowest: "
          + ", ".join(f"{t}{'' if m < 0 else f'[{m}]'} {d:.1f}s" for t, m, _, d in slowest), flush=True)
    if any(t[2] not in ("success", "skipped") for t in tis):  # push and pull skip: no Label Studio here
        raise RuntimeError(f"feedback_daily under the scheduler did not succeed: {tis}")
    return {"scheduler_s": wall, "scheduler_tis": len(tis)}


def state_of(tis) -> str:
    from collections import Counter

    return ", ".join(f"{k}:{v}" for k, v in sorted(Counter(t[2] for t in tis).items(), key=lambda kv: str(kv[0])))


def niqe_rate(root: str, n: int = 500) -> float:
    """Photos/s of the daily check's NIQE (vloop.curate.imagequality.niqe_reduced, as image_check calls
    it: from the decoded photo, or a JPEG's bytes) on one core, over ``n`` of the lake's photos."""
    import io

    from PIL import Image

    from vloop.curate.imagequality import niqe_reduced

    lake = _lake(root)
    keys = sorted(k for k in lake.list("raw/images/"))[:n]
    blobs = [lake.get_bytes(k) for k in keys]
    t = time.perf_counter()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            niqe_reduced(b if img.format == "JPEG" else img)
    return len(blobs) / (time.perf_counter() - t)


def measure(rows: int, photos: int, args) -> dict:
    """A simulated day of ``rows`` in a temporary lake, through the library run (and the scheduler's
    with ``--scheduler``)."""
    from vloop.curate.daily import DEFAULT_SLICE_ROWS

    slice_rows = args.slice_rows or DEFAULT_SLICE_ROWS
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(args.lake or tmp) / f"lake-{rows}-{photos}")
        made = Path(root) / "bench-day.json"  # a kept lake (--lake) that holds this day already
        if not made.exists():
            t = time.perf_counter()
            print(f"simulating {rows:,} interactions about {photos:,} distinct photos (not counted) ...", flush=True)
            subprocess.run([sys.executable, "-c", GENERATE, root, str(rows), str(photos), str(args.workers),
                            str(Path(__file__).parent)], check=True)
            made.write_text(json.dumps({"rows": rows, "photos": photos}))
            print(f"simulated in {time.perf_counter() - t:.0f}s", flush=True)
        else:
            print(f"the simulated day of {rows:,} interactions in {root} (kept by --lake)", flush=True)
        print(f"running feedback_daily's steps on {args.workers} workers", flush=True)
        r = run(root, args.workers, slice_rows)
        with mp.get_context("fork").Pool(1) as pool:  # numba stays out of this process (see run)
            r["niqe_per_s"] = pool.apply(niqe_rate, (root,))
        if args.scheduler:
            r |= run_scheduled(root, args.workers, slice_rows)
    print(f"total {r['total']:.1f} s (goal <= 60 s at 1M rows) for {r['interactions']:,} interactions in "
          f"{r['slices']} slice tasks per step, {r['quarantined']:,} quarantined, {r['selected']} selected")
    print(f"largest task: {r['peak_task_kind']} {r['peak_task']:.0f} MB peak RSS (libraries included); largest "
          f"mapped task {r['peak_mapped_kind']} {r['peak_mapped']:.0f} MB; largest reduce {r['peak_reduce']:.0f} MB",
          flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="distinct photos (default: 100,000; --quick 10,000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--slice-rows", type=int, default=None, help="interactions per slice (default: the DAG's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lake", default=None, metavar="DIR",
                    help="keep the simulated day under DIR and reuse it next time (default: a temporary lake)")
    ap.add_argument("--scheduler", action="store_true",
                    help="then run the same day through the DAG under Airflow's scheduler (LocalExecutor) too")
    ap.add_argument("--compare-rows", type=int, default=None, metavar="N",
                    help="then a day of N rows (the issue's 4,000,000), for peak_task_mb_4m_ratio: its "
                         "largest task over this day's")
    args = ap.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    photos = args.images or (10_000 if args.quick else 100_000)
    r = measure(rows, photos, args)
    extra = ""
    if args.scheduler:
        extra += f" scheduler_s={r['scheduler_s']:.1f} scheduler_tis={r['scheduler_tis']}"
    if args.compare_rows:
        big = measure(args.compare_rows, photos, argparse.Namespace(**{**vars(args), "scheduler": False}))
        extra += (f" compare_rows={args.compare_rows} compare_total_s={big['total']:.1f} "
                  f"compare_peak_task_mb={big['peak_task']:.0f} "
                  f"peak_task_mb_4m_ratio={big['peak_task'] / r['peak_task']:.2f}")
    print(f"RESULT total_s={r['total']:.1f} peak_task_mb={r['peak_task']:.0f} rows={rows} photos={photos} "
          f"slices={r['slices']} workers={args.workers} peak_mapped_mb={r['peak_mapped']:.0f} "
          f"peak_reduce_mb={r['peak_reduce']:.0f} niqe_per_s={r['niqe_per_s']:.0f}" + extra)


if __name__ == "__main__":
    main()
