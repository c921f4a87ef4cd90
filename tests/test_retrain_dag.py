"""The retrain_biweekly DAG with dag.test() on the tiny Qwen3-VL, a local lake and a real
serving process: good labels → candidate passes the gate and serves as a 10% canary; poisoned
labels → rejected with its reason, nothing changes in serving; too few labels → skipped."""

from __future__ import annotations

import datetime as dt
import json

import requests

from tests.conftest import load_dag
from tests.test_serving import TOKEN, Server
from tests.test_training import write_labels
from vloop.curate import daily
from vloop.learn.dataset import ensure_golden
from vloop.sim.traffic import simulated_day
from vloop.store.lake import LocalLake
from vloop.learn.registry import Registry
from vloop.sim.synth import World

DAY = dt.date(2026, 11, 20)


def test_retrain_biweekly(airflow_db, base_model_dir, tmp_path, monkeypatch):
    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    # Yesterday's traffic: colour questions, mostly answered right and accepted (the replay source).
    simulated_day(lake, DAY, 300, seed=12, accuracy=0.9, intents=("colour",))
    daily.ingest(lake, DAY, dt.datetime(2026, 11, 21, 1, tzinfo=dt.timezone.utc))
    for step in (daily.validate, daily.mine_feedback, daily.score_confidence, daily.check_images):
        step(lake, DAY)
    # The product's golden set: colour questions over every colour the shop sells.
    # (200 items: the gate's paired test needs them to see a real gain; with 120 a candidate 0.07
    # better came out at p=0.058 on this machine's build of the base.)
    ensure_golden(lake, samples=World(424242).samples(200, intents=("colour",)))
    # Annotators corrected answers about the colours the base never learned.
    write_labels(lake, DAY, World(5).samples(80, colours=("white", "yellow"), intents=("colour",)))

    srv = Server(base_model_dir, lake.root.as_uri(), tmp_path).start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({"conn_type": "generic",
                                                                  "extra": {"lake_url": lake.root.as_uri()}}))
        monkeypatch.setenv("AIRFLOW_CONN_VLOOP_SERVING", json.dumps(
            {"conn_type": "http", "host": "http://127.0.0.1", "port": srv.port, "password": TOKEN}))
        monkeypatch.setenv("VLOOP_BASE_MODEL", str(base_model_dir))
        monkeypatch.setenv("VLOOP_HOME", str(tmp_path / "home"))
        dag = load_dag("retrain_biweekly")
        conf = {"min_new_labels": 10, "steps": 60, "replay_ratio": 0.5}

        dr = dag.test(run_conf=conf)
        tis = {ti.task_id: ti.state for ti in dr.get_task_instances()}
        assert dr.state == "success" and tis["deploy_canary"] == "success", tis
        reg = Registry(lake)
        canary = reg.alias("canary")
        assert canary is not None and reg.state().statuses[canary.ref] == "canary"
        assert canary.dataset_id.startswith("ds-") and canary.metrics["sets"]["golden"]["candidate"]
        routes = requests.get(srv.url + "/admin/routes", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert routes["canary"] == canary.ref and routes["canary_share"] == 0.1 and routes["champion"] is None
        models = [m["id"] for m in requests.get(srv.url + "/v1/models").json()["data"]]
        assert canary.ref in models

        # Poisoned labels: every colour is "banana". The candidate is rejected, serving unchanged.
        # New labels are those dated after the newest adapter was registered (now, in real time):
        # a fixed date stopped counting as new once the calendar passed it.
        later = max(DAY + dt.timedelta(days=14), dt.date.today() + dt.timedelta(days=1))
        poison = World(6).samples(80, intents=("colour",))
        write_labels(lake, later, poison, answers={i: "banana" for i in range(len(poison))})
        dr = dag.test(run_conf={**conf, "replay_ratio": 0.0})
        tis = {ti.task_id: ti.state for ti in dr.get_task_instances()}
        assert tis["register"] == "success" and tis["deploy_canary"] == "skipped", tis
        st = reg.state()
        rejected = [r for r, s in st.statuses.items() if s == "rejected"]
        assert len(rejected) == 1 and "does not beat the champion" in st.reasons[rejected[0]]
        assert st.aliases == {"champion": None, "canary": canary.ref}
        routes = requests.get(srv.url + "/admin/routes", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert routes["canary"] == canary.ref

        # Too few new labels: skipped with the reason, nothing trained.
        n_versions = len(reg.versions())
        dr = dag.test(run_conf={**conf, "min_new_labels": 1000})
        tis = {ti.task_id: ti.state for ti in dr.get_task_instances()}
        assert tis["check_labels"] == "skipped" and tis["train"] == "skipped"
        assert len(reg.versions()) == n_versions
    finally:
        srv.stop()


def _airflow_api_server(tmp_path, monkeypatch):
    """Airflow's own API server (create_app: simple auth manager, /auth/token, the public API)
    over HTTP on loopback, in a thread of this process (same metadata database as dag.test()),
    with one user whose password we know. Returns (url, stop)."""
    import threading
    import time

    import uvicorn

    from tests.conftest import free_port

    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"noter": "n0te-pw"}))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "noter:admin")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    from airflow.api_fastapi.app import create_app, purge_cached_app

    purge_cached_app()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "the Airflow API server did not start"

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        purge_cached_app()

    return f"http://127.0.0.1:{port}", stop


def test_run_notes_say_rejected_and_skipped(airflow_db, tiny_model_dir, tmp_path, monkeypatch):
    """A rejected candidate's run is green, so its note says "rejected: <figures>"; a run with
    too few labels says "skipped: only N new labels (needs M)". Fast: the random tiny model, 2
    training steps, a gate margin no candidate can meet, no serving (a rejected run never deploys)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    ensure_golden(lake, samples=World(424242).samples(12, intents=("colour",)))
    write_labels(lake, DAY, World(5).samples(16, intents=("colour",)))
    url, stop = _airflow_api_server(tmp_path, monkeypatch)
    try:
        monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({"conn_type": "generic",
                                                                  "extra": {"lake_url": lake.root.as_uri()}}))
        monkeypatch.setenv("AIRFLOW_CONN_VLOOP_AIRFLOW_API", json.dumps(
            {"conn_type": "http", "host": url, "login": "noter", "password": "n0te-pw"}))
        monkeypatch.setenv("VLOOP_BASE_MODEL", str(tiny_model_dir))
        monkeypatch.setenv("VLOOP_HOME", str(tmp_path / "home"))
        dag = load_dag("retrain_biweekly")

        def note_of(dr):
            with create_session() as s:
                return s.scalar(select(DagRun).where(DagRun.dag_id == dr.dag_id, DagRun.run_id == dr.run_id)).note

        dr = dag.test(run_conf={"min_new_labels": 1, "steps": 2, "replay_ratio": 0.0, "gate_margin": 1.0})
        tis = {ti.task_id: ti.state for ti in dr.get_task_instances()}
        assert dr.state == "success" and tis["deploy_canary"] == "skipped" and tis["note"] == "success", tis
        rejected = [r for r, st in Registry(lake).state().statuses.items() if st == "rejected"]
        note = note_of(dr)
        assert note.startswith("rejected: golden exact match "), note
        assert "vs champion" in note and "McNemar p=" in note and "n=12" in note and "golden v1" in note
        assert "below the 1.000 margin" in note and note.endswith(rejected[0])

        dr = dag.test(run_conf={"min_new_labels": 1000})
        assert note_of(dr) == "skipped: only 0 new labels (needs 1000)"  # none since the adapter above
    finally:
        stop()
