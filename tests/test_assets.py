"""The loop's assets: feedback_daily's pull emits vloop_labels (through an alias, only when it
pulled new labels), retrain_biweekly runs on it or every 14 days, and the scheduler's own logic
starts a retraining run from a labels event while the timetable is nowhere near due."""

from __future__ import annotations

import datetime as dt
import uuid

from tests.conftest import load_dag


def test_schedule_wiring():
    from airflow.sdk import AssetOrTimeSchedule, DeltaDataIntervalTimetable

    retrain = load_dag("retrain_biweekly")
    assert isinstance(retrain.timetable, AssetOrTimeSchedule)
    assert retrain.timetable.asset_condition.uri == "vloop://labels/"
    assert retrain.timetable.timetable == DeltaDataIntervalTimetable(dt.timedelta(days=14))  # the time part stays
    pull = load_dag("feedback_daily").get_task("pull")
    assert [o.name for o in pull.outlets] == ["vloop_new_labels"]
    assert [o.name for o in retrain.get_task("deploy_canary").outlets] == ["vloop_serving"]
    assert [o.name for o in load_dag("canary_rollout").get_task("look").outlets] == ["vloop_serving_changes"]


def test_labels_event_triggers_retrain_without_its_timetable(airflow_db):
    from sqlalchemy import delete, select

    from airflow.assets.manager import AssetManager
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    bundle = next(b for b in manager.get_all_dag_bundles() if b.name == "dags-folder")
    sync_bag_to_db(BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name),
                   bundle.name, bundle.version)
    mark = uuid.uuid4().hex
    far = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=13)
    with create_session() as session:
        session.execute(delete(DagRun).where(DagRun.dag_id == "retrain_biweekly",
                                             DagRun.run_type == DagRunType.ASSET_TRIGGERED))
        session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == "retrain_biweekly"))
        dm = session.get(DagModel, "retrain_biweekly")
        # Unpaused, and its 14-day timetable not due for 13 days: only the asset can start a run.
        dm.is_paused, dm.next_dagrun_create_after = False, far
    try:
        with create_session() as session:
            query, triggered = DagModel.dags_needing_dagruns(session)
            assert "retrain_biweekly" not in {d.dag_id for d in query.all()}
        with create_session() as session:
            # What pull's alias event records: an event on vloop_labels.
            labels = session.scalar(select(AssetModel).where(AssetModel.uri == "vloop://labels/"))
            assert labels is not None and "retrain_biweekly" in {r.dag_id for r in labels.scheduled_dags}
            AssetManager.register_asset_change(asset=labels, extra={"new": 150, "mark": mark}, source_alias_names=["vloop_new_labels"],
                                               session=session)
        with create_session() as session:
            query, triggered = DagModel.dags_needing_dagruns(session)
            due = [d for d in query.all() if d.dag_id in triggered]
            assert [d.dag_id for d in due] == ["retrain_biweekly"]
            runner = SchedulerJobRunner(job=Job())
            runner._create_dag_runs_asset_triggered(dag_models=due, session=session)
        with create_session() as session:
            runs = session.scalars(select(DagRun).where(DagRun.dag_id == "retrain_biweekly",
                                                        DagRun.run_type == DagRunType.ASSET_TRIGGERED)).all()
            assert len(runs) == 1
            # (The shared test DB may hold older events, consumed too: the run takes all since the last.)
            assert {"new": 150, "mark": mark} in [e.extra for e in runs[0].consumed_asset_events]
    finally:
        with create_session() as session:
            session.execute(delete(DagRun).where(DagRun.dag_id == "retrain_biweekly",
                                                 DagRun.run_type == DagRunType.ASSET_TRIGGERED))
            session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == "retrain_biweekly"))
            session.get(DagModel, "retrain_biweekly").is_paused = True
