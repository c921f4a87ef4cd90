"""The vloop page in the Airflow UI (wiring; the page is built by ``vloop.uipage``).

A FastAPI app mounted in Airflow's API server at ``/vloop``, a navigation entry ("vloop") and a
per-run view on feedback_daily and retrain_biweekly runs. Plugin routes are not behind Airflow's
login by themselves: every route resolves the caller the way Airflow's own API does (a bearer JWT,
or the UI's ``_token`` cookie, which the UI's iframe sends) and asks the auth manager whether that
user may read the DAG runs shown.
"""

from __future__ import annotations

import datetime as dt

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse

from airflow.plugins_manager import AirflowPlugin

PREFIX = "/vloop"
DAG_IDS = ("feedback_daily", "retrain_biweekly", "canary_rollout")


async def _user(request: Request):
    """Airflow's own ``get_user`` (401 without a credential, 403 for a bad one). Imported here,
    not at module level: every Airflow process loads plugins, only the API server serves this."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


def _may_read_runs(user, dag_ids) -> None:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    manager = get_auth_manager()
    for dag_id in dag_ids:
        if not manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                         details=DagDetails(id=dag_id), user=user):
            raise HTTPException(403, "Forbidden")


async def _reader(request: Request):
    user = await _user(request)
    _may_read_runs(user, DAG_IDS)
    return user


def _lake():
    from vloop_hooks import LakeHook

    return LakeHook().get_lake()


def _airflow_base() -> str:
    from airflow.api_fastapi.app import API_ROOT_PATH

    return API_ROOT_PATH or "/"


app = FastAPI(title="vloop", dependencies=[Depends(_reader)])


@app.get("/", response_class=HTMLResponse)
def page(request: Request) -> str:
    from vloop.uipage import page_data, render_page

    return render_page(page_data(_lake()), airflow_base=_airflow_base(),
                       self_base=request.scope.get("root_path", PREFIX).rstrip("/"))


@app.get("/reports/{day}", response_class=HTMLResponse)
def daily_report(day: str) -> str:
    try:  # a date, not a path: nothing but reports/dt=YYYY-MM-DD/ is reachable
        day = dt.date.fromisoformat(day).isoformat()
    except ValueError:
        raise HTTPException(404, "no such day") from None
    from vloop.store.lake import LakeKeyNotFound

    try:
        return _lake().get_bytes(f"reports/dt={day}/index.html").decode()
    except LakeKeyNotFound:
        raise HTTPException(404, f"no report for {day}") from None


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
def run_view(dag_id: str, run_id: str, user=Depends(_reader)) -> str:
    _may_read_runs(user, [dag_id])
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from vloop.uipage import render_run, run_day

    with create_session() as session:
        dr = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if dr is None:
            raise HTTPException(404, "no such run")
        day = run_day(dr.conf, dr.data_interval_start) if dag_id == "feedback_daily" else None
    return render_run(_lake(), dag_id, run_id, day, airflow_base=_airflow_base())


class VloopUIPlugin(AirflowPlugin):
    name = "vloop"
    fastapi_apps = [{"app": app, "url_prefix": PREFIX, "name": "vloop"}]
    external_views = [
        {"name": "vloop", "href": f"{PREFIX}/", "destination": "nav", "url_route": "vloop",
         "nav_top_level": True},
        # The UI fills in {DAG_ID} and {RUN_ID}; other DAGs' runs get a one-line "no view".
        {"name": "vloop report", "href": f"{PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "vloop_run"},
    ]
