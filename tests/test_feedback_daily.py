"""The daily pipeline: each step of `vloop.curate.daily` on a simulated day (no Airflow), then the
`feedback_daily` DAG end to end with `dag.test()` on a migrated SQLite metadata DB, a local lake
and a real Label Studio server."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

import pytest

from tests.conftest import load_dag
from tests.test_labelstudio import annotate
from vloop.curate import daily
from vloop.sim.traffic import simulated_day
from vloop.curate.labelstudio import LabelStudio
from vloop.store.lake import LocalLake
from vloop.privacy import record_opt_out
from vloop.curate.quality import QualityGateError

D1, D2, D3, D4, D5 = (dt.date(2026, 11, d) for d in (20, 21, 22, 23, 24))


def run_steps(lake, day, **kw):
    daily.ingest(lake, day, dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), dt.timezone.utc))
    daily.validate(lake, day)
    daily.mine_feedback(lake, day)
    daily.score_confidence(lake, day, **kw)
    daily.check_images(lake, day)
    return daily.select_for_labelling(lake, day)


def test_steps_without_airflow(local_lake, base_model_dir):
    from vloop.vlm.model import load_model

    lake = local_lake
    written = simulated_day(lake, D1, 600, seed=4, missing_logprobs=0.05, corrupt=6)
    inter = lake.read_partitions("raw/interactions", D1, D1).to_pandas()
    first_user = inter["user_key"].iloc[100]
    record_opt_out(lake, first_user)
    loads = []
    summary = run_steps(lake, D1, load_model=lambda: loads.append(1) or load_model(base_model_dir))

    q = daily.read_table(lake, "quarantine", D1, "interactions.parquet")
    assert len(q) == 6 and q["quarantine_reason"].str.contains("confidence out of").all()
    assert q["quarantine_reason"].str.contains("latency out of range").all()
    validation = lake.get_json(daily.key("quarantine", D1, "validation.json"))
    assert validation["passed"] and validation["quarantined_interactions"] == 6
    assert validation["interactions_result"]["success"] is False  # the GE result itself is stored
    good, fb = daily.curated(lake, D1)
    assert len(good) == 594 and set(good["request_id"]).isdisjoint(q["request_id"])
    assert len(good) + len(q) == written["interactions"]  # nothing dropped silently

    conf = daily.read_table(lake, "curated", D1, "confidence.parquet")
    rescored = conf[conf["confidence_source"] == "rescored"]
    assert loads == [1] and 10 < len(rescored) < 60  # ~5% without logprobs, model loaded once
    assert rescored["confidence"].between(0, 1).all() and conf["confidence"].notna().all()

    chosen = daily.read_table(lake, "labeling", D1, "selected.parquet")
    assert 0 < len(chosen) <= 200 and summary["selected"] == len(chosen)
    assert first_user not in set(chosen["user_key"])  # opted out
    iq = daily.read_table(lake, "curated", D1, "image_quality.parquet")
    assert iq["poor"].any() and set(chosen["image_key"]).isdisjoint(iq.loc[iq["poor"], "image_key"])
    assert chosen["why"].str.len().gt(0).all()
    pairs = chosen["image_sha256"] + "|" + chosen["question"]
    assert not pairs.duplicated().any()  # diversity: no two identical image + question pairs

    # Selected rows are wrong answers far more often than the day's average.
    truth = written["truth"]
    wrong = lambda df: (df["answer"] != df["request_id"].map(truth)).mean()  # noqa: E731
    assert wrong(chosen) > wrong(good) + 0.2

    report = daily.report(lake, D1)
    metrics = daily.read_table(lake, "reports", D1, "metrics.parquet")
    assert metrics["requests"].sum() == 594 and report["quarantined"] == 6
    assert 0.3 < metrics["acceptance_rate"].iloc[0] < 0.7
    page = lake.get_bytes(daily.key("reports", D1, "index.html")).decode()
    assert page.count("data:image/png;base64,") == 2 and "<table" in page and "Top error categories" in page

    # Selection the next day excludes what was already chosen.
    simulated_day(lake, D2, 300, seed=4)
    run_steps(lake, D2)
    again = daily.read_table(lake, "labeling", D2, "selected.parquet")
    assert set(again["request_id"]).isdisjoint(chosen["request_id"])


def test_a_day_without_traffic_is_a_normal_day(local_lake):
    """A deployment's first night: no interactions, no feedback. Every step succeeds, writes its
    outputs with the columns a day with traffic has, and reports zeros; the report says so."""
    from vloop.curate.mining import WEAK_LABELS

    lake = local_lake
    run_time = lambda day: dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), dt.timezone.utc)  # noqa: E731
    got = {"ingest": daily.ingest(lake, D1, run_time(D1)), "validate": daily.validate(lake, D1),
           "mine": daily.mine_feedback(lake, D1), "confidence": daily.score_confidence(lake, D1),
           "images": daily.check_images(lake, D1), "select": daily.select_for_labelling(lake, D1),
           "report": daily.report(lake, D1)}
    assert got["ingest"]["interactions"] == got["ingest"]["feedback"] == 0
    assert got["validate"]["passed"] and got["validate"]["quarantined_interactions"] == 0
    assert got["mine"]["interactions"] == 0 and all(got["mine"][k] == 0 for k in WEAK_LABELS)
    assert got["confidence"]["interactions"] == got["confidence"]["rescored"] == 0  # no model needed
    assert (got["images"]["images"], got["images"]["poor"]) == (0, 0)
    assert (got["select"]["candidates"], got["select"]["selected"]) == (0, 0)
    assert got["report"]["interactions"] == got["report"]["feedback events"] == 0
    assert got["report"]["traffic"] == "no traffic"
    assert "No traffic" in lake.get_bytes(daily.key("reports", D1, "index.html")).decode()

    # The same outputs, with the same columns, as on a (small) day with traffic.
    simulated_day(lake, D2, 40, seed=3, pool=10)
    run_steps(lake, D2)
    daily.report(lake, D2)
    outputs = [("curated", n) for n in ("interactions.parquet", "feedback.parquet", "mined.parquet",
                                        "confidence.parquet", "image_quality.parquet")] + \
              [("quarantine", "interactions.parquet"), ("labeling", "selected.parquet"),
               ("reports", "metrics.parquet"), ("reports", "top_errors.parquet")]
    for dataset, name in outputs:
        empty = daily.read_table(lake, dataset, D1, name)
        full = daily.read_table(lake, dataset, D2, name)
        assert len(empty) == 0 and list(empty.columns) == list(full.columns), (dataset, name)
    assert "traffic" not in daily.report(lake, D2)


def test_quality_gate_stops_the_day(local_lake):
    simulated_day(local_lake, D1, 200, seed=5, corrupt=30)
    daily.ingest(local_lake, D1, dt.datetime(2026, 11, 21, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(QualityGateError, match="15.0% of interactions"):
        daily.validate(local_lake, D1)
    assert len(daily.read_table(local_lake, "quarantine", D1, "interactions.parquet")) == 30
    # Nothing reaches the curated tables (the hours' validated rows stay staged): nothing downstream.
    assert daily.part_keys(local_lake, "curated", D1, "validated_interactions.parquet")
    assert not daily.part_keys(local_lake, "curated", D1, "interactions.parquet")
    assert not local_lake.exists(daily.key("curated", D1, "interactions.parquet"))


def test_dag_integrity(airflow_db):
    """Every DAG imports cleanly and fast, without heavy libraries at top level, with retries,
    tags and docs."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    for path in sorted((ROOT / "dags").glob("*.py")):
        probe = ("import sys, time, runpy; t = time.time(); runpy.run_path(sys.argv[1]); "
                 "heavy = [m for m in ('torch', 'transformers', 'peft', 'great_expectations', 'pandas', "
                 "'matplotlib') if m in sys.modules]; print(round(time.time() - t, 2), heavy)")
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                             check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")})
        secs, heavy = out.stdout.strip().splitlines()[-1].split(" ", 1)
        assert heavy == "[]", f"{path.name} imports {heavy} at top level"
        assert float(secs) < 10, f"{path.name} takes {secs}s to import"
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors and "feedback_daily" in bag.dags
    for dag_id, dag in bag.dags.items():
        assert dag.tags and dag.doc_md and len(dag.doc_md) > 200, dag_id
        for t in dag.tasks:
            assert t.retries >= 1 or t.task_id in ("validate", "gate"), f"{dag_id}.{t.task_id} has no retries"


def snapshot(lake: LocalLake) -> dict[str, str]:
    return {k: hashlib.sha256(lake.get_bytes(k)).hexdigest() for k in lake.list("")}


def test_feedback_daily_dag_end_to_end(airflow_db, label_studio, base_model_dir, monkeypatch):
    url, token, docroot = label_studio
    lake = LocalLake(docroot / "lake-dag", max_image_bytes=2**20, max_image_pixels=2**20)
    title = "dag test"
    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps(
        {"conn_type": "generic", "extra": {"lake_url": lake.root.as_uri()}}))
    host, port = url.rsplit(":", 1)
    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LABEL_STUDIO", json.dumps(
        {"conn_type": "http", "host": host, "port": int(port), "password": token,
         "extra": {"project_title": title, "document_root": str(docroot)}}))
    monkeypatch.setenv("VLOOP_BASE_MODEL", str(base_model_dir))
    monkeypatch.setenv("AIRFLOW_VAR_VLOOP_LABEL_BUDGET", "40")
    dag = load_dag("feedback_daily")

    def run(day):  # the run for [D, D+1) is the one whose logical date is D+1 00:00
        dr = dag.test(logical_date=dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc))
        return dr.state, {ti.task_id: ti.state for ti in dr.get_task_instances()}

    simulated_day(lake, D1, 300, seed=6, missing_logprobs=0.03, corrupt=3, adapter="shoes@2", canary_share=0.1)
    state, tis = run(D1)
    assert state == "success", tis
    ls = LabelStudio(url, token)
    pid = ls.ensure_project(title)
    tasks = ls.export(pid, all_tasks=True)
    chosen = daily.read_table(lake, "labeling", D1, "selected.parquet")
    assert len(tasks) == len(chosen) == 40
    assert {t["data"]["request_id"] for t in tasks} == set(chosen["request_id"])
    # Annotators read the image check with NIQE, computed for the photos they get (the day's check skips it).
    assert any("NIQE" in t["data"]["image_flags"] for t in tasks)
    preds = [p for t in tasks for p in ls._call("GET", "/api/predictions", params={"task": t["id"]})]
    # Annotators see model versions as names ("base" or name@version), never the base model's path.
    assert {p["model_version"] for p in preds} <= {"base", "shoes@2"} and preds[0]["result"][0]["type"] == "textarea"
    assert len(daily.read_table(lake, "quarantine", D1, "interactions.parquet")) == 3

    # Annotators work through half of the tasks: wrong answers get the right one typed in.
    truth = {t["data"]["request_id"]: t for t in tasks}
    for t in tasks[:20]:
        annotate(ls, t["id"], "wrong", "the right answer")
    simulated_day(lake, D2, 200, seed=7)
    state, tis = run(D2)
    assert state == "success", tis
    labeled = daily.read_table(lake, "labeled", D2, daily.LABELED_FILE)
    assert sorted(labeled["request_id"]) == sorted(t["data"]["request_id"] for t in tasks[:20])
    assert (labeled["corrected_answer"] == "the right answer").all() and (labeled["verdict"] == "wrong").all()
    assert labeled["image_key"].notna().all() and labeled["lead_time_s"].eq(7.5).all()
    assert set(labeled["request_id"]) <= set(truth)
    metrics = daily.read_table(lake, "reports", D2, "metrics.parquet")
    assert metrics["judged"].sum() == 20  # calibration is computed over today's 20 verdicts

    # Re-running a day changes nothing, in the lake or in Label Studio.
    before, n_tasks = snapshot(lake), len(ls.export(pid, all_tasks=True))
    state, _ = run(D2)
    assert state == "success"
    assert snapshot(lake) == before and len(ls.export(pid, all_tasks=True)) == n_tasks

    # A day without traffic is a normal day.
    state, tis = run(D5)
    assert state == "success" and set(tis.values()) == {"success"}, tis
    assert "No traffic" in lake.get_bytes(daily.key("reports", D5, "index.html")).decode()

    # Without a Label Studio connection, push and pull are skipped and the report still runs.
    ls_connection = os.environ["AIRFLOW_CONN_VLOOP_LABEL_STUDIO"]
    monkeypatch.delenv("AIRFLOW_CONN_VLOOP_LABEL_STUDIO")
    simulated_day(lake, D4, 100, seed=9)
    state, tis = run(D4)
    assert state == "success" and tis["push"] == tis["pull"] == "skipped" and tis["report"] == "success"
    assert lake.exists(daily.key("reports", D4, "index.html"))

    # A bad day: the quality gate fails the run, nothing downstream of it runs, the rows are kept;
    # but the annotations finished meanwhile are still pulled.
    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LABEL_STUDIO", ls_connection)
    annotate(ls, tasks[20]["id"], "correct")
    simulated_day(lake, D3, 100, seed=8, corrupt=20)
    state, tis = run(D3)
    assert state == "failed" and tis["validate"] == "failed"
    assert all(tis[t] == "upstream_failed" for t in ("mine", "select", "push", "report"))
    assert tis["pull"] == "success"
    pulled = daily.read_table(lake, "labeled", D3, daily.LABELED_FILE)
    assert list(pulled["request_id"]) == [tasks[20]["data"]["request_id"]]
    assert len(daily.read_table(lake, "quarantine", D3, "interactions.parquet")) == 20
    ls.close()
