"""
### retrain_biweekly — a new LoRA adapter from the labels, served as a canary if it earns it

Every 14 days, or when `feedback_daily`'s pull updates the asset `vloop_labels` (new labels),
or on a manual trigger with params (an asset-triggered run starts with the default params);
`deploy_canary` updates the asset `vloop_serving`:

1. **check_labels** — skips the run, saying why, when fewer labels than `min_new_labels` (Variable
   `vloop_min_new_labels`) arrived since the last registered adapter;
2. **build_dataset** — `datasets/<id>/`: corrected and confirmed labels, replay of confident
   accepted answers, the fixed golden set kept apart (`vloop.learn.dataset`). The golden set is the
   frozen one at `datasets/golden/golden.parquet` (`vloop golden build`); without one the task fails
   naming that command; only with `VLOOP_SIMULATION=1` is the synthetic world's set written there
   when it is missing;
3. **train** — `python -m training --stage train` in a subprocess (checkpoints; a retry resumes).
   On GPU nodes run the same image with a KubernetesPodOperator instead (see `training/README.md`);
4. **evaluate** — candidate and champion side by side on the golden set and held-out labels;
5. **gate** — on the golden set the candidate must beat the champion by a margin, significantly on
   the same items (McNemar's exact test, one-sided, at `gate_alpha`), and not regress any category
   beyond a tolerance (`vloop.learn.retrain.gate_decision`; its figures go into the registry's history);
6. **register** — the version goes into the registry with its lineage; one that passed the gate
   is `approved`, a rejected one is recorded as `rejected` with the reason, and the champion stays;
7. **deploy_canary** — the registry's serving state makes it the canary of a new experiment at
   the first of the stages in Variable `vloop_rollout_stages` (`0.1,0.5,1.0` by default); every
   serving replica follows, and the one of connection `vloop_serving` is asked to apply it at once,
   so an adapter it cannot load fails here. While another canary's experiment runs it is queued
   (skipped, saying so): it waits as `approved` and `canary_rollout` starts it when that experiment
   ends. From then on `canary_rollout` judges it;
8. **note** — whatever happened, the run's note says it: "skipped: only N new labels (needs M)",
   "rejected: <the gate's figures> — <why>", "promoted to canary: <ref> at 10%; <figures>", or where
   it failed (`vloop.learn.retrain.run_note`), set through Airflow's public API with connection
   `vloop_airflow_api` (without it the note is only logged).

The golden set is built and frozen with `vloop golden build` (`vloop.learn.golden`); the gate's
figures name the golden version they were measured on.

Logic lives in `vloop.learn.retrain`, `vloop.learn.dataset`, `vloop.learn.registry` and `training`; this file is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import AssetOrTimeSchedule, DeltaDataIntervalTimetable, Param, Variable, dag, task
from vloop_assets import LABELS, SERVING

DEFAULT_ARGS = {
    "owner": "vloop",
    "retries": 1,
    "retry_delay": dt.timedelta(minutes=2),
    "retry_exponential_backoff": True,
}


def _lake():
    from vloop_hooks import LakeHook

    return LakeHook().get_lake()


def _job(context, ti):
    """The training job of this run (its config travels through XCom)."""
    from training.job import TrainJob
    from training.lora import LoraTrainConfig

    raw = dict(ti.xcom_pull(task_ids="build_dataset", key="job"))
    return TrainJob(**{**raw, "lora": LoraTrainConfig(**raw["lora"])})


def _run_training(context, stage: str) -> dict:
    import json
    import os
    import sys
    import tempfile

    from vloop.store.lake import S3Lake

    job, lake, env = _job(context, context["ti"]), _lake(), dict(os.environ)
    if isinstance(lake, S3Lake):  # the trainer opens the same bucket with the connection's keys
        env.update(VLOOP_S3_ENDPOINT=lake.endpoint_url, VLOOP_S3_ACCESS_KEY=lake.access_key or "",
                   VLOOP_S3_SECRET_KEY=lake.secret_key or "")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job.to_dict(), f)
    from vloop.learn.retrain import run_streaming

    # Progress (loss, tokens/s) streams into the task log as it comes, at info level.
    code, out = run_streaming([sys.executable, "-m", "training", "--config", f.name, "--stage", stage], env=env)
    if code:
        raise RuntimeError(f"training stage {stage} exited with {code}; the champion is untouched")
    return json.loads(out)


@dag(
    dag_id="retrain_biweekly",
    # Every 14 days, or as soon as pull lands new labels (check_labels still skips the run when
    # they are fewer than vloop_min_new_labels), so a burst of annotations need not wait.
    schedule=AssetOrTimeSchedule(timetable=DeltaDataIntervalTimetable(dt.timedelta(days=14)), assets=LABELS),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["vloop", "training", "lora"],
    doc_md=__doc__,
    params={
        "min_new_labels": Param(None, type=["null", "integer"], description="override vloop_min_new_labels"),
        "steps": Param(60, type="integer", minimum=1, description="LoRA training steps"),
        "replay_ratio": Param(1.0, type="number", minimum=0, description="replay examples per new label"),
        "now": Param(None, type=["null", "string"], description="simulation mode only (VLOOP_SIMULATION=1): "
                     "the simulated time the canary starts at, ISO 8601"),
        "until": Param(None, type=["null", "string"], format="date",
                       description="last day of labels and replay (YYYY-MM-DD; default: today)"),
        "gate_margin": Param(0.02, type="number", description="golden-set margin over the champion"),
        "category_tolerance": Param(0.05, type="number", description="largest allowed per-category drop"),
        "gate_alpha": Param(0.05, type="number", minimum=0, maximum=1,
                            description="significance of the gate's paired test (its false-pass rate)"),
        "adapter_name": Param("vqa", type="string"),
    },
)
def retrain_biweekly():
    @task
    def check_labels(**context):
        from airflow.sdk.exceptions import AirflowSkipException

        from vloop.learn.registry import Registry
        from vloop.learn.retrain import labels_since_last_training

        lake = _lake()
        minimum = context["params"]["min_new_labels"]
        minimum = int(Variable.get("vloop_min_new_labels", default=100)) if minimum is None else minimum
        n, since = labels_since_last_training(lake, Registry(lake))
        context["ti"].xcom_push(key="labels", value={"new_labels": n, "needed": minimum})  # for the run's note
        if n < minimum:
            raise AirflowSkipException(f"only {n} new labels since {since or 'the start'}; "
                                       f"retraining needs {minimum}")
        return {"new_labels": n, "since": since}

    @task
    def build_dataset(**context):
        from vloop.store.config import load_settings
        from vloop.learn.dataset import DatasetConfig, build_dataset
        from vloop.learn.registry import Registry, new_version

        lake, p, settings = _lake(), context["params"], load_settings()
        cfg = DatasetConfig(replay_ratio=p["replay_ratio"], until=p.get("until"))
        # The curated set at datasets/golden/ (a simulation writes its own there first); without it
        # build_dataset fails and says what to provide.
        manifest = build_dataset(lake, cfg)
        champion = Registry(lake).alias("champion")
        if not settings.base_model:
            raise ValueError("VLOOP_BASE_MODEL is not set: the base model to train an adapter for")
        job = {"dataset_id": manifest["id"], "base_model": settings.base_model, "version": new_version(),
               "adapter_name": p["adapter_name"], "lake_url": lake.url if "://" in lake.url else None,
               "champion_path": champion.path if champion else None,
               "work_dir": str(settings.home / "training"),
               "lora": {"steps": p["steps"]}}
        from training.lora import LoraTrainConfig

        job["lora"] = {**LoraTrainConfig().__dict__, **job["lora"]}
        context["ti"].xcom_push(key="job", value=job)
        return {k: manifest[k] for k in ("id", "examples", "dropped")}

    @task(pool="vloop_gpu")
    def train(**context):
        return _run_training(context, "train")

    @task
    def evaluate(**context):
        return _run_training(context, "evaluate")

    @task
    def gate(**context):
        from vloop.learn.retrain import GateConfig, gate_decision

        job = _job(context, context["ti"])
        metrics = _lake().get_json(job.lake_prefix + "metrics.json")
        p = context["params"]
        from vloop.learn.dataset import manifest

        # passed, reason and the paired test's figures (n, b, c, difference, interval, p), and which
        # golden set version they were measured on (kept in the registry's history by register)
        golden = manifest(_lake(), job.dataset_id).get("golden") or {}
        return {**gate_decision(metrics, GateConfig(margin=p["gate_margin"], category_tolerance=p["category_tolerance"],
                                                    alpha=p["gate_alpha"])),
                "golden_version": golden.get("version")}

    @task
    def register(decision: dict, **context):
        from vloop.learn.registry import AdapterVersion, Registry

        lake, job = _lake(), _job(context, context["ti"])
        training = lake.get_json(job.lake_prefix + "training.json")
        reg = Registry(lake)
        v = reg.register(AdapterVersion(
            name=job.adapter_name, version=job.version, path=job.lake_prefix, base_model=str(job.base_model),
            dataset_id=job.dataset_id, dataset_hash=training["dataset_sha256"], training_config=job.to_dict(),
            metrics=lake.get_json(job.lake_prefix + "metrics.json")), actor="retrain_biweekly",
            reason=f"trained in run {context['run_id']}")
        # The gate's figures (n, discordant b/c, difference and interval, p) go into the history.
        reg.record("gate", {"ref": v.ref, "figures": {k: x for k, x in decision.items() if k != "reason"}},
                   actor="retrain_biweekly", reason=decision["reason"])
        # Approved: it waits for a free canary slot if another experiment runs (vloop.release.canary.start_next).
        reg.set_status(v.ref, "approved" if decision["passed"] else "rejected", actor="retrain_biweekly",
                       reason=decision["reason"])
        return {"ref": v.ref, **decision}

    @task(outlets=[SERVING])  # succeeds only when the canary was deployed (queued and rejected skip)
    def deploy_canary(registered: dict, **context):
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowSkipException

        from vloop.release.canary import ReleaseConfig, parse_stages, simulated_now
        from vloop.learn.retrain import deploy_canary

        if not registered["passed"]:
            raise AirflowSkipException(f"{registered['ref']} rejected: {registered['reason']}; the champion stays")
        conn = BaseHook.get_connection("vloop_serving")
        url = conn.host if not conn.port else f"{conn.host}:{conn.port}"
        stages = parse_stages(Variable.get("vloop_rollout_stages", default="0.1,0.5,1.0"))
        out = deploy_canary(_lake(), registered["ref"], actor="retrain_biweekly", reason=registered["reason"],
                            serving_url=url, token=conn.password, cfg=ReleaseConfig(stages=stages),
                            now=simulated_now(context["params"].get("now")))
        if out.get("queued"):
            raise AirflowSkipException(f"{out['live']} is still the live canary; {out['ref']} is queued (approved) "
                                       "and canary_rollout starts it when that experiment ends")
        return out

    @task(trigger_rule="all_done")
    def note(**context):
        """The run's note in the UI — "skipped: only N new labels (needs M)", "rejected: <figures>",
        "promoted to canary: <figures>" — so a rejected candidate does not hide behind a green run.
        Runs whatever happened before it; when a task failed, it notes where and fails too, so the
        run stays failed."""
        from airflow.sdk.exceptions import AirflowFailException

        from vloop_hooks import set_run_note

        from vloop.learn.retrain import run_note

        ti, run_id = context["ti"], context["run_id"]
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]) or {}
        states = states.get(run_id, states)
        failed = sorted(t for t, st in states.items() if t != ti.task_id and str(st).endswith("failed")
                        and not str(st).endswith("upstream_failed"))
        text = run_note(labels=ti.xcom_pull(task_ids="check_labels", key="labels"),
                        registered=ti.xcom_pull(task_ids="register"), deployed=ti.xcom_pull(task_ids="deploy_canary"),
                        failed=failed)
        set_run_note(context, text)
        if failed:
            raise AirflowFailException(f"the run failed at {', '.join(failed)} (noted on the run)")
        return text

    decision = gate()
    check_labels() >> build_dataset() >> train() >> evaluate() >> decision
    deploy_canary(register(decision)) >> note()


retrain_biweekly()
