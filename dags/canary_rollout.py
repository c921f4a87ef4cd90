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

Counts are kept as hourly snapshots under `rollout/<experiment>/counts/`, so a look reads only the
raw logs of the hours since the last one.

A person's approval (Variable `vloop_promotion_approval`: `auto`, the default, or `manual`): in
manual mode a look that decides *promote* at the last stage leaves the promotion pending, and
**approval** (a human-in-the-loop task: Browse → Required Actions) asks with the experiment's figures
and intervals, the gate's figures and each arm's top error types: *Approve* promotes, *Reject* rolls
back with the person's name and comment as the reason, *Keep at current share* restarts the stage;
no answer within `vloop_promotion_approval_timeout_hours` (default 24) keeps the champion.
`vloop_promotion_approvers` (comma-separated user ids) limits who may answer. **settle** carries the
answer out (`vloop.release.approval`); `vloop rollout approve|reject` does the same from a terminal.

Manual rollback: trigger with `rollback: true`, a `reason` and optionally `to` (`name@version` or
`base`); the same as `vloop rollout rollback`. The logic lives in `vloop.release.canary`; this is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param, Variable, dag, task
from vloop_assets import SERVING, SERVING_CHANGES

from vloop.release.approval import ON_TIMEOUT as APPROVAL_ON_TIMEOUT
from vloop.release.approval import OPTIONS as APPROVAL_OPTIONS
from vloop.store.config import load_settings


def _lake():
    from vloop_hooks import LakeHook

    return LakeHook().get_lake()


def _cfg(p: dict):
    from dataclasses import replace

    from vloop.release import canary

    # The stages of a canary started from the queue, as retrain_biweekly's deploy uses.
    stages = canary.parse_stages(Variable.get("vloop_rollout_stages", default="0.1,0.5,1.0"))
    return replace(canary.config_from_params(p), stages=stages)


class PromotionApproval(HITLOperator):
    """Asks a person when the look left a promotion pending (its request's subject and body come
    from the look); skipped otherwise."""

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        from vloop.release import approval

        req = (context["ti"].xcom_pull(task_ids="look") or {}).get("approval")
        if not req:
            raise AirflowSkipException("no promotion awaits a person's approval")
        self.subject, self.body = req["subject"], req["body"]
        self.response_timeout = dt.timedelta(hours=req["timeout_hours"])
        self.assigned_users = approval.parse_users(Variable.get("vloop_promotion_approvers", default=""))
        return super().execute(context)


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
        result = canary.step(lake, _cfg(p), actor="canary_rollout", now=now, approval=mode)
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
        if result.action == "awaiting_approval":  # the approval task asks a person with this text
            hours = approval.parse_timeout_hours(Variable.get("vloop_promotion_approval_timeout_hours", default=None))
            out["approval"] = {"id": result.request, "timeout_hours": hours,
                               "subject": f"Promote {result.state.canary} to champion?",
                               "body": approval.promotion_body(lake, result.state, timeout_hours=hours, now=now)}
        return out

    # Manual mode: a person answers before a promotion (skipped when none is pending).
    ask = PromotionApproval(
        task_id="approval", subject="Promote the canary to champion?", options=list(APPROVAL_OPTIONS),
        defaults=[APPROVAL_ON_TIMEOUT], multiple=False, retries=0,
        params={"comment": Param(None, type=["null", "string"], description="why (kept in the registry's history; "
                                 "the reason of a rejection)")})

    @task(outlets=[SERVING_CHANGES])
    def settle(answer: dict, looked: dict, **context):
        from vloop.release import approval, canary

        p, req = context["params"], looked["approval"]
        res = approval.settle_answer(_lake(), answer, request_id=req["id"], timeout_hours=req["timeout_hours"],
                                     now=canary.simulated_now(p["now"]), cfg=_cfg(p))
        if res.applied:
            context["outlet_events"][SERVING_CHANGES].add(SERVING, extra={"seq": res.state.seq, "action": res.action})
        return res.summary

    looked = look()
    looked >> ask
    settle(ask.output, looked)


canary_rollout()
