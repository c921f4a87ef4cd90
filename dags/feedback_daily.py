"""
### feedback_daily — from the day's logs to Label Studio and back

For the data interval's day **D** (UTC), on the lake of connection `vloop_lake`:

0. **wait_for_shippers** — a gateway that lost the lake for a while ships D's records late: wait
   (a sensor, rescheduled every 5 minutes) until every gateway's shipper watermark
   (`shippers/*.json`) has passed the end of D, or until the grace period after the end of D,
   Variable `vloop_late_data_grace_minutes` (default 120), is over. In simulation mode
   (`VLOOP_SIMULATION=1`) the demo's driver waits for the shipper itself;
   **remine_previous_day** — D-1 is ingested, validated and mined again, so feedback that
   arrived after D-1's run counts (its selection and Label Studio tasks stay as they were);
1. **ingest** — D's interactions and every feedback event about them up to now (late ones count),
   exact duplicates dropped;
2. **validate** — Great Expectations suites (`vloop.quality`); bad rows go to `quarantine/dt=D/`
   with a reason each, the validation result is stored there, and the run **stops** when the bad
   share is over the Variable `vloop_max_bad_fraction`;
3. **mine** implicit feedback into weak labels (`vloop.mining`);
4. **confidence** from the logged log-probs, re-scoring rows without them with `VLOOP_BASE_MODEL`;
   with that model, also each answer's image-text grounding (`vloop.grounding`);
5. **image quality** — blurry, dark, blown-out and tiny photos are flagged, and NIQE recorded;
6. **select** the items most worth an annotator's time under the Variable `vloop_label_budget`;
7. **push** them to Label Studio (connection `vloop_label_studio`) with the model's answer as a
   prediction; a re-run never creates a duplicate task;
8. **pull** finished annotations into `labeled/dt=D/`;
9. **report** — `reports/dt=D/index.html` with the per-arm metrics and plots, error types, edit length
   per category, phrases users delete, grounding AUROC.

A day without traffic (a deployment's first night) is a normal day: every step succeeds on empty
tables and the report says "no traffic".

**pull does not depend on the day's traffic.** Annotators finish tasks of earlier days whatever
today brings, so pull runs after push has finished in *any* state (`trigger_rule="all_done"`):
also when validate failed the quality gate and everything from mine to push is
`upstream_failed`. It follows push only so the two never race to create the Label Studio project.
The report needs the validated day: it waits for select and pull (after push) and runs unless one
of them failed (`none_failed`), so it runs when push/pull were skipped for want of Label Studio and
is `upstream_failed` on a day the quality gate stopped.

Every step replaces its own output for D, so re-running a day is safe; trigger with the param
`day` to (re)process a given day. Without a
`vloop_label_studio` connection, push and pull are skipped and the report still runs.
The logic lives in `vloop.daily`; this file is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, Variable, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

DEFAULT_ARGS = {
    "owner": "vloop",
    "retries": 2,
    "retry_delay": dt.timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=20),
}


def _day(context) -> dt.date:
    """The day a run processes: the ``day`` param when given, else the data interval's (a run at
    midnight processes the day that just ended)."""
    if context["params"].get("day"):
        return dt.date.fromisoformat(context["params"]["day"])
    return context["data_interval_start"].astimezone(dt.timezone.utc).date()


def _lake():
    from vloop_hooks import LakeHook

    return LakeHook().get_lake()


def _label_studio():
    """The hook for Label Studio, or a skip when no connection is configured."""
    from airflow.sdk.exceptions import AirflowNotFoundException, AirflowSkipException
    from vloop_hooks import LabelStudioHook

    try:
        return LabelStudioHook()
    except AirflowNotFoundException as e:
        raise AirflowSkipException("no vloop_label_studio connection: nothing pushed or pulled") from e


@dag(
    dag_id="feedback_daily",
    # Interval semantics: the run for [D, D+1) starts at D+1 00:00 UTC, once day D is complete.
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["vloop", "feedback", "labelling"],
    doc_md=__doc__,
    params={"day": Param(None, type=["null", "string"], format="date",
                         description="YYYY-MM-DD to (re)process instead of the data interval's day")},
)
def feedback_daily():
    @task.sensor(poke_interval=300, mode="reschedule", timeout=dt.timedelta(hours=20))
    def wait_for_shippers(**context):
        from airflow.sdk import PokeReturnValue

        from vloop import daily
        from vloop.config import load_settings
        from vloop.spool import day_is_shipped

        if load_settings().simulation:
            return PokeReturnValue(True, "simulation: the demo waits for the shipper itself")
        grace = dt.timedelta(minutes=float(Variable.get("vloop_late_data_grace_minutes", default=120)))
        ready, why = day_is_shipped(_lake(), _day(context), now=daily.run_time(_day(context)), grace=grace)
        print(why)  # the task log says what it waits for
        return PokeReturnValue(ready, why)

    @task
    def remine_previous_day(**context):
        from vloop import daily
        from vloop.quality import QualityGateError

        day, lake = _day(context) - dt.timedelta(days=1), _lake()
        if not lake.exists(daily.key(daily.CURATED, day, "mined.parquet")):
            return {"day": day.isoformat(), "remined": False, "why": "never processed"}
        ingested = daily.ingest(lake, day, daily.run_time(_day(context)))
        try:
            daily.validate(lake, day, max_bad_fraction=float(Variable.get("vloop_max_bad_fraction", default=0.05)))
        except QualityGateError as e:  # its curated tables stay as its own run left them
            return {"day": day.isoformat(), "remined": False, "why": str(e)}
        return {**daily.mine_feedback(lake, day), "remined": True, "feedback": ingested["feedback"]}

    @task
    def ingest(**context):
        from vloop import daily

        return daily.ingest(_lake(), _day(context), daily.run_time(_day(context)))

    @task(retries=0)  # a failed quality gate is a finding, not a glitch: retrying cannot fix the data
    def validate(**context):
        from vloop import daily

        return daily.validate(_lake(), _day(context),
                              max_bad_fraction=float(Variable.get("vloop_max_bad_fraction", default=0.05)))

    @task
    def mine(**context):
        from vloop import daily

        return daily.mine_feedback(_lake(), _day(context))

    @task
    def confidence(**context):
        from vloop import daily
        from vloop.config import load_settings
        from vloop.model import load_model

        settings = load_settings()
        loader = (lambda: load_model(settings.base_model)) if settings.base_model else None
        return daily.score_confidence(_lake(), _day(context), loader)

    @task
    def image_quality(**context):
        from vloop import daily

        return daily.check_images(_lake(), _day(context))

    @task
    def select(**context):
        from vloop import daily
        from vloop.selection import SelectionConfig

        cfg = SelectionConfig(budget=int(Variable.get("vloop_label_budget", default=200)),
                              low_confidence=float(Variable.get("vloop_low_confidence", default=0.6)))
        return daily.select_for_labelling(_lake(), _day(context), cfg)

    @task(pool="vloop_label_studio")
    def push(**context):
        from vloop import daily

        hook = _label_studio()
        with hook.get_client() as ls:
            return daily.push_to_label_studio(_lake(), _day(context), ls, project_title=hook.project_title,
                                              document_root=hook.document_root)

    # Whatever push's state (a failed quality gate leaves it upstream_failed): see the docstring.
    @task(pool="vloop_label_studio", trigger_rule="all_done")
    def pull(**context):
        from vloop import daily

        hook = _label_studio()
        with hook.get_client() as ls:
            return daily.pull_annotations(_lake(), _day(context), ls, project_title=hook.project_title)

    @task(trigger_rule="none_failed")  # runs when push/pull were skipped for want of Label Studio
    def report(**context):
        from vloop import daily

        return daily.report(_lake(), _day(context))

    waited = wait_for_shippers()
    waited >> remine_previous_day()  # a leaf: its failure shows on the run, D's steps go on
    checked = waited >> ingest() >> validate()
    mined, scored, images = mine(), confidence(), image_quality()
    checked >> [mined, scored, images]
    chosen = select()
    [mined, scored, images] >> chosen
    pulled = pull()
    chosen >> push() >> pulled
    [chosen, pulled] >> report()


feedback_daily()
