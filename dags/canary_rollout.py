"""
### canary_rollout — judge the live canary every hour: widen, promote, roll back or halt

While a canary is live (the registry's serving state names one; otherwise the run starts the next
approved version, or is skipped when none waits):

1. **look** — per-arm users, requests, accepts, edits, errors and p95 latency since the current
   stage began, from the lake's raw logs (`vloop.release.canary.arm_counts`, the daily report's outcome
   definition); then `vloop.release.rollout.decide`: always-valid confidence sequences on acceptance and
   edit rate (per-user, cluster-robust), a sample-ratio-mismatch check and guardrails;
2. **act** — *promote*: widen to the next stage (10% → 50% by default; the sequence restarts at
   each stage), and past the last one move the champion alias (the old champion is retired, still
   loadable); *rollback*: take the canary off (a guardrail or a significant regression wins over a
   sample-ratio mismatch); after `max_hours` without a decision the canary is retired as
   inconclusive; *halt* (sample-ratio mismatch, or counts that cannot be right): the canary is
   taken off (the champion serves everyone) and the task fails, so a person is alerted. Every look
   is stored under `rollout/<experiment>/looks/`, every action is a registry event with its
   figures. Serving replicas follow the registry within seconds;
3. **next** — when the experiment ends, or a run finds none live, the newest `approved` version
   (one that passed retrain_biweekly's gate while another canary ran) is started as the next
   canary at the first of the stages in Variable `vloop_rollout_stages`.

4. **note** — whatever happened, the run's note says it ("rolled back: … — <the decision and its
   intervals>", "widened: cand@v1 at 50%", "skipped: no canary is live …";
   `vloop.release.canary.look_note`), set through Airflow's API (connection `vloop_airflow_api`).

Counts are kept as hourly snapshots under `rollout/<experiment>/counts/`, so a look reads only the
raw logs of the hours since the last one.

A person's approval (Variable `vloop_promotion_approval`: `auto`, the default, or `manual`): in
manual mode a look that decides *promote* at the last stage leaves the promotion pending (the
serving state's experiment holds the request), and **ask** starts the `promotion_approval` DAG with
the request (its id, subject, the text with the experiment's figures and intervals, the gate's
figures and each arm's top error types, the timeout) as the run's conf, without waiting for it: a
person answers there (Browse → Required Actions) while this DAG goes on looking every hour. The
triggered run's id comes from the request's id, so a request is asked once: later looks while it
is pending neither promote nor ask again (their **ask** finds the run and is skipped), but a
rollback or a halt still acts and ends the request with the experiment. **ask** is skipped when no
request is pending, and fails (the alert) while `promotion_approval` is paused: its run would only
queue; the next look asks again. `vloop rollout approve|reject` answers from a terminal
(`vloop.release.approval`).

Manual rollback: trigger with `rollback: true`, a `reason` and optionally `to` (`name@version` or
`base`); the same as `vloop rollout rollback`. The logic lives in `vloop.release.canary`; this is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, Variable, dag, task
from vloop_assets import SERVING, SERVING_CHANGES

from vloop.store.config import load_settings

APPROVAL_DAG = "promotion_approval"  # dags/promotion_approval.py


def _lake():
    from vloop_hooks import LakeHook

    return LakeHook().get_lake()


def _cfg(p: dict):
    from dataclasses import replace

    from vloop.release import canary

    # The stages of a canary started from the queue, as retrain_biweekly's deploy uses.
    stages = canary.parse_stages(Variable.get("vloop_rollout_stages", default="0.1,0.5,1.0"))
    return replace(canary.config_from_params(p), stages=stages)


class AskForApproval(TriggerDagRunOperator):
    """Starts promotion_approval for the promotion the look left pending, the request as the run's
    conf, without waiting; its run id is the request's (vloop.release.approval.run_id_of), so a look
    while the same request is still pending finds the run and is skipped (already asked). Skipped
    when no promotion is pending; fails, without a retry, while promotion_approval is paused (its
    run would only queue, and nobody would be asked): the next look asks again."""

    def execute(self, context):
        from airflow.providers.standard.operators.trigger_dagrun import DagIsPaused
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from vloop.release import approval

        req = (context["ti"].xcom_pull(task_ids="look") or {}).get("approval")
        if not req:
            raise AirflowSkipException("no promotion awaits a person's approval")
        self.trigger_run_id, self.conf = approval.run_id_of(req["id"]), req
        try:
            return super().execute(context)
        except DagIsPaused as e:
            raise AirflowFailException(f"{APPROVAL_DAG} is paused, so nobody is asked about the pending promotion "
                                       f"{req['id']}: unpause it (the next look asks), or answer with "
                                       "`vloop rollout approve|reject`") from e


@dag(
    dag_id="canary_rollout",
    schedule=load_settings().rollout_schedule,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "vloop", "retries": 1, "retry_delay": dt.timedelta(minutes=2)},
    tags=["vloop", "release", "canary"],
    doc_md=__doc__,
    params={
        "alpha": Param(0.05, type="number", minimum=0.001, maximum=0.2, description="error rate of the decisions"),
        "min_hours": Param(24, type="number", minimum=0, description="hours a stage runs before it may be widened"),
        "min_requests": Param(1000, type="integer", minimum=1, description="requests per arm before widening"),
        "mixture_sd": Param(0.03, type="number", exclusiveMinimum=0, description="the rate difference the "
                            "always-valid boundary is tightest for (the effect a retrained adapter is expected to make)"),
        "max_hours": Param(168, type="number", minimum=1, description="hours before an undecided canary is retired"),
        "rollback": Param(False, type="boolean", description="manual rollback instead of a look"),
        "to": Param(None, type=["null", "string"], description="rollback target: name@version or base"),
        "reason": Param(None, type=["null", "string"], description="why (required for a rollback)"),
        "now": Param(None, type=["null", "string"], description="simulation mode only (VLOOP_SIMULATION=1): "
                     "the simulated clock of the look, ISO 8601"),
    },
)
def canary_rollout():
    # A look that changes what is served (and a manual rollback) updates the vloop_serving asset.
    @task(outlets=[SERVING_CHANGES])
    def look(**context):
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from vloop.release import canary
        from vloop.learn.registry import RegistryConflict

        p = context["params"]
        if p["rollback"]:
            try:
                state = canary.rollback(_lake(), reason=p["reason"] or "", to=p["to"],
                                        actor=f"canary_rollout {context['run_id']}")
            except RegistryConflict:
                raise  # another writer moved the state meanwhile: the retry re-reads it
            except ValueError as e:  # no reason, unknown version: retrying cannot help
                raise AirflowFailException(str(e)) from e
            context["outlet_events"][SERVING_CHANGES].add(SERVING, extra={"seq": state.seq, "action": "rollback"})
            return {"action": "manual rollback", "seq": state.seq, "champion": state.champion}
        from vloop.release import approval

        lake, now = _lake(), canary.simulated_now(p["now"])
        mode = approval.parse_mode(Variable.get("vloop_promotion_approval", default="auto"))
        hours = approval.parse_timeout_hours(Variable.get("vloop_promotion_approval_timeout_hours", default=None))
        result = canary.step(lake, _cfg(p), actor="canary_rollout", now=now, approval=mode,
                             approval_timeout_hours=hours)
        context["ti"].xcom_push(key="result", value=result.summary)  # for the run's note, even when it raises
        if result.action == "skipped":
            raise AirflowSkipException("no canary is live and none is approved and waiting")
        if result.action == "halted":
            nxt = f"; {result.started} started from the queue" if result.started else ""
            raise AirflowFailException(f"experiment halted, canary taken off (the champion serves everyone)"
                                       f"{nxt}: {result.decision.reason}")
        if result.action not in ("continue", "awaiting_approval"):  # widened, promoted, rolled back, retired, started
            context["outlet_events"][SERVING_CHANGES].add(SERVING, extra={"seq": result.state.seq,
                                                                         "action": result.action})
        out = result.summary
        if result.action == "awaiting_approval":  # promotion_approval asks a person with this text
            out["approval"] = {"id": result.request, "timeout_hours": hours,
                               "subject": f"Promote {result.state.canary} to champion?",
                               "body": approval.promotion_body(lake, result.state, timeout_hours=hours, now=now),
                               "now": p["now"]}  # the simulated clock (simulation mode only), for settle
        return out

    # Manual mode: a person answers in promotion_approval, once per request (skipped when none is pending).
    ask = AskForApproval(task_id="ask", trigger_dag_id=APPROVAL_DAG, wait_for_completion=False,
                         skip_when_already_exists=True, fail_when_dag_is_paused=True,
                         openlineage_inject_parent_info=False)

    @task(trigger_rule="all_done")
    def note(**context):
        """The run's note in the UI: what the look did and why ("rolled back: …", "widened: …",
        "awaiting a person's approval …"). Runs whatever happened; when the look failed (a halt is
        its alert), it fails too, so the run stays failed."""
        from airflow.sdk.exceptions import AirflowFailException
        from vloop_hooks import set_run_note

        from vloop.release.canary import look_note

        ti, run_id = context["ti"], context["run_id"]
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]) or {}
        states = {t: str(st) for t, st in states.get(run_id, states).items() if t != ti.task_id}
        summary = ti.xcom_pull(task_ids="look", key="result") or ti.xcom_pull(task_ids="look")
        text = look_note(summary, look_state="skipped" if states.get("look", "").endswith("skipped") else "failed")
        failed = sorted(t for t, st in states.items() if st.endswith("failed") and not st.endswith("upstream_failed"))
        if "ask" in failed:
            text = (text + "; asking a person failed (is promotion_approval paused?)")[:1000]
        set_run_note(context, text)
        if failed:  # a halt, or nobody could be asked: the run stays failed, as the alert
            raise AirflowFailException(f"failed at {', '.join(failed)} (noted on the run): {text}")
        return text

    look() >> ask >> note()


canary_rollout()
