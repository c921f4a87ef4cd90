"""A person's approval before full rollout (vloop.release.approval): in manual mode a look that
decides *promote* at the last stage leaves the promotion pending; Approve promotes, Reject rolls
back with the person's name and comment as the reason, no answer keeps the champion. Every answer
is a registry event naming the person. Then `vloop rollout approve|reject` from a terminal, and the
DAGs (dag.test()): canary_rollout's look starts promotion_approval once per request and goes on
looking, promotion_approval asks through its human-in-the-loop task, answered from another thread
as the Required Actions page's PATCH does."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pandas as pd
import pytest

from tests.test_canary import fixed_experiment_salt, register, traffic  # noqa: F401 (autouse fixture)
from vloop.learn.registry import Registry
from vloop.release import approval, canary
from vloop.release.rollout import RolloutPolicy

T0 = dt.datetime(2026, 11, 2, 0, 0, tzinfo=dt.timezone.utc)
# One stage before the champion: the first promote decision is the last stage's.
CFG = canary.ReleaseConfig(stages=(0.5, 1.0), policy=RolloutPolicy(min_hours=2, min_requests=100, max_hours=12))
BETTER = {"champion": 0.5, "canary": 0.9}


def live_canary(lake, seed: int = 1, hours: int = 3, users_per_hour: int = 150, t0: dt.datetime = T0,
                names: tuple[str, str] = ("champ", "cand")):
    """champ serving, cand the canary at 50% since ``t0`` with ``hours`` of clearly better traffic;
    a gate record."""
    reg = Registry(lake)
    champ, cand = register(reg, *names)
    reg.set_alias("champion", champ, actor="test", reason="first")
    reg.record("gate", {"ref": cand, "figures": {"passed": True, "set": "golden", "metric": "exact_match",
                                                 "candidate": 0.81, "champion": 0.72, "difference": 0.09,
                                                 "interval": [0.04, 0.14], "p": 0.0012, "n": 200, "b": 25, "c": 7}},
               actor="retrain_biweekly", reason="passed: golden exact match 0.810 vs champion 0.720")
    st = canary.start(reg, cand, actor="test", reason="passed the gate", cfg=CFG, now=t0)
    traffic(lake, st, t0, hours, users_per_hour, BETTER, seed=seed)
    return reg, champ, cand


def events(reg, kind):
    return [e for e in reg.history() if e["kind"] == kind]


def test_modes_and_timeouts_parse():
    assert approval.parse_mode(None) == "auto" and approval.parse_mode(" Manual ") == "manual"
    with pytest.raises(ValueError, match="auto, manual"):
        approval.parse_mode("sometimes")
    assert approval.parse_timeout_hours(None) == 24 and approval.parse_timeout_hours("1.5") == 1.5
    for bad in ("0", "-3", "soon", "nan"):
        with pytest.raises(ValueError):
            approval.parse_timeout_hours(bad)
    assert approval.parse_users(" alice, bob ") == [{"id": "alice", "name": "alice"}, {"id": "bob", "name": "bob"}]
    assert approval.parse_users("") is None
    assert approval.ON_TIMEOUT != approval.APPROVE and approval.ON_TIMEOUT in approval.OPTIONS


def test_manual_mode_asks_and_an_approval_promotes_naming_the_person(local_lake):
    reg, champ, cand = live_canary(local_lake)
    # The daily report's erroneous answers of the experiment's day, per arm and model.
    from vloop.curate.daily import REPORTS, key, put_frame

    put_frame(local_lake, key(REPORTS, T0.date(), "errors.parquet"), pd.DataFrame({
        "request_id": [f"r{i}" for i in range(6)], "source": "edit",
        "model_version": [champ, champ, champ, cand, cand, "other@v0"],
        "arm": ["champion", "champion", "champion", "canary", "canary", "canary"], "category": "shoes",
        "question": "what colour?", "answer": "red", "correction": "blue",
        "error_types": ["wrong colour", "wrong colour; too long", "hedging", "too long", "too long", "refused"]}))

    now = T0 + dt.timedelta(hours=3)
    r = canary.step(local_lake, CFG, now=now, approval="manual")
    assert r.action == "awaiting_approval" and r.decision.action == "promote", r.summary
    head = reg.serving_state()
    assert head.champion == champ and head.canary == cand and head.canary_share == 0.5  # nothing promoted yet
    req = approval.pending(head)
    assert req["id"] == r.request == r.summary["request"] and req["look"].startswith("rollout/")
    assert len(events(reg, approval.REQUESTED)) == 1

    # A later look, in either mode, does not promote while the request stands (nor asks twice).
    traffic(local_lake, head, now, 1, 150, BETTER, seed=9)
    again = canary.step(local_lake, CFG, now=now + dt.timedelta(hours=1), approval="auto")
    assert again.action == "awaiting_approval" and again.request == req["id"]
    assert reg.serving_state().champion == champ and len(events(reg, approval.REQUESTED)) == 1

    body = approval.promotion_body(local_lake, now=now)
    assert f"Promote `{cand}` to champion?" in body and "decided **promote**" in body
    assert "| champion |" in body and "| canary |" in body  # per-arm figures
    acceptance = next(line for line in body.splitlines() if line.startswith("| acceptance |"))
    assert "better" in acceptance and "[+0." in acceptance  # the always-valid interval
    assert "always-valid" in body and "α = 0.05" in body
    assert "| golden | exact_match | 0.810 | 0.720 | +0.090 | [+0.040, +0.140] | 0.0012 | 200 (25, 7) | yes |" in body
    assert f"| champion | `{champ}` | wrong colour | 2 | 67% |" in body
    assert f"| canary | `{cand}` | too long | 2 | 100% |" in body and "refused" not in body  # other model's row
    assert "no answer within 24 h" in body

    done = approval.settle(local_lake, "approve", by="alice", comment="figures look right", via="airflow")
    assert done.action == "promoted" and done.responded_by == "alice"
    head = reg.serving_state()
    assert head.champion == cand and head.canary is None and head.experiment is None
    assert reg.state().statuses[cand] == "champion" and reg.state().statuses[champ] == "retired"
    answer = events(reg, approval.EVENT)[-1]
    assert answer["responded_by"] == "alice" and answer["actor"] == "alice" and answer["choice"] == "Approve"
    assert answer["applied"] and answer["request"] == req["id"] and answer["comment"] == "figures look right"
    moved = [e for e in events(reg, "alias") if e["alias"] == "champion" and e["ref"] == cand][-1]
    assert moved["actor"] == "alice" and "approved by alice: figures look right" in moved["reason"]
    assert moved["figures"]["decision"]["action"] == "promote"
    assert local_lake.list(f"rollout/{req['id'].split('@')[0]}/counts/") == []  # the experiment's snapshots
    with pytest.raises(approval.NothingPending, match="no promotion is pending"):
        approval.settle(local_lake, "reject", by="bob")


def test_a_rejection_rolls_back_with_the_name_and_comment(local_lake):
    reg, champ, cand = live_canary(local_lake, seed=2)
    r = canary.step(local_lake, CFG, now=T0 + dt.timedelta(hours=3), approval="manual")
    hitl = {"chosen_options": [approval.REJECT], "params_input": {"comment": "edits on bags look odd"},
            "responded_at": T0, "responded_by_user": {"id": "bob", "name": "Bob"}}
    done = approval.settle_answer(local_lake, hitl, request_id=r.request, timeout_hours=24)
    assert done.action == "rolled_back"
    head = reg.serving_state()
    assert head.champion == champ and head.canary is None
    assert reg.state().statuses[cand] == "rejected"
    assert reg.state().reasons[cand] == "rolled back: promotion rejected by Bob: edits on bags look odd"
    answer = events(reg, approval.EVENT)[-1]
    assert (answer["responded_by"], answer["choice"], answer["via"]) == ("Bob", "Reject", "airflow")


def test_no_answer_keeps_the_champion_and_restarts_the_stage(local_lake):
    reg, champ, cand = live_canary(local_lake, seed=3)
    looked = T0 + dt.timedelta(hours=3)
    r = canary.step(local_lake, CFG, now=looked, approval="manual")
    # The scheduler's timeout sweep applies the defaults and leaves the responder empty; a result
    # that claims Approve without a person is treated the same (never promote without one).
    for chosen in ([approval.ON_TIMEOUT], [approval.APPROVE]):
        seq = reg.serving_state().seq
        if chosen == [approval.APPROVE]:  # ask again first
            traffic(local_lake, reg.serving_state(), looked, 3, 150, BETTER, seed=4)
            looked += dt.timedelta(hours=3)
            r = canary.step(local_lake, CFG, now=looked, approval="manual")
            assert r.action == "awaiting_approval", r.summary
            seq = reg.serving_state().seq
        hitl = {"chosen_options": chosen, "params_input": {"comment": None}, "responded_at": looked,
                "responded_by_user": None}
        done = approval.settle_answer(local_lake, hitl, request_id=r.request, timeout_hours=24, now=looked)
        assert done.action == "kept" and done.choice == approval.KEEP and done.responded_by is None
        head = reg.serving_state()
        assert head.seq == seq + 1 and head.champion == champ and head.canary == cand and head.canary_share == 0.5
        assert approval.pending(head) is None and head.experiment["stage_started_at"] == looked.isoformat()
        answer = events(reg, approval.EVENT)[-1]
        assert answer["responded_by"] is None and answer["applied"] and answer["choice"] == approval.KEEP
        assert answer["reason"].startswith("no answer within 24 h: the champion") and champ in answer["reason"]
    # The stage starts again: the next look needs its own evidence (min_hours) before asking again.
    assert canary.step(local_lake, CFG, now=looked + dt.timedelta(minutes=30), approval="manual").action == "continue"

    # An answer to a request already settled changes nothing, and is kept in the history.
    late = approval.settle_answer(local_lake, {"chosen_options": [approval.APPROVE], "params_input": {},
                                              "responded_by_user": {"id": "carol", "name": "carol"}},
                                  request_id=r.request, timeout_hours=24)
    assert not late.applied and late.action == "nothing pending" and reg.serving_state().champion == champ
    assert events(reg, approval.EVENT)[-1]["applied"] is False and events(reg, approval.EVENT)[-1]["responded_by"] == "carol"


def test_a_regression_while_the_request_waits_still_rolls_back(local_lake):
    reg, champ, cand = live_canary(local_lake, seed=5)
    r = canary.step(local_lake, CFG, now=T0 + dt.timedelta(hours=3), approval="manual")
    assert r.action == "awaiting_approval"
    # The canary breaks: half its requests fail (the error-rate guardrail).
    traffic(local_lake, reg.serving_state(), T0 + dt.timedelta(hours=3), 3, 300, BETTER, seed=6,
            errors={"champion": 0.0, "canary": 0.5})
    r = canary.step(local_lake, CFG, now=T0 + dt.timedelta(hours=6), approval="manual")
    assert r.action == "rolled_back" and "error_rate" in r.decision.guardrails, r.summary
    assert reg.serving_state().canary is None and approval.pending(reg.serving_state()) is None
    with pytest.raises(approval.NothingPending):
        approval.settle(local_lake, "approve", by="alice")


def test_rollout_approve_and_reject_from_a_terminal(tmp_path):
    """`vloop rollout approve|reject` as an engineer runs them (subprocess, real lake): refused when
    nothing is pending; the terminal's user (--by, or the OS login) is the one named."""
    import getpass
    import os
    import subprocess
    import sys

    from vloop.store.lake import LocalLake

    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    # The terminal's look runs the default policy: a day and 1,000 requests per arm before promoting.
    reg, champ, cand = live_canary(lake, seed=7, hours=25, users_per_hour=60)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VLOOP_")},
           "VLOOP_LAKE_URL": lake.url, "VLOOP_SIMULATION": "1"}

    def vloop(*args):
        return subprocess.run([sys.executable, "-m", "vloop.cli", "rollout", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    out = vloop("approve")
    assert out.returncode == 2 and "no promotion is pending" in out.stderr, out.stderr
    # The look from the terminal in manual mode asks instead of promoting.
    params = ["--now", (T0 + dt.timedelta(hours=25)).isoformat()]
    out = vloop("step", "--approval", "manual", *params)
    assert out.returncode == 0 and "awaiting_approval" in out.stdout and "vloop rollout approve" in out.stdout, out
    assert reg.serving_state().champion == champ
    out = vloop("status", *params)
    assert "promotion to champion awaits a person" in out.stdout, out.stdout
    out = vloop("reject", "--comment", "the app team wants a week more", "--by", "dana")
    assert out.returncode == 0, out.stderr
    assert "rejected by dana: the app team wants a week more" in out.stdout
    assert reg.serving_state().canary is None and reg.state().statuses[cand] == "rejected"
    assert vloop("reject").returncode == 2

    (nxt,) = register(reg, "nxt")
    t1 = T0 + dt.timedelta(hours=26)
    st = canary.start(reg, nxt, actor="test", reason="gate", cfg=CFG, now=t1)
    traffic(lake, st, t1, 3, 150, BETTER, seed=8)
    assert canary.step(lake, CFG, now=t1 + dt.timedelta(hours=3), approval="manual").action == "awaiting_approval"
    out = vloop("approve", "--request", "an-earlier-request")  # the person looked at another request
    assert out.returncode == 2 and "is pending now" in out.stderr, out.stderr
    assert reg.serving_state().champion == champ
    pending_id = reg.serving_state().experiment["pending_promotion"]["id"]
    assert f"--request {pending_id}" in vloop("status", "--now", (t1 + dt.timedelta(hours=3)).isoformat()).stdout
    out = vloop("approve", "--comment", "ship it", "--request", pending_id)
    assert out.returncode == 0, out.stderr
    assert reg.serving_state().champion == nxt
    answer = events(reg, approval.EVENT)[-1]
    assert answer["responded_by"] == getpass.getuser() and answer["via"] == "terminal" and answer["comment"] == "ship it"


def _answer_from_outside(dag_id: str, task_id: str, option: str, user: dict, comment: str, seen: dict,
                         timeout: float = 120, before=None) -> None:
    """What the Required Actions page's PATCH .../hitlDetails does (routes/public/hitl.py):
    wait for the request, write the response, resume the parked task. ``before``: called once the
    request is up, before the answer (what else happens while the person reads it)."""
    from airflow._shared.timezones import timezone
    from airflow.models.hitl import HITLDetail
    from airflow.models.trigger import handle_event_submit
    from airflow.triggers.base import TriggerEvent
    from airflow.utils.session import create_session

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with create_session() as s:
            ti = _awaiting_input(s, dag_id, task_id)
            hd = s.get(HITLDetail, ti.id) if ti is not None else None
            if hd is not None and hd.responded_at is None:
                seen.update(subject=hd.subject, body=hd.body, options=list(hd.options), defaults=hd.defaults,
                            params=hd.params, run_id=ti.run_id)
                if before is not None:
                    before()
                hd.responded_by = user
                hd.responded_at = timezone.utcnow()
                hd.chosen_options = [option]
                hd.params_input = {"comment": comment}
                s.add(hd)
                handle_event_submit(TriggerEvent(hd.as_resume_event_payload()), task_instance=ti, session=s)
                return  # create_session commits
        time.sleep(0.3)
    seen["error"] = "no request appeared"


def _awaiting_input(session, dag_id: str, task_id: str):
    """The task instance of ``dag_id``.``task_id`` waiting for a person's input, or None."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    return session.scalars(select(TaskInstance).where(
        TaskInstance.dag_id == dag_id, TaskInstance.task_id == task_id,
        TaskInstance.state == TaskInstanceState.AWAITING_INPUT)).first()


def _time_out_from_outside(dag_id: str, task_id: str, seen: dict, timeout: float = 120) -> None:
    """The scheduler's sweep of AWAITING_INPUT tasks past their response timeout (its own method),
    once the request's deadline has passed: the defaults are chosen, nobody responded."""
    from airflow._shared.timezones import timezone
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.utils.session import create_session

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with create_session() as s:
            ti = _awaiting_input(s, dag_id, task_id)
            due = ti is not None and ti.trigger_timeout is not None and ti.trigger_timeout < timezone.utcnow()
            if ti is not None:
                seen["trigger_timeout"] = ti.trigger_timeout
        if due:
            SchedulerJobRunner(job=Job(), executors=[]).check_awaiting_input_timeouts()
            return
        time.sleep(0.3)
    seen["error"] = f"no request timed out ({seen.get('trigger_timeout')})"


def _approval_runs(request_id: str):
    """promotion_approval's runs started for ``request_id`` (by canary_rollout's ask): (run_id, conf)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as s:
        runs = s.scalars(select(DagRun).where(DagRun.dag_id == "promotion_approval")).all()
        return [(r.run_id, dict(r.conf or {})) for r in runs if (r.conf or {}).get("id") == request_id]


def _returned(dr, task_id: str):
    """What ``task_id`` returned in the run ``dr`` (its return_value XCom)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as s:
        value = s.scalar(select(XComModel.value).where(
            XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id, XComModel.task_id == task_id,
            XComModel.key == "return_value"))
    return XComModel.deserialize_value(type("Row", (), {"value": value})())


def _pause(dag_id: str, paused: bool) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as s:
        s.get(DagModel, dag_id).is_paused = paused


def _drop_approval_runs(run_ids=None) -> None:
    """The triggered runs stay queued (no scheduler here): removed at the end; all of them (None)
    at the start, as an interrupted session leaves them and the experiment ids here are fixed."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    which = delete(DagRun).where(DagRun.dag_id == "promotion_approval")
    with create_session() as s:
        s.execute(which if run_ids is None else which.where(DagRun.run_id.in_(list(run_ids))))


def test_canary_rollout_dag_asks_a_person_in_manual_mode(airflow_db, local_lake, monkeypatch):
    """The DAGs end to end on a lake (no serving processes): auto mode promotes at once, as before;
    in manual mode canary_rollout's look records the request, starts promotion_approval for it and
    finishes (the hourly looks go on while nobody has answered; a second look neither promotes nor
    asks again); promotion_approval parks its approval task until a person answers, then settle
    promotes in their name. While promotion_approval is paused, ask fails and the next look asks.
    No answer within the timeout keeps the champion; an answer after the request was settled from
    a terminal changes nothing and the run is still green."""
    from tests.conftest import load_dag

    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({"conn_type": "generic",
                                                              "extra": {"lake_url": local_lake.root.as_uri()}}))
    monkeypatch.setenv("VLOOP_SIMULATION", "1")
    dag, asking = load_dag("canary_rollout"), load_dag("promotion_approval")
    params = {"min_hours": 2, "min_requests": 100, "max_hours": 12}
    triggered: list[str] = []
    _drop_approval_runs()

    def run(now: dt.datetime):
        dr = dag.test(run_conf={**params, "now": now.isoformat()})
        return dr, {ti.task_id: ti.state for ti in dr.get_task_instances()}

    def look_asks(now: dt.datetime) -> dict:
        """A look in manual mode that leaves a promotion pending: its run finishes at once, having
        started promotion_approval (run id from the request id) with the request as conf."""
        dr, states = run(now)
        assert states == {"look": "success", "ask": "success", "note": "success"} and dr.state == "success", states
        req = approval.pending(reg.serving_state())
        assert req is not None and reg.serving_state().canary_share == 0.5  # pending, nothing promoted
        (started,) = _approval_runs(req["id"])
        triggered.append(started[0])
        assert started[0] == approval.run_id_of(req["id"]), started
        return started[1]

    try:
        # Auto (the default): promoted by the look itself; nobody is asked.
        reg, champ, cand = live_canary(local_lake, seed=11)
        _, states = run(T0 + dt.timedelta(hours=3))
        assert states == {"look": "success", "ask": "skipped", "note": "success"}, states
        assert reg.serving_state().champion == cand and not events(reg, approval.REQUESTED)

        # Manual: the look records the request; while promotion_approval is paused nobody could be
        # asked, so ask fails (the alert) and the request waits.
        monkeypatch.setenv("AIRFLOW_VAR_VLOOP_PROMOTION_APPROVAL", "manual")
        monkeypatch.setenv("AIRFLOW_VAR_VLOOP_PROMOTION_APPROVAL_TIMEOUT_HOURS", "6")
        (nxt,) = register(reg, "nxt")
        t1 = T0 + dt.timedelta(hours=4)
        st = canary.start(reg, nxt, actor="test", reason="gate", cfg=CFG, now=t1)
        traffic(local_lake, st, t1, 3, 150, BETTER, seed=12)
        _pause("promotion_approval", True)
        dr, states = run(t1 + dt.timedelta(hours=3))
        assert states == {"look": "success", "ask": "failed", "note": "failed"} and dr.state == "failed", states
        req = approval.pending(reg.serving_state())
        assert req is not None and reg.serving_state().champion == cand and not _approval_runs(req["id"])
        # Unpaused: the next hour's look asks (promotion_approval started, the request as its conf)
        # and its run ends; the request waits for a person.
        _pause("promotion_approval", False)
        traffic(local_lake, reg.serving_state(), t1 + dt.timedelta(hours=3), 1, 150, BETTER, seed=16)
        conf = look_asks(t1 + dt.timedelta(hours=4))
        assert conf["id"] == req["id"] and conf["subject"] == f"Promote {nxt} to champion?"
        assert "always-valid" in conf["body"] and "no answer within 6 h" in conf["body"] and conf["timeout_hours"] == 6
        assert conf["now"] == (t1 + dt.timedelta(hours=4)).isoformat()

        # The next hour's look runs while the request waits: it neither promotes nor asks again.
        traffic(local_lake, reg.serving_state(), t1 + dt.timedelta(hours=4), 1, 150, BETTER, seed=14)
        dr, states = run(t1 + dt.timedelta(hours=5))
        assert states == {"look": "success", "ask": "skipped", "note": "success"} and dr.state == "success", states
        head = reg.serving_state()
        assert head.champion == cand and head.canary == nxt and approval.pending(head)["id"] == conf["id"]
        assert len([e for e in events(reg, approval.REQUESTED) if e["ref"] == nxt]) == 1
        assert len(_approval_runs(conf["id"])) == 1

        # Alice approves from the Required Actions page.
        seen: dict = {}
        responder = threading.Thread(target=_answer_from_outside, args=(
            "promotion_approval", "approval", approval.APPROVE, {"id": "alice", "name": "Alice"}, "numbers hold up",
            seen), daemon=True)
        responder.start()
        dr = asking.test(run_conf=conf)
        responder.join(timeout=10)
        assert "error" not in seen, seen
        assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"approval": "success", "settle": "success"}
        assert seen["subject"] == f"Promote {nxt} to champion?" and seen["run_id"] == dr.run_id
        assert seen["options"] == list(approval.OPTIONS) and seen["defaults"] == [approval.ON_TIMEOUT]
        assert seen["body"] == conf["body"] and set(seen["params"]) == {"comment"}
        head = reg.serving_state()
        assert head.champion == nxt and head.canary is None
        answer = events(reg, approval.EVENT)[-1]
        assert (answer["responded_by"], answer["choice"], answer["comment"]) == ("Alice", "Approve", "numbers hold up")
        moved = [e for e in events(reg, "alias") if e["alias"] == "champion" and e["ref"] == nxt][-1]
        assert moved["actor"] == "Alice" and "approved by Alice" in moved["reason"]

        # Nobody answers: past the response timeout the scheduler's sweep applies the defaults (Keep),
        # the champion stays and the canary keeps its share; the history says nobody answered.
        monkeypatch.setenv("AIRFLOW_VAR_VLOOP_PROMOTION_APPROVAL_TIMEOUT_HOURS", "0.0005")  # 1.8 s
        (last,) = register(reg, "last")
        t2 = T0 + dt.timedelta(hours=10)
        st = canary.start(reg, last, actor="test", reason="gate", cfg=CFG, now=t2)
        traffic(local_lake, st, t2, 3, 150, BETTER, seed=13)
        conf = look_asks(t2 + dt.timedelta(hours=3))
        seen = {}
        sweeper = threading.Thread(target=_time_out_from_outside, args=("promotion_approval", "approval", seen),
                                   daemon=True)
        sweeper.start()
        dr = asking.test(run_conf=conf)
        sweeper.join(timeout=10)
        assert "error" not in seen, seen
        assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"approval": "success", "settle": "success"}
        head = reg.serving_state()
        assert head.champion == nxt and head.canary == last and head.canary_share == 0.5
        assert approval.pending(head) is None
        answer = events(reg, approval.EVENT)[-1]
        assert answer["responded_by"] is None and answer["choice"] == approval.KEEP and answer["applied"]
        assert answer["reason"].startswith("no answer within 0.0005 h: the champion")

        # Settled from a terminal while the UI's request is up: the UI answer that follows changes
        # nothing, is kept in the history as not applied, and the run is still green.
        monkeypatch.setenv("AIRFLOW_VAR_VLOOP_PROMOTION_APPROVAL_TIMEOUT_HOURS", "6")
        t3 = t2 + dt.timedelta(hours=3)
        traffic(local_lake, reg.serving_state(), t3, 3, 150, BETTER, seed=15)
        conf = look_asks(t3 + dt.timedelta(hours=3))
        seen = {}

        def terminal():
            approval.settle(local_lake, "reject", by="dana", comment="not this week", via="terminal")

        responder = threading.Thread(target=_answer_from_outside, args=(
            "promotion_approval", "approval", approval.APPROVE, {"id": "carol", "name": "carol"}, "late", seen),
            kwargs={"before": terminal}, daemon=True)
        responder.start()
        dr = asking.test(run_conf=conf)
        responder.join(timeout=10)
        assert "error" not in seen, seen
        assert dr.state == "success"
        assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"approval": "success", "settle": "success"}
        head = reg.serving_state()
        assert head.champion == nxt and head.canary is None and reg.state().statuses[last] == "rejected"
        terminal_answer, late = events(reg, approval.EVENT)[-2:]
        assert (terminal_answer["responded_by"], terminal_answer["via"]) == ("dana", "terminal")
        assert terminal_answer["applied"]
        assert (late["responded_by"], late["choice"], late["applied"]) == ("carol", "Approve", False)
        assert late["request"] == conf["id"]
        settled = _returned(dr, "settle")
        assert settled["action"] == "nothing pending" and settled["request"] == conf["id"], settled
        assert settled["message"].startswith("answer not applied: no promotion is pending"), settled
        # Once settled, a run for that request (started late, say) asks nobody.
        dr = asking.test(run_conf=conf)
        assert dr.state == "success"
        assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"approval": "skipped", "settle": "skipped"}
    finally:
        _drop_approval_runs(triggered)


def test_a_request_left_unanswered_past_its_timeout_is_kept_and_asked_again(local_lake):
    """Its approval run failed, or nobody could be asked: an hour past the timeout the look itself
    settles the request as no answer (the champion kept, the stage restarted), so the next promote
    decision asks again rather than leaving the canary waiting forever."""
    reg, champ, cand = live_canary(local_lake, hours=6)
    first = canary.step(local_lake, CFG, now=T0 + dt.timedelta(hours=3), approval="manual", approval_timeout_hours=1)
    assert first.action == "awaiting_approval"
    # Within the timeout (+1 h) the request stands.
    still = canary.step(local_lake, CFG, now=T0 + dt.timedelta(hours=4, minutes=30), approval="manual",
                        approval_timeout_hours=1)
    assert still.action == "awaiting_approval" and still.request == first.request
    late = canary.step(local_lake, CFG, now=T0 + dt.timedelta(hours=5, minutes=1), approval="manual",
                       approval_timeout_hours=1)
    head = reg.serving_state()
    assert late.action == "continue" and approval.pending(head) is None and head.champion == champ
    kept = [e for e in events(reg, approval.EVENT) if e["request"] == first.request]
    assert len(kept) == 1 and kept[0]["responded_by"] is None and kept[0]["applied"] and "no answer" in kept[0]["reason"]
    # --by "" is no name: an approval without one is refused.
    with pytest.raises(ValueError, match="needs a person"):
        approval.settle(local_lake, approval.APPROVE, by="  ")
