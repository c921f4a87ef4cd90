"""The vloop page in the Airflow UI: the page's content (vloop.uipage, without Airflow) and the
plugin served by Airflow's own API app, refusing callers without Airflow's login."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import pytest

from vloop import uipage
from vloop.curate.daily import put_frame
from vloop.learn.registry import AdapterVersion, Registry

T0 = dt.datetime(2026, 11, 2, 0, 0, tzinfo=dt.timezone.utc)


def _loop_state(lake, t0: dt.datetime = T0):
    """A champion, a live canary (started at ``t0``, two hours of traffic) from a retrain run with
    its gate figures, one rejected round, and a daily report."""
    from vloop.learn.retrain import deploy_canary

    reg = Registry(lake)
    refs = []
    for name, run in (("champ", None), ("cand", "scheduled__2026-11-01"), ("bad", "manual__x")):
        v = reg.register(AdapterVersion(name=name, version="v1", path=f"adapters/{name}/v1/", base_model="tiny",
                                        metrics={"sets": {"heldout": {"candidate": {"overall": {"exact_match": 0.61}},
                                                                      "champion": {"overall": {"exact_match": 0.55}}}}}),
                         actor="retrain_biweekly", reason=f"trained in run {run}" if run else "trained")
        refs.append(v.ref)
    lake.put_json("adapters/cand/v1/training.json", {"seconds": 42.5, "examples": 300})
    reg.set_alias("champion", refs[0], actor="test", reason="first")
    reg.record("gate", {"ref": refs[1], "figures": {"passed": True, "candidate": 0.7, "champion": 0.6,
                                                    "difference": 0.1, "interval": [0.03, 0.17], "p": 0.004}},
               actor="retrain_biweekly", reason="beats the champion by 0.100")
    reg.record("gate", {"ref": refs[2], "figures": {"passed": False, "candidate": 0.5, "champion": 0.6}},
               actor="retrain_biweekly", reason="worse than the champion <on golden>")
    reg.set_status(refs[2], "rejected", actor="retrain_biweekly", reason="worse than the champion <on golden>")
    deploy_canary(lake, refs[1], actor="test", reason="gate passed", now=t0)
    from tests.test_canary import traffic

    traffic(lake, reg.serving_state(), t0, 2, 60, {"champion": 0.5, "canary": 0.8}, seed=1)
    day = "2026-11-01"
    put_frame(lake, f"reports/dt={day}/metrics.parquet",
              pd.DataFrame({"model_version": ["champ@v1", "cand@v1"], "arm": ["champion", "canary"],
                            "requests": [900, 100], "acceptance_rate": [0.7, 0.75], "edit_rate": [0.1, 0.08]}))
    put_frame(lake, f"reports/dt={day}/error_types.parquet",
              pd.DataFrame({"arm": ["all", "all", "canary"], "rank": [1, 2, 1],
                            "error_type": ["wrong colour", "miscount", "wrong colour"], "errors": [30, 10, 3],
                            "share": [0.6, 0.2, 0.5]}))
    lake.put_bytes(f"reports/dt={day}/index.html", b"<html><body>daily report 2026-11-01</body></html>", "text/html")
    return refs, day


def test_page_shows_serving_experiment_rounds_and_reports(local_lake):
    refs, day = _loop_state(local_lake)
    data = uipage.page_data(local_lake, now=T0 + dt.timedelta(hours=3))
    live = data["live"]
    assert live["champion"] == refs[0] and live["canary"] == refs[1] and "decision" in live
    assert {a["arm"] for a in live["arms"]} >= {"champion", "canary"}
    assert all(-1 <= m["lower"] <= m["upper"] <= 1 for m in live["metrics"])
    by_ref = {r["ref"]: r for r in data["rounds"]}
    assert by_ref[refs[1]]["gate_passed"] is True and by_ref[refs[1]]["training_s"] == 42.5
    assert by_ref[refs[1]]["run_id"] == "scheduled__2026-11-01" and by_ref[refs[1]]["heldout_candidate"] == 0.61
    assert by_ref[refs[2]]["status"] == "rejected"
    assert [d["day"] for d in data["days"]] == [day]
    assert data["days"][0]["url"] is None  # a local lake's file:// URL is no link for a browser
    page = uipage.render_page(data, airflow_base="/", self_base="/vloop")
    for text in (refs[0], refs[1], "a look now would decide", "always-valid", "wrong colour", "/vloop/reports/2026-11-01",
                 "/dags/retrain_biweekly/runs/scheduled__2026-11-01", "worse than the champion &lt;on golden&gt;"):
        assert text in page, text
    assert "miscount" in page and page.count("wrong colour") == 1  # top types over all arms only

    run = uipage.render_run(local_lake, "feedback_daily", "scheduled__x", uipage.run_day({}, T0 - dt.timedelta(days=1)))
    assert "daily report 2026-11-01" in run
    assert uipage.run_day({"day": "2026-10-30"}, T0) == "2026-10-30"
    assert refs[1] in uipage.render_run(local_lake, "retrain_biweekly", "scheduled__2026-11-01", None)
    assert "registered no adapter" in uipage.render_run(local_lake, "retrain_biweekly", "manual__skipped", None)


def test_empty_lake_page(local_lake):
    page = uipage.render_page(uipage.page_data(local_lake))
    assert "no live experiment" in page and "no daily report yet" in page


def test_s3_report_links_are_presigned(s3_lake):
    s3_lake.put_bytes("reports/dt=2026-11-01/index.html", b"<html></html>", "text/html")
    url = uipage.report_url(s3_lake, "2026-11-01")
    assert url.startswith("http") and "X-Amz-Signature" in url


@pytest.fixture
def airflow_api(airflow_db, tmp_path, monkeypatch, local_lake):
    """Airflow's own API app (create_app: the simple auth manager, /auth/token, plugins mounted),
    in-process, with this project's plugins/ and one user whose password we know."""
    from pathlib import Path

    from fastapi.testclient import TestClient

    from airflow import plugins_manager, settings

    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"operator": "s3cret-pw"}))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "operator:admin")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({"conn_type": "generic",
                                                              "extra": {"lake_url": local_lake.url}}))
    monkeypatch.setattr(settings, "PLUGINS_FOLDER", str(Path(__file__).resolve().parents[1] / "plugins"))
    for f in (plugins_manager._get_plugins, plugins_manager.get_fastapi_plugins, plugins_manager._get_ui_plugins):
        f.cache_clear()
    from airflow.api_fastapi.app import create_app, purge_cached_app

    purge_cached_app()
    try:
        with TestClient(create_app()) as client:
            yield client
    finally:
        purge_cached_app()
        for f in (plugins_manager._get_plugins, plugins_manager.get_fastapi_plugins, plugins_manager._get_ui_plugins):
            f.cache_clear()


def test_plugin_page_needs_airflow_login(airflow_api, local_lake):
    _loop_state(local_lake)
    client = airflow_api
    # Without a credential, with a forged one, and on every route: refused.
    for path in ("/vloop/", "/vloop/reports/2026-11-01", "/vloop/runs/feedback_daily/x"):
        assert client.get(path).status_code == 401, path
    assert client.get("/vloop/", headers={"Authorization": "Bearer not-a-jwt"}).status_code in (401, 403)
    assert client.get("/vloop/", cookies={"_token": "not-a-jwt"}).status_code in (401, 403)
    bad = client.post("/auth/token", json={"username": "operator", "password": "wrong"})
    assert bad.status_code == 401

    token = client.post("/auth/token", json={"username": "operator", "password": "s3cret-pw"}).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    page = client.get("/vloop/", headers=auth)
    assert page.status_code == 200 and "cand@v1" in page.text and "champ@v1" in page.text
    # The UI's iframe carries the login as the _token cookie instead of a header.
    client.cookies.set("_token", token)
    assert client.get("/vloop/reports/2026-11-01").text.endswith("daily report 2026-11-01</body></html>")
    client.cookies.clear()
    assert client.get("/vloop/reports/..%2F..%2Fregistry", headers=auth).status_code == 404
    assert client.get("/vloop/runs/feedback_daily/nope", headers=auth).status_code == 404

    # The UI learns the navigation entry and the per-run view from the plugins endpoint.
    plugins = client.get("/api/v2/plugins", headers=auth).json()["plugins"]
    views = {v["name"]: v for p in plugins if p["name"] == "vloop" for v in p["external_views"]}
    assert views["vloop"]["href"] == "/vloop/" and views["vloop report"]["destination"] == "dag_run"
