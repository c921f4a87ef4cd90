"""The whole loop on real components: what ``make demo`` runs (a simulation, named so everywhere).

Round after round, on the lake of ``VLOOP_LAKE_URL`` (a directory under ``$VLOOP_HOME`` by
default), with services this module starts on loopback and stops again (``--keep`` leaves them):

1. **traffic** — simulated shoppers (the :mod:`vloop.sim.synth` world) ask colour questions about
   product photos **through the running serving gateway over HTTP**; each accepts a right answer and
   edits a wrong one with the true answer, with noise: some never react, some edit wrongly, some
   ask again. The gateway runs in simulation mode, so each request carries its simulated time and
   lands in its simulated day's partition; nothing is written to ``raw/`` but by the gateway;
2. **feedback_daily** for each simulated day **as the Airflow DAG** (``dag.test()`` on the embedded
   SQLite metadata DB under ``$VLOOP_HOME/airflow``): validation, mining, selection, push to the
   **real Label Studio**, pull of finished annotations, report;
3. a **simulated annotator** works the Label Studio queue through its API with the world's ground
   truth and a small error rate;
4. **retrain_biweekly** trains a LoRA adapter, gates it and deploys it as the canary;
   **canary_rollout** judges it after every simulated day (widen, promote, roll back); a promoted
   adapter is the next round's champion.

Then a loop report (HTML with plots) and the last line
``RESULT rounds=N promoted=K accept_before=X accept_after=Y minutes=M``: acceptance of live traffic
on the first and on the last simulated day.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[3]
PROJECT_TITLE = "vloop VQA review (simulation)"
SEEN = {"categories": ("shoes", "bags", "hats"), "colours": ("red", "blue", "green", "black")}  # the base's slice


@dataclass
class LoopConfig:
    rounds: int = 2
    label_days: int = 1  # simulated days of traffic before each retraining (canary days add theirs)
    users_per_day: int = 250
    questions_per_user: int = 2
    users: int = 600  # the shop's user base; each day some of them come back
    no_reaction: float = 0.15  # users who never react
    wrong_edit: float = 0.05  # edits with a wrong "correction"
    repeat: float = 0.10  # users who ask again instead of editing
    annotator_error: float = 0.03
    label_budget: int = 150
    min_new_labels: int = 30
    train_steps: int = 300
    stages: tuple[float, ...] = (0.5, 1.0)  # equal arms: the fewest days to a decision
    mixture_sd: float = 0.15  # the effect size the rollout's boundary is tuned to in this world
    min_requests: int = 80
    stage_days: int = 2  # a stage undecided after this many days is retired as inconclusive
    concurrency: int = 8
    eval_samples: int = 240
    seed: int = 0
    keep: bool = False

    def __post_init__(self):
        if not 1 <= self.users_per_day <= self.users:
            raise ValueError(f"users_per_day must be 1..{self.users} (the shop's user base), got {self.users_per_day}")
        if self.rounds < 1 or self.label_days < 1:
            raise ValueError(f"rounds and label_days must be at least 1, got {self.rounds} and {self.label_days}")


@dataclass
class Timeline:
    steps: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    looks: list[dict] = field(default_factory=list)

    def step(self, what: str, t0: float, seconds: float | None = None, **facts) -> None:
        """A line for a step that began at ``t0`` (or took ``seconds``, measured elsewhere)."""
        el = time.perf_counter() - t0 if seconds is None else seconds
        self.steps.append({"step": what, "seconds": round(el, 1), **facts})
        shown = ", ".join(f"{k}={v}" for k, v in facts.items())
        print(f"[{_clock()}] {what:34s} {el:6.1f}s  {shown}", flush=True)


_T_START = time.perf_counter()


def _clock() -> str:
    s = int(time.perf_counter() - _T_START)
    return f"{s // 60:02d}:{s % 60:02d}"


# -- services ---------------------------------------------------------------------------------------
class Service:
    """A service the demo starts on loopback (:class:`vloop.services.Service`: its own process
    group, its PID under ``$VLOOP_HOME/run`` — the files ``bin/stack`` uses, so ``make down`` stops
    it and ``make up`` reuses it), up once ``url + health`` answers 200."""

    def __init__(self, name: str, args: list[str], env: dict, url: str, health: str, home: Path):
        from vloop.services import Service as Process

        self.name, self.url, self.health = name, url, health
        self.process = Process.under_home(name, args, home, env=env, stop_signal=signal.SIGINT, grace=30)

    def start(self, timeout: float = 240) -> "Service":
        from vloop.services import AlreadyRunning

        try:
            self.process.start(health_url=self.url + self.health, timeout=timeout)
        except AlreadyRunning as e:
            raise AlreadyRunning(f"{e}: stop it with `make down`") from None
        return self

    def stop(self) -> None:
        if self.process.proc is not None:  # only what this demo started, never another run's service
            self.process.stop()


def _port(env_name: str, default: int) -> int:
    import socket

    want = int(os.environ.get(env_name, default))
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", want))
            return want
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def label_studio_service(home: Path, secrets: dict) -> Service:
    ls_port = _port("VLOOP_LABEL_STUDIO_PORT", 8080)
    exe = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing: run `make setup` (it builds Label Studio's own venv)")
    # --internal-host is Label Studio's bind address; --host only names it in URLs it generates.
    return Service("label-studio", [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                    "--host", "127.0.0.1", "--port", str(ls_port)], {
        **_base_env(), "LABEL_STUDIO_BASE_DATA_DIR": str(home / "label-studio"),
        "LABEL_STUDIO_USERNAME": os.environ.get("LABEL_STUDIO_USERNAME", "admin@vloop.local"),
        "LABEL_STUDIO_PASSWORD": secrets["LABEL_STUDIO_PASSWORD"],
        "LABEL_STUDIO_USER_TOKEN": secrets["LABEL_STUDIO_USER_TOKEN"],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(home), "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false", "LABEL_STUDIO_SENTRY_DSN": "",
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": ""}, f"http://127.0.0.1:{ls_port}", "/health", home)


def serving_service(home: Path, lake_url: str, model: Path, secrets: dict) -> Service:
    sv_port = _port("VLOOP_SERVING_PORT", 8000)
    return Service("serving", [sys.executable, "-m", "serving", "--model", str(model), "--lake", lake_url,
                               "--host", "127.0.0.1", "--port", str(sv_port), "--simulation",
                               "--reconcile-interval", "1"], {
        **_base_env(), "VLOOP_HOME": str(home), "VLOOP_ADMIN_TOKEN": secrets["VLOOP_ADMIN_TOKEN"],
        "VLOOP_USER_KEY_SECRET": secrets["VLOOP_USER_KEY_SECRET"], "VLOOP_SIMULATION": "1",
        "HF_HUB_OFFLINE": "1"}, f"http://127.0.0.1:{sv_port}", "/healthz", home)


def _base_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VLOOP_", "AIRFLOW"))}


def start_services(home: Path, lake_url: str, model: Callable[[], Path], secrets: dict,
                   on_model: Callable[[Path], None] = lambda m: None) -> tuple[Service, Service, Path]:
    """Label Studio and the serving gateway, started side by side; Label Studio (~30 s on its first
    start) already while ``model()`` gives the serving model (building the base on a first run)."""
    ls = label_studio_service(home, secrets)
    sv = None
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ls.start)]
        try:
            path = model()
            on_model(path)
            sv = serving_service(home, lake_url, path, secrets)
            futures.append(pool.submit(sv.start))
        except BaseException:  # no model: Label Studio is stopped again once its start returned
            futures[0].exception()
            ls.stop()
            raise
        errors = [f.exception() for f in futures]
    if any(errors):
        ls.stop()
        if sv is not None:
            sv.stop()
        raise next(e for e in errors if e)
    return ls, sv, path


# -- Airflow --------------------------------------------------------------------------------------
def airflow_env(home: Path, lake_url: str, ls: Service, sv: Service, secrets: dict, model: Path,
                cfg: LoopConfig) -> None:
    """Airflow in this process: SQLite metadata under ``$VLOOP_HOME/airflow`` (the one ``make up``'s
    UI shows afterwards), the project's DAGs, connections to the lake, Label Studio and serving."""
    os.environ.update({
        "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW_CONN_VLOOP_LAKE": json.dumps({"conn_type": "generic", "extra": {"lake_url": lake_url}}),
        "AIRFLOW_CONN_VLOOP_LABEL_STUDIO": json.dumps({
            "conn_type": "http", "host": ls.url, "password": secrets["LABEL_STUDIO_USER_TOKEN"],
            "extra": {"project_title": PROJECT_TITLE, "document_root": str(home)}}),
        "AIRFLOW_CONN_VLOOP_SERVING": json.dumps({"conn_type": "http", "host": sv.url,
                                                   "password": secrets["VLOOP_ADMIN_TOKEN"]}),
        "AIRFLOW_VAR_VLOOP_LABEL_BUDGET": str(cfg.label_budget), "AIRFLOW_VAR_VLOOP_ROLLOUT_STAGES": ",".join(map(str, cfg.stages)), "VLOOP_BASE_MODEL": str(model), "VLOOP_SIMULATION": "1",
        "VLOOP_HOME": str(home)})
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, timeout=600)


def load_dags() -> dict:
    import logging

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    for name in ("airflow", "airflow.task", "great_expectations", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return bag.dags


def run_dag(dag, conf: dict, log_path: Path) -> dict[str, str]:
    """``dag.test()``; task id → state. The task logs (and those of the processes the tasks start,
    e.g. training) go to ``log_path``, not into the demo's one line per step."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            dr = dag.test(run_conf=conf)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    if dr.state != "success" and any(s == "failed" for s in states.values()):
        raise RuntimeError(f"{dag.dag_id} failed: {states}; see {log_path}")
    return states


# -- the simulated world: shoppers and an annotator -------------------------------------------------
class Shoppers:
    """Simulated app users. They know the true answer to their own question (the simulation's
    ground truth) and react to the answer they get."""

    def __init__(self, cfg: LoopConfig, gateway: str):
        self.cfg, self.gateway = cfg, gateway
        self.truth: dict[str, str] = {}  # request_id -> true answer (for the simulated annotator)

    def day(self, day: dt.date) -> dict:
        import httpx

        from vloop.vlm.model import normalise_answer
        from vloop.sim.synth import World

        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}|{day}")
        world = World(cfg.seed * 7919 + day.toordinal())
        users = rng.sample(range(cfg.users), cfg.users_per_day)
        jobs = []
        for k, u in enumerate(users):
            for q in range(cfg.questions_per_user):
                s = world.sample(k * cfg.questions_per_user + q, intents=("colour",), degraded=0.1)
                at = dt.datetime.combine(day, dt.time(), dt.timezone.utc) + dt.timedelta(
                    seconds=rng.randrange(60, 86_000))
                jobs.append((f"shopper-{u}", s, at, rng.random(), rng.random()))
        http = httpx.Client(base_url=self.gateway, timeout=120)

        def ask(job):
            user, s, at, r1, r2 = job
            sim = {"X-Vloop-Sim-Time": at.isoformat()}
            body = {"model": "vloop", "user": user, "max_tokens": 8, "metadata": {"category": s.category},
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": _data_url(s)}},
                        {"type": "text", "text": s.question}]}]}
            r = http.post("/v1/chat/completions", json=body, headers=sim)
            r.raise_for_status()
            out = r.json()
            rid, arm = out["id"], out["vloop"]["arm"]
            right = normalise_answer(out["choices"][0]["message"]["content"]) == normalise_answer(s.answer)
            later = {"X-Vloop-Sim-Time": (at + dt.timedelta(seconds=5 + int(r2 * 60))).isoformat()}
            if r1 < cfg.no_reaction:
                event = None
            elif right:
                event = {"type": "accept"}
            elif r1 < cfg.no_reaction + cfg.repeat:
                event = {"type": "regenerate"}
            else:
                wrong = r2 < cfg.wrong_edit
                event = {"type": "edit", "edited_text": "grey" if wrong else s.answer}
            if event:
                # The token the answer came with: the gateway takes no feedback without it.
                http.post("/v1/feedback", json={"request_id": rid, **event,
                                                "feedback_token": out["vloop"]["feedback_token"]},
                          headers=later).raise_for_status()
            return rid, s.answer, arm, right

        with ThreadPoolExecutor(cfg.concurrency) as pool:
            results = list(pool.map(ask, jobs))
        http.close()
        for rid, truth, _, _ in results:
            self.truth[rid] = truth
        return {"requests": len(results), "right": sum(r[3] for r in results) / len(results),
                "ids": [r[0] for r in results]}


def _data_url(sample) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(sample.image_bytes()).decode()


def annotate_queue(ls_url: str, token: str, truth: dict[str, str], error: float, seed: int) -> dict:
    """A simulated annotator works every open task of the review project through Label Studio's
    API: a verdict against the ground truth (wrong with probability ``error``) and, for a wrong
    answer, the true one typed in."""
    from vloop.curate.labelstudio import LabelStudio
    from vloop.vlm.model import normalise_answer

    rng = random.Random(seed)
    done = {"correct": 0, "wrong": 0, "unknown": 0}
    # (task id, annotation), decided in task order. Which tasks there are and their order follow the
    # gateway's random request ids (the selection's ties and audit sample), so runs of a seed differ.
    verdicts = []
    with LabelStudio(ls_url, token) as ls:
        project = ls.ensure_project(PROJECT_TITLE)
        for t in ls.export(project, all_tasks=True):
            if t.get("annotations"):
                continue
            rid, answer = t["data"].get("request_id"), t["data"].get("model_answer") or ""
            if rid not in truth:
                done["unknown"] += 1  # not asked by this run's shoppers: left for a person
                continue
            right = normalise_answer(answer) == normalise_answer(truth[rid])
            if rng.random() < error:
                right = not right
            result = [{"from_name": "verdict", "to_name": "image", "type": "choices",
                       "value": {"choices": ["correct" if right else "wrong"]}}]
            if not right:
                result.append({"from_name": "corrected_answer", "to_name": "image", "type": "textarea",
                               "value": {"text": [truth[rid]]}})
            verdicts.append((t["id"], {"result": result, "lead_time": round(rng.uniform(4, 20), 1)}))
            done["correct" if right else "wrong"] += 1
        # Posted by a few at once, as a team of annotators would: each post costs Label Studio
        # ~0.12 s of server time, which threads overlap (half the wall time on 2 cores).
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda v: ls._call("POST", f"/api/tasks/{v[0]}/annotations", json=v[1]), verdicts))
    return done


# -- measuring ------------------------------------------------------------------------------------
def wait_shipped(lake, ids: list[str], day: dt.date, timeout: float = 120) -> None:
    from vloop.store.lake import INTERACTIONS_DATASET
    from vloop.store.schema import INTERACTION

    want, deadline = set(ids), time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = set(lake.read_partitions(INTERACTIONS_DATASET, day, day, columns=["request_id"],
                                       schema=INTERACTION.arrow).column("request_id").to_pylist())
        if want <= got:
            time.sleep(1.5)  # the feedback events follow within a shipping interval
            return
        time.sleep(0.5)
    raise RuntimeError(f"the gateway did not ship {len(want - got)} of {len(want)} records for {day}")


def day_rates(lake, day: dt.date) -> list[dict]:
    """Acceptance and edit rate of a day's live traffic, per arm and overall, with 95% intervals
    (the report's outcome definition)."""
    from vloop.store.lake import FEEDBACK_DATASET, INTERACTIONS_DATASET
    from vloop.curate.report import outcome_flags
    from vloop.learn.retrain import wilson_interval
    from vloop.store.schema import FEEDBACK, INTERACTION

    inter = lake.read_partitions(INTERACTIONS_DATASET, day, day, columns=["request_id", "arm", "adapter"],
                                 schema=INTERACTION.arrow).to_pandas()
    fb = lake.read_partitions(FEEDBACK_DATASET, day, day + dt.timedelta(days=1), columns=["request_id", "type"],
                              schema=FEEDBACK.arrow).to_pandas()
    df = inter.merge(outcome_flags(inter, fb), on="request_id")
    rows = []
    for arm, g in [("all", df), *df.groupby("arm", observed=True)]:
        n, a, e = len(g), int(g["accepted"].sum()), int(g["edited"].sum())
        lo, hi = wilson_interval(a, n)
        rows.append({"day": day.isoformat(), "arm": arm, "requests": n, "acceptance": a / n if n else float("nan"),
                     "acceptance_lo": lo, "acceptance_hi": hi, "edit_rate": e / n if n else float("nan"),
                     "model": ",".join(sorted(g["adapter"].fillna("base").unique()))})
    return rows


def evaluate_champion(lake, model: Path, cfg: LoopConfig, cache: Path) -> dict:
    """Exact match of the current champion on held-out synthetic colour questions, on the base's
    own slice (seen) and on the rest (unseen)."""
    import dataclasses

    from vloop.store.lake import fetch_files
    from vloop.vlm.model import load_model
    from vloop.sim.pretrain import evaluate
    from vloop.learn.registry import Registry
    from vloop.sim.synth import World

    lm = load_model(str(model))
    champion = Registry(lake).alias("champion")
    if champion is not None:
        from peft import PeftModel

        local = fetch_files(lake, lake.list(champion.path), cache / champion.ref.replace("@", "_"))
        lm = dataclasses.replace(lm, model=PeftModel.from_pretrained(lm.model, local).eval())
    samples = World(90_001).samples(cfg.eval_samples, intents=("colour",))
    rep = evaluate(lm, samples, seen=lambda s: s.category in SEEN["categories"] and s.colour in SEEN["colours"])
    return {"champion": champion.ref if champion else "base", "exact_match": rep.exact_match, **rep.by_seen}


# -- the loop -------------------------------------------------------------------------------------
def next_free_day(lake) -> dt.date:
    """The first simulated day: after every day the lake already holds and after today, so a
    re-run never mixes with earlier traffic (simulated or real) and labels count as new."""
    from vloop.store.lake import INTERACTIONS_DATASET

    days = {k.split("dt=")[1][:10] for k in lake.list(INTERACTIONS_DATASET + "/") if "dt=" in k}
    last = max([dt.date.fromisoformat(d) for d in days] + [dt.datetime.now(dt.timezone.utc).date()])
    return last + dt.timedelta(days=1)


def ensure_base_model(home: Path, log=print) -> Path:
    """The demo's model when ``VLOOP_BASE_MODEL`` names none: the tiny Qwen3-VL
    (:mod:`vloop.sim.tiny`) pretrained into a mediocre base (:mod:`vloop.sim.pretrain`) under
    ``home/models/base``, built on first use (about 2 minutes) and reused after.
    ``bench/loop_efficacy.py`` starts from it too."""
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


def run_loop(cfg: LoopConfig | None = None, *, home: Path | None = None, out=print) -> dict:
    from vloop.store.config import load_settings
    from vloop.learn.dataset import ensure_golden
    from vloop.store.lake import open_lake
    from vloop.store.secretfile import STACK_SECRETS, ensure_secrets, read_secrets
    import httpx

    from vloop.sim.synth import GOLDEN_SEED, World

    cfg = cfg or LoopConfig()
    # One line per step, no third-party progress bars (here and in the processes started below).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of the libraries
    t_all = time.perf_counter()
    settings = load_settings()
    home = Path(home or settings.home).resolve()
    tl = Timeline()
    lake_url = settings.lake_url
    lake = open_lake(lake_url)
    secrets_file = home / "secrets.env"
    ensure_secrets(secrets_file, STACK_SECRETS)
    secrets = {**read_secrets(secrets_file), **{k: os.environ[k] for k in STACK_SECRETS if os.environ.get(k)}}
    out(f"lake {lake.url}; generated secrets (if any) in {secrets_file} (mode 0600)")

    t0 = time.perf_counter()
    ls, sv, model = start_services(
        home, lake_url, lambda: Path(settings.base_model or ensure_base_model(home, log=lambda s: out("  " + s))),
        secrets, on_model=lambda m: tl.step("base model (Label Studio starting meanwhile)", t0, model=m.name))
    tl.step("services up", t0, label_studio=ls.url, serving=sv.url)
    annotator = ThreadPoolExecutor(1, thread_name_prefix="annotator")  # see live_day
    try:
        t0 = time.perf_counter()
        airflow_env(home, lake_url, ls, sv, secrets, model, cfg)
        dag_log = home / "log" / "demo-dags.log"
        dags = load_dags()
        tl.step("airflow metadata DB + DAGs", t0, dags=len(dags))
        if not lake.exists("datasets/golden/golden.parquet"):
            # The simulation's golden set: colour questions over the whole world.
            ensure_golden(lake, samples=World(GOLDEN_SEED).samples(200, intents=("colour",)))
        shoppers = Shoppers(cfg, sv.url)
        day = first = next_free_day(lake)
        rates, promoted = [], 0
        t0 = time.perf_counter()
        evals = [{"round": 0, **evaluate_champion(lake, model, cfg, home / "demo-cache")}]
        tl.step("held-out exact match (before)", t0, **{k: _fmt(v) for k, v in evals[0].items()})

        # The simulated annotator works a day's queue in the background, beside what comes next
        # (the rollout's look, the next day's traffic), as a team would; it must be done before the
        # next feedback_daily pushes more tasks or pulls, and before a retraining's last pull.
        queue_work: list = []  # (day, future of (verdicts, seconds)) not yet waited for

        def annotator_done() -> None:
            for d, future in queue_work:
                done, seconds = future.result()
                tl.step(f"{d} simulated annotator (LS API)", 0, seconds=seconds, **done)
            queue_work.clear()

        def annotate(d: dt.date) -> tuple[dict, float]:
            t = time.perf_counter()
            done = annotate_queue(ls.url, secrets["LABEL_STUDIO_USER_TOKEN"], shoppers.truth,
                                  cfg.annotator_error, cfg.seed + d.toordinal())
            return done, time.perf_counter() - t

        def live_day(d: dt.date, what: str, annotate_it: bool = True) -> None:
            t = time.perf_counter()
            res = shoppers.day(d)
            wait_shipped(lake, res["ids"], d)
            tl.step(f"{d} traffic via gateway ({what})", t, requests=res["requests"], right=_fmt(res["right"]))
            annotator_done()
            t = time.perf_counter()
            states = run_dag(dags["feedback_daily"], {"day": d.isoformat()}, dag_log)
            rates.extend(r | {"phase": what} for r in day_rates(lake, d))
            overall = next(r for r in rates if r["day"] == d.isoformat() and r["arm"] == "all")
            tl.step(f"{d} feedback_daily (dag.test)", t, tasks=_states(states), acceptance=_fmt(overall["acceptance"]))
            if annotate_it:
                queue_work.append((d, annotator.submit(annotate, d)))

        trained = {_round_info(lake).get("ref")}  # versions registered before this round
        for rnd in range(1, cfg.rounds + 1):
            out(f"--- round {rnd}/{cfg.rounds} ---")
            for _ in range(cfg.label_days):
                live_day(day, "labelling")
                day += dt.timedelta(days=1)
            # Pull what the annotator finished on the last day: feedback_daily's pull task alone (a
            # run of the whole day again would give the same, in ten times the time).
            annotator_done()
            t0 = time.perf_counter()
            states = run_dag(dags["feedback_daily"].partial_subset(["pull"], include_upstream=False),
                             {"day": (day - dt.timedelta(days=1)).isoformat()}, dag_log)
            tl.step("pull the last annotations", t0, tasks=_states(states))
            t0 = time.perf_counter()
            states = run_dag(dags["retrain_biweekly"], {
                "min_new_labels": cfg.min_new_labels, "steps": cfg.train_steps, "replay_ratio": 1.0,
                "until": (day - dt.timedelta(days=1)).isoformat(),
                "now": dt.datetime.combine(day, dt.time(), dt.timezone.utc).isoformat()}, dag_log)
            info = _round_info(lake)
            if info.get("ref") in trained:  # nothing new this round (skipped, or training failed)
                info = {}
            trained.add(info.get("ref"))
            tl.step("retrain_biweekly (dag.test)", t0, tasks=_states(states), gate=info.get("gate_passed"))
            record = {"round": rnd, **info, "train_seconds": info.get("train_seconds")}
            if states.get("deploy_canary") == "success":
                for _ in range(cfg.stage_days * (len(cfg.stages) - 1)):
                    # Labels of the last round's canary days would train no later round: not asked for.
                    live_day(day, "canary", annotate_it=rnd < cfg.rounds)
                    t0 = time.perf_counter()
                    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
                    run_dag(dags["canary_rollout"], {"now": end.isoformat(), "min_hours": 20,
                                                     "min_requests": cfg.min_requests,
                                                     "max_hours": 24 * cfg.stage_days,
                                                     "mixture_sd": cfg.mixture_sd}, dag_log)
                    # Serving applies the new split now, before the next day's first shopper arrives
                    # (left alone it would within its reconcile interval).
                    httpx.post(sv.url + "/admin/reconcile", timeout=120,
                               headers={"Authorization": f"Bearer {secrets['VLOOP_ADMIN_TOKEN']}"}).raise_for_status()
                    look = _last_look(lake)
                    tl.looks.append({"round": rnd, "day": day.isoformat(), **look})
                    tl.step(f"{day} canary_rollout (dag.test)", t0, decision=look.get("action"),
                            share=look.get("canary_share"))
                    day += dt.timedelta(days=1)
                    state = _serving(lake)
                    if not state.canary:
                        break
                state = _serving(lake)
                record["outcome"] = "promoted" if state.champion == info.get("ref") else "not promoted"
                promoted += record["outcome"] == "promoted"
            else:
                record["outcome"] = "not deployed"
            t0 = time.perf_counter()
            evals.append({"round": rnd, **evaluate_champion(lake, model, cfg, home / "demo-cache")})
            tl.step(f"held-out exact match (round {rnd})", t0, **{k: _fmt(v) for k, v in evals[-1].items()})
            tl.rounds.append(record)
        live_day(day, "after", annotate_it=False)
        annotator_done()
        minutes = (time.perf_counter() - t_all) / 60
        before = next(r for r in rates if r["day"] == first.isoformat() and r["arm"] == "all")
        after = next(r for r in rates if r["day"] == day.isoformat() and r["arm"] == "all")
        page = write_report(lake, cfg, tl, rates, evals, before, after, minutes)
        out(f"loop report: {lake.browser_url(page)}  (DAG task logs: {dag_log})")
        if cfg.keep:
            out(f"services left running: Label Studio {ls.url} (user {os.environ.get('LABEL_STUDIO_USERNAME', 'admin@vloop.local')}, "
                f"password LABEL_STUDIO_PASSWORD in {secrets_file}), serving {sv.url}; `make up` adds the Airflow UI "
                f"(it reuses them), `make down` stops everything")
        result = {"rounds": cfg.rounds, "promoted": promoted, "accept_before": round(before["acceptance"], 3),
                  "accept_after": round(after["acceptance"], 3), "minutes": round(minutes, 1),
                  "before": before, "after": after, "evals": evals, "rounds_detail": tl.rounds}
        out(f"RESULT rounds={cfg.rounds} promoted={promoted} accept_before={before['acceptance']:.3f} "
            f"accept_after={after['acceptance']:.3f} minutes={minutes:.1f}")
        return result
    finally:
        annotator.shutdown(cancel_futures=True)  # a queue being worked is finished before its server stops
        if not cfg.keep:
            for s in (sv, ls):
                s.stop()


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else v


def efficacy_section(lake) -> str:
    """The loop report's "is it worth its cost" section: the last ``bench/loop_efficacy.py
    --report`` figures and plots (``reports/efficacy/``), or a line saying how to get them."""
    import base64
    import html

    if not lake.exists("reports/efficacy/latest.json"):
        return ("<h2>Is the loop worth its cost?</h2><p>Not measured on this lake yet: "
                "<code>python bench/loop_efficacy.py --quick --report</code> adds it here.</p>")
    latest = lake.get_json("reports/efficacy/latest.json")
    figs = "".join(f"<li>{html.escape(k)}: <b>{html.escape(str(_fmt(v)))}</b></li>" for k, v in latest["figures"].items())
    imgs = "".join(f'<img alt="{name}" src="data:image/png;base64,'
                   f'{base64.b64encode(lake.get_bytes("reports/efficacy/" + name)).decode()}">'
                   for name in ("efficacy_curve.png", "efficacy_drift.png") if lake.exists("reports/efficacy/" + name))
    return (f"<h2>Is the loop worth its cost? (bench/loop_efficacy.py)</h2><p>Active selection against random "
            f"labels and users' edits, on the same simulated traffic; the time until a new product line is "
            f"answered well.</p><ul>{figs}</ul>{imgs}")


def _states(states: dict) -> str:
    from collections import Counter

    return " ".join(f"{k}:{n}" for k, n in Counter(states.values()).items())


def _serving(lake):
    from vloop.learn.registry import Registry

    return Registry(lake).serving_state()


def _last_look(lake) -> dict:
    from vloop.release.canary import ROLLOUT

    keys = sorted((k for k in lake.list(ROLLOUT + "/") if "/looks/" in k), key=lambda k: lake.get_json(k)["at"])
    if not keys:
        return {}
    look = lake.get_json(keys[-1])
    d = look["decision"]
    return {"action": d["action"], "reason": d["reason"], "canary_share": look["canary_share"],
            "experiment": look["experiment"], "at": look["at"]}


def _round_info(lake) -> dict:
    """The newest registered version: its ref, the gate's figures, training time."""
    from vloop.learn.registry import Registry

    reg = Registry(lake)
    versions = sorted(reg.versions(), key=lambda v: v.created_at)
    if not versions:
        return {}
    v = versions[-1]
    gate = next((e for e in reversed(reg.history()) if e["kind"] == "gate" and e.get("ref") == v.ref), {})
    fig = gate.get("figures") or {}
    training = lake.get_json(v.path + "training.json") if lake.exists(v.path + "training.json") else {}
    manifest = lake.get_json(f"datasets/{v.dataset_id}/manifest.json") if v.dataset_id else {}
    return {"ref": v.ref, "gate_passed": fig.get("passed"), "gate_reason": gate.get("reason"),
            "gate": {k: fig.get(k) for k in ("n", "b", "c", "candidate", "champion", "difference", "interval", "p")},
            "train_seconds": training.get("seconds"), "examples": manifest.get("examples"),
            "by_source": manifest.get("by_source")}


def write_report(lake, cfg: LoopConfig, tl: Timeline, rates: list[dict], evals: list[dict], before: dict,
                 after: dict, minutes: float) -> str:
    """The loop report: ``reports/loop/<first day>/index.html`` with its plots."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vloop.curate import daily
    from vloop.release.canary import looks
    from vloop.curate.report import experiment_plot, png_data_url, round_rows

    df = pd.DataFrame(rates)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for arm, g in df.groupby("arm"):
        x = pd.to_datetime(g["day"])
        ax.errorbar(x, g["acceptance"], yerr=[g["acceptance"] - g["acceptance_lo"], g["acceptance_hi"] - g["acceptance"]],
                    marker="o", capsize=3, label=arm, alpha=0.9 if arm == "all" else 0.6)
    ax.set_ylim(0, 1)
    ax.set_title("acceptance of live traffic per simulated day and arm (95% Wilson intervals)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    acc_png = png_data_url(fig)
    plt.close(fig)
    ev = pd.DataFrame(evals)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for col in ("seen", "unseen", "exact_match"):
        if col in ev:
            ax.plot(ev["round"], ev[col], marker="o", label={"exact_match": "all"}.get(col, col))
    ax.set_xticks(ev["round"])
    ax.set_xlabel("after round")
    ax.set_ylim(0, 1)
    ax.set_title("held-out exact match of the champion")
    ax.legend(fontsize=8)
    ev_png = png_data_url(fig)
    plt.close(fig)
    lk = looks(lake)
    exp_png = experiment_plot(lk[lk["at"] >= before["day"]]) if len(lk) else None

    def table(rows) -> str:
        d = pd.DataFrame(rows)
        return d.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0, classes="t", na_rep="–") \
            if len(d) else "<p>none</p>"

    labelled = daily.read_days(lake, daily.LABELING, "selected.parquet")
    why = labelled[labelled["dt"] >= before["day"]]["reason"].value_counts().rename_axis("reason").reset_index() \
        if len(labelled) and "reason" in labelled else pd.DataFrame()
    lift = after["acceptance"] - before["acceptance"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vloop loop report (simulation)</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} .t td,.t th{{padding:3px 8px;text-align:right}}
.t tr:nth-child(even){{background:#f4f4f4}} img{{max-width:100%}}</style></head><body>
<h1>vloop — the whole loop, {cfg.rounds} round(s) (a simulation)</h1>
<p>Simulated shoppers asked the served model through the real gateway; the DAGs ran with
<code>dag.test()</code>; a simulated annotator worked the real Label Studio queue.
Acceptance on the first simulated day {before['acceptance']:.3f}
[{before['acceptance_lo']:.3f}, {before['acceptance_hi']:.3f}], on the last {after['acceptance']:.3f}
[{after['acceptance_lo']:.3f}, {after['acceptance_hi']:.3f}] (95% Wilson): lift {lift:+.3f}. Run time {minutes:.1f} min.</p>
<h2>Acceptance per day</h2><img src="{acc_png}">
{table(df[["day", "phase", "arm", "model", "requests", "acceptance", "acceptance_lo", "acceptance_hi", "edit_rate"]])}
<h2>Held-out exact match (the base's slice = seen; white/yellow, dresses/shirts = unseen)</h2>
<img src="{ev_png}">{table(evals)}
<h2>Rounds: data, gate, outcome, cost</h2>{table(round_rows(tl.rounds))}
<h2>Rollout decisions</h2>{'<img src="' + exp_png + '">' if exp_png else ''}{table(tl.looks)}
<h2>What was sent to annotators, and why</h2>{table(why)}
{efficacy_section(lake)}
<h2>Steps</h2>{table(tl.steps)}
<p>{html.escape(json.dumps(asdict(cfg)))}</p></body></html>"""
    key = f"reports/loop/{before['day']}/index.html"
    lake.put_bytes(key, page.encode(), "text/html")
    return key
