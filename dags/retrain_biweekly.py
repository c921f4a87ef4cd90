"""
### retrain_biweekly — a new LoRA adapter from the labels, served as a canary if it earns it

Every 14 days (or on a manual trigger, with params):

1. **check_labels** — skips the run, saying why, when fewer labels than `min_new_labels` (Variable
   `vloop_min_new_labels`) arrived since the last registered adapter;
2. **build_dataset** — `datasets/<id>/`: corrected and confirmed labels, replay of confident
   accepted answers, the fixed golden set kept apart (`vloop.dataset`);
3. **train** — `python -m training --stage train` in a subprocess (checkpoints; a retry resumes).
   On GPU nodes run the same image with a KubernetesPodOperator instead (see `training/README.md`);
4. **evaluate** — candidate and champion side by side on the golden set and held-out labels;
5. **gate** — the candidate must beat the champion by a margin on the golden set and not regress
   any category beyond a tolerance;
6. **register** — the version goes into the registry with its lineage; a rejected one is recorded
   as `rejected` with the reason, and the champion stays;
7. **deploy_canary** — serving (connection `vloop_serving`) loads the adapter and routes
   `canary_share` (Variable `vloop_canary_share`, 10% by default) of users to it.

Logic lives in `vloop.retrain`, `vloop.dataset`, `vloop.registry` and `training`; this file is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, Variable, dag, task

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
    import subprocess
    import sys
    import tempfile

    from vloop.lake import S3Lake

    job, lake, env = _job(context, context["ti"]), _lake(), dict(os.environ)
    if isinstance(lake, S3Lake):  # the trainer opens the same bucket with the connection's keys
        env.update(VLOOP_S3_ENDPOINT=lake.endpoint_url, VLOOP_S3_ACCESS_KEY=lake.access_key or "",
                   VLOOP_S3_SECRET_KEY=lake.secret_key or "")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job.to_dict(), f)
    # Output streams into the task log as it comes (progress lines with loss and tokens/s).
    proc = subprocess.run([sys.executable, "-m", "training", "--config", f.name, "--stage", stage],
                          stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"training stage {stage} exited with {proc.returncode}; the champion is untouched")
    return json.loads(proc.stdout)


@dag(
    dag_id="retrain_biweekly",
    schedule=dt.timedelta(days=14),
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
        "gate_margin": Param(0.02, type="number", description="golden-set margin over the champion"),
        "category_tolerance": Param(0.05, type="number", description="largest allowed per-category drop"),
        "adapter_name": Param("vqa", type="string"),
    },
)
def retrain_biweekly():
    @task
    def check_labels(**context):
        from airflow.sdk.exceptions import AirflowSkipException

        from vloop.registry import Registry
        from vloop.retrain import labels_since_last_training

        lake = _lake()
        minimum = context["params"]["min_new_labels"]
        minimum = int(Variable.get("vloop_min_new_labels", default=100)) if minimum is None else minimum
        n, since = labels_since_last_training(lake, Registry(lake))
        if n < minimum:
            raise AirflowSkipException(f"only {n} new labels since {since or 'the start'}; "
                                       f"retraining needs {minimum}")
        return {"new_labels": n, "since": since}

    @task
    def build_dataset(**context):
        from vloop.config import load_settings
        from vloop.dataset import DatasetConfig, build_dataset
        from vloop.registry import Registry, new_version

        lake, p = _lake(), context["params"]
        manifest = build_dataset(lake, DatasetConfig(replay_ratio=p["replay_ratio"]))
        champion = Registry(lake).alias("champion")
        settings = load_settings()
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
        from vloop.retrain import GateConfig, gate

        job = _job(context, context["ti"])
        metrics = _lake().get_json(job.lake_prefix + "metrics.json")
        p = context["params"]
        passed, reason = gate(metrics, GateConfig(margin=p["gate_margin"], category_tolerance=p["category_tolerance"]))
        return {"passed": passed, "reason": reason}

    @task
    def register(decision: dict, **context):
        from vloop.registry import AdapterVersion, Registry

        lake, job = _lake(), _job(context, context["ti"])
        training = lake.get_json(job.lake_prefix + "training.json")
        reg = Registry(lake)
        v = reg.register(AdapterVersion(
            name=job.adapter_name, version=job.version, path=job.lake_prefix, base_model=str(job.base_model),
            dataset_id=job.dataset_id, dataset_hash=training["dataset_sha256"], training_config=job.to_dict(),
            metrics=lake.get_json(job.lake_prefix + "metrics.json")), actor="retrain_biweekly",
            reason=f"trained in run {context['run_id']}")
        if not decision["passed"]:
            reg.set_status(v.ref, "rejected", actor="retrain_biweekly", reason=decision["reason"])
        return {"ref": v.ref, **decision}

    @task
    def deploy_canary(registered: dict, **context):
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowSkipException

        from vloop.registry import Registry
        from vloop.retrain import deploy_canary

        if not registered["passed"]:
            raise AirflowSkipException(f"{registered['ref']} rejected: {registered['reason']}; the champion stays")
        conn = BaseHook.get_connection("vloop_serving")
        url = conn.host if not conn.port else f"{conn.host}:{conn.port}"
        share = float(Variable.get("vloop_canary_share", default=0.1))
        reg = Registry(_lake())
        v = reg.get(registered["ref"])
        routes = deploy_canary(url, conn.password, v.ref, v.path, share)
        reg.set_alias("canary", v.ref, actor="retrain_biweekly", reason=f"canary at {share:.0%}: {registered['reason']}")
        return routes

    decision = gate()
    check_labels() >> build_dataset() >> train() >> evaluate() >> decision
    deploy_canary(register(decision))


retrain_biweekly()
