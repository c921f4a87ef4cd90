"""
### promotion_approval — a person answers a pending promotion (manual approval mode)

Never scheduled: `canary_rollout`'s look starts a run when, in manual mode (Variable
`vloop_promotion_approval` = `manual`), it decided *promote* at the last stage and left the
promotion pending. The run's conf is the request: `id`, `subject`, `body` (the experiment's figures
and always-valid intervals, the gate's figures, each arm's top error types:
`vloop.release.approval.promotion_body`), `timeout_hours` and `now` (the look's simulated clock,
simulation mode only). Its run id comes from the request's id (`promotion__<request id>`), so each
request is asked once. `canary_rollout` does not wait for it: it goes on looking every hour, never
promotes while the request is pending, and still rolls back or halts (which ends the request).

1. **approval** — a human-in-the-loop task (Browse → Required Actions): *Approve* promotes the
   canary to champion, *Reject* rolls it back with the person's name and comment as the reason,
   *Keep at current share* keeps the champion and restarts the canary's stage; no answer within
   `timeout_hours` (Variable `vloop_promotion_approval_timeout_hours`, default 24) is *Keep*.
   `vloop_promotion_approvers` (comma-separated user ids) limits who may answer. Skipped when the
   request is no longer pending as the run starts (a rollback or halt ended the experiment, or it
   was answered from a terminal): nobody is asked about a settled request.
2. **settle** — carries the answer out (`vloop.release.approval.settle_answer`) in the name of the
   person who answered. An answer to a request settled meanwhile (`vloop rollout approve|reject`
   from a terminal, or a rollback) changes nothing: it is recorded as not applied, and the run is
   still green, its result's `action` "nothing pending".

The logic lives in `vloop.release.approval`; this is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param, Variable, dag, task
from vloop_assets import SERVING, SERVING_CHANGES

from vloop.release.approval import ON_TIMEOUT as APPROVAL_ON_TIMEOUT
from vloop.release.approval import OPTIONS as APPROVAL_OPTIONS


def _lake():
    from vloop_hooks import LakeHook

    return LakeHook().get_lake()


def _request(context) -> dict:
    """The request canary_rollout's look put in the run's conf."""
    from airflow.sdk.exceptions import AirflowFailException

    req = dict(context["dag_run"].conf or {})
    missing = [k for k in ("id", "subject", "body", "timeout_hours") if req.get(k) in (None, "")]
    if missing:
        raise AirflowFailException(f"the run's conf lacks {', '.join(missing)}: promotion_approval is started by "
                                   "canary_rollout with a pending promotion request as its conf")
    return req


class PromotionApproval(HITLOperator):
    """Asks a person about the request in the run's conf; skipped when it is no longer pending."""

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        from vloop.learn.registry import Registry
        from vloop.release import approval

        req = _request(context)
        state = Registry(_lake()).serving_state()
        if (approval.pending(state) or {}).get("id") != req["id"]:
            raise AirflowSkipException(f"the request {req['id']} is no longer pending (serving state #{state.seq}: "
                                       f"champion {state.champion or 'base'}, canary {state.canary or '-'})")
        self.subject, self.body = req["subject"], req["body"]
        self.response_timeout = dt.timedelta(hours=float(req["timeout_hours"]))
        self.assigned_users = approval.parse_users(Variable.get("vloop_promotion_approvers", default=""))
        return super().execute(context)


@dag(
    dag_id="promotion_approval",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    default_args={"owner": "vloop", "retries": 1, "retry_delay": dt.timedelta(minutes=2)},
    tags=["vloop", "release", "canary", "approval"],
    doc_md=__doc__,
)
def promotion_approval():
    ask = PromotionApproval(
        task_id="approval", subject="Promote the canary to champion?", options=list(APPROVAL_OPTIONS),
        defaults=[APPROVAL_ON_TIMEOUT], multiple=False,
        params={"comment": Param(None, type=["null", "string"], description="why (kept in the registry's history; "
                                 "the reason of a rejection)")})

    # A settled answer that changes what is served updates the vloop_serving asset.
    @task(outlets=[SERVING_CHANGES])
    def settle(answer: dict, **context):
        from dataclasses import replace

        from vloop.release import approval, canary

        req = _request(context)
        # The stages of a canary started from the queue after an Approve or a Reject.
        stages = canary.parse_stages(Variable.get("vloop_rollout_stages", default="0.1,0.5,1.0"))
        res = approval.settle_answer(_lake(), answer, request_id=req["id"], timeout_hours=float(req["timeout_hours"]),
                                     now=canary.simulated_now(req.get("now")),
                                     cfg=replace(canary.ReleaseConfig(), stages=stages))
        if res.applied:
            context["outlet_events"][SERVING_CHANGES].add(SERVING, extra={"seq": res.state.seq, "action": res.action})
        return {**res.summary, "request": req["id"]}

    settle(ask.output)


promotion_approval()
