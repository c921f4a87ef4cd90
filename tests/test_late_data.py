"""Late data in feedback_daily (dag.test() on a local lake, no Label Studio): the run for day D
waits for the gateways' shippers (their watermarks in the lake) or a grace period, and re-mines
D-1 so feedback that arrived after D-1's run counts."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from tests.conftest import load_dag
from vloop.curate import daily
from vloop.sim.traffic import simulated_day
from vloop.store.lake import LocalLake, partition_prefix
from vloop.store.schema import FEEDBACK

D1, D2 = dt.date(2026, 10, 5), dt.date(2026, 10, 6)


def test_late_feedback_is_mined_into_the_previous_day(airflow_db, tmp_path, monkeypatch):
    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({"conn_type": "generic",
                                                              "extra": {"lake_url": lake.root.as_uri()}}))
    monkeypatch.delenv("AIRFLOW_CONN_VLOOP_LABEL_STUDIO", raising=False)
    # The days lie weeks back: only a watermark past D's end (not the grace period) lets a run go.
    monkeypatch.setenv("AIRFLOW_VAR_VLOOP_LATE_DATA_GRACE_MINUTES", str(10**8))
    dag = load_dag("feedback_daily")

    def run(day):
        dr = dag.test(logical_date=dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc))
        return dr.state, {ti.task_id: ti.state for ti in dr.get_task_instances()}

    simulated_day(lake, D1, 150, seed=3)
    lake.put_json("shippers/gw-1.json", {"spool": "gw-1", "shipped_through": f"{D2}T00:00:00+00:00",
                                         "updated_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    state, tis = run(D1)
    assert state == "success" and tis["wait_for_shippers"] == tis["remine_previous_day"] == "success", tis
    before = daily.read_table(lake, "curated", D1, "mined.parquet").set_index("request_id")
    quiet = before.index[before["weak_label"] == "unknown"][:8].tolist()
    assert len(quiet) == 8  # answers nobody reacted to on D1

    # Next morning those users edit the answers; the gateway's shipper lands the events in D2
    # (appended after D2's simulated traffic, which replaces the day as it is written).
    simulated_day(lake, D2, 100, seed=4)
    late = [{"event_id": uuid.uuid4().hex, "request_id": rid, "ts": dt.datetime.combine(D2, dt.time(8), dt.timezone.utc),
             "type": "edit", "edited_text": "a better answer", "dwell_ms": None, "rating": None} for rid in quiet]
    lake.write_parquet(partition_prefix("raw/feedback", D2) + "seg-late.parquet", FEEDBACK.to_table(late))
    lake.put_json("shippers/gw-1.json", {"spool": "gw-1", "shipped_through": f"{D2 + dt.timedelta(days=1)}T00:05:00+00:00",
                                         "updated_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    state, tis = run(D2)
    assert state == "success" and tis["remine_previous_day"] == "success", tis
    after = daily.read_table(lake, "curated", D1, "mined.parquet").set_index("request_id")
    assert (after.loc[quiet, "weak_label"] == "negative").all() and (after.loc[quiet, "reason"] == "edited").all()
    others = before.index.difference(quiet)
    assert (after.loc[others, "weak_label"] == before.loc[others, "weak_label"]).all()
