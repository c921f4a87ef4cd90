"""
### feedback_daily — from the day's logs to Label Studio and back, a slice of rows at a time

For the data interval's day **D** (UTC), on the lake of connection `vloop_lake`. The steps marked
*(per slice)* are **mapped** over D's slices (dynamic task mapping, `.expand(slice_no=…)` over
what **slices** lists). A slice is at most Variable `vloop_slice_rows` interactions (default
100,000) cut from D's hour partitions: a quiet day is one slice, a busy hour is split, so each
mapped task holds a bounded amount of traffic whatever the day's size, and the slices run side by
side on whatever workers the executor has (LocalExecutor here; Celery or Kubernetes workers in
production, with the same code and a lake they all reach). The steps that need the whole day are
**reduces** over the slices' outputs in the lake.

0. **wait_for_shippers** — a gateway that lost the lake for a while ships D's records late: wait
   (a sensor, rescheduled every 5 minutes) until every gateway's shipper watermark
   (`shippers/*.json`) has passed the end of D, or until the grace period after the end of D,
   Variable `vloop_late_data_grace_minutes` (default 120), is over. In simulation mode
   (`VLOOP_SIMULATION=1`) the demo's driver waits for the shipper itself;
   **remine_previous_day** — D-1 is ingested, validated and mined again (in one
   task, slice after slice), so feedback that arrived after D-1's run counts (its selection and
   Label Studio tasks stay as they were);
1. **slices** — D's interactions cut into slices (their timestamps read to cut), the plan
   stored in `curated/dt=D/slices.json`; a day without any is one empty slice, so every step
   below runs instead of being skipped. The feedback up to now is read once and each event sent
   to its request's slice (`routed_feedback.parquet`; the day's request ids held as 12 bytes
   each), so no slice reads the whole day's feedback;
2. **ingest** *(per slice)* — the slice's interactions and every feedback event about them up to
   now (late ones count), exact duplicates dropped;
3. **validate_slice** *(per slice)* — Great Expectations suites (`vloop.curate.quality`); bad rows go to
   `quarantine/dt=D/slice=NNN/` with a reason each, with the validation result; the good rows are
   staged; **validate** (reduce: the quality gate) — ids unique across slices, the day's bad
   share added up into `quarantine/dt=D/validation.json`, and the run **stops** when it is over
   the Variable `vloop_max_bad_fraction`; otherwise the staged rows become the curated slices;
4. **mine** *(per slice)* implicit feedback into weak labels (`vloop.curate.mining`; a question asked again
   just after the slice's end still counts), and the slice's share of the report (counts, user
   edits with their error types); **phrasings** (reduce) clusters the slices' badly handled
   questions;
5. **confidence** *(per slice)* from the logged log-probs, re-scoring rows without them with
   `VLOOP_BASE_MODEL`; with that model, also each answer's image-text grounding (`vloop.curate.grounding`);
6. **image_quality** *(per slice slot)* — blurry, dark, blown-out and tiny photos are flagged, and
   NIQE is computed for every photo from a reduced decode ("distorted" above the default threshold,
   shown to annotators and in the report); each of the day's images is checked once, by the slot
   its key hashes to;
7. **select** (reduce) the items most worth an annotator's time under the Variable
   `vloop_label_budget`, for the whole day (read a slice at a time, the best kept);
8. **push** them to Label Studio (connection `vloop_label_studio`) with the model's answer as a
   prediction; a re-run never creates a duplicate task;
9. **pull** finished annotations into `labeled/dt=D/`; when any are new, it updates the asset
   `vloop_labels`, on which `retrain_biweekly` is scheduled;
10. **report** (reduce, adding up the slices' shares) — `reports/dt=D/index.html` with the
   per-arm metrics and plots, error types, edit length per category, phrases users delete,
   grounding AUROC.

A day without traffic (a deployment's first night) is a normal day: every step succeeds on empty
tables and the report says "no traffic".

**pull does not depend on the day's traffic.** Annotators finish tasks of earlier days whatever
today brings, so pull runs after push has finished in *any* state (`trigger_rule="all_done"`):
also when validate failed the quality gate and everything from mine to push is
`upstream_failed`. It follows push only so the two never race to create the Label Studio project.
The report needs the validated day: it waits for select, phrasings and pull (after push) and runs
unless one of them failed (`none_failed`), so it runs when push/pull were skipped for want of
Label Studio and is `upstream_failed` on a day the quality gate stopped.

Every step replaces its own output for D (a slice step its slice's), and the gate removes the
outputs of slices D no longer has, so re-running a day is safe; trigger with the param `day` to
(re)process a given day. Without a `vloop_label_studio` connection, push and pull are skipped and
the report still runs. The logic lives in `vloop.curate.daily`; this file is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, Variable, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable
from vloop_assets import LABELS, NEW_LABELS

from vloop.store.config import load_settings

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


# The mapped instances' names in the UI and logs: slice=003 rather than a bare map index.
SLICE_LABEL = "slice={{ '%03d' % task.op_kwargs['slice_no'] }}"


def _max_bad_fraction() -> float:
    return float(Variable.get("vloop_max_bad_fraction", default=0.05))


def _slice_rows() -> int:
    from vloop.curate.daily import DEFAULT_SLICE_ROWS

    return int(Variable.get("vloop_slice_rows", default=DEFAULT_SLICE_ROWS))


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

        from vloop.curate import daily
        from vloop.store.config import load_settings
        from vloop.capture.spool import day_is_shipped

        if load_settings().simulation:
            return PokeReturnValue(True, "simulation: the demo waits for the shipper itself")
        grace = dt.timedelta(minutes=float(Variable.get("vloop_late_data_grace_minutes", default=120)))
        ready, why = day_is_shipped(_lake(), _day(context), now=daily.run_time(_day(context)), grace=grace)
        print(why)  # the task log says what it waits for
        return PokeReturnValue(ready, why)

    @task
    def remine_previous_day(**context):
        from vloop.curate import daily

        return daily.remine(_lake(), _day(context) - dt.timedelta(days=1), daily.run_time(_day(context)),
                            max_bad_fraction=_max_bad_fraction(), slice_rows=_slice_rows())

    @task
    def slices(**context) -> list[int]:
        from vloop.curate import daily

        return daily.plan(_lake(), _day(context), _slice_rows(), daily.run_time(_day(context)))

    @task(map_index_template=SLICE_LABEL)
    def ingest(slice_no: int, **context):
        from vloop.curate import daily

        return daily.ingest_slice(_lake(), _day(context), slice_no, daily.run_time(_day(context)))

    @task(map_index_template=SLICE_LABEL)
    def validate_slice(slice_no: int, **context):
        from vloop.curate import daily

        return daily.validate_slice(_lake(), _day(context), slice_no, max_bad_fraction=_max_bad_fraction())

    @task(retries=0)  # a failed quality gate is a finding, not a glitch: retrying cannot fix the data
    def validate(slice_list: list[int], **context):
        from vloop.curate import daily

        return daily.gate(_lake(), _day(context), list(slice_list), max_bad_fraction=_max_bad_fraction())

    @task(map_index_template=SLICE_LABEL)
    def mine(slice_no: int, **context):
        from vloop.curate import daily

        return daily.mine_slice(_lake(), _day(context), slice_no)

    @task
    def phrasings(**context):
        from vloop.curate import daily

        return daily.mine_day_phrasings(_lake(), _day(context))

    # On a vLLM (VLOOP_SCORING_URL) one slice is scored at a time: its CPU backend with LoRA crashes
    # when prompt log-probabilities of two requests share a step (vloop.vlm.scoring_client).
    @task(map_index_template=SLICE_LABEL, max_active_tis_per_dagrun=1 if load_settings().scoring_url else None)
    def confidence(slice_no: int, **context):
        from vloop.curate import daily
        from vloop.store.config import load_settings

        loader = daily.base_model_loader(load_settings().base_model)  # loaded once per process
        return daily.score_confidence_slice(_lake(), _day(context), slice_no, loader)

    @task(map_index_template=SLICE_LABEL)
    def image_quality(slice_no: int, **context):
        from vloop.curate import daily

        return daily.check_images_slot(_lake(), _day(context), slice_no)

    @task
    def select(**context):
        from vloop.curate import daily
        from vloop.curate.selection import SelectionConfig

        cfg = SelectionConfig(budget=int(Variable.get("vloop_label_budget", default=200)),
                              low_confidence=float(Variable.get("vloop_low_confidence", default=0.6)))
        return daily.select_for_labelling(_lake(), _day(context), cfg)

    @task(pool="vloop_label_studio")
    def push(**context):
        from vloop.curate import daily

        hook = _label_studio()
        with hook.get_client() as ls:
            return daily.push_to_label_studio(_lake(), _day(context), ls, project_title=hook.project_title,
                                              document_root=hook.document_root)

    # Whatever push's state (a failed quality gate leaves it upstream_failed): see the docstring.
    # New labels update the vloop_labels asset, which retrain_biweekly is scheduled on.
    @task(pool="vloop_label_studio", trigger_rule="all_done", outlets=[NEW_LABELS])
    def pull(**context):
        from vloop.curate import daily

        hook = _label_studio()
        with hook.get_client() as ls:
            out = daily.pull_annotations(_lake(), _day(context), ls, project_title=hook.project_title)
        if out.get("new"):
            context["outlet_events"][NEW_LABELS].add(LABELS, extra={"day": out["day"], "new": out["new"]})
        return out

    @task(trigger_rule="none_failed")  # runs when push/pull were skipped for want of Label Studio
    def report(**context):
        from vloop.curate import daily

        return daily.report(_lake(), _day(context))

    waited = wait_for_shippers()
    waited >> remine_previous_day()  # a leaf: its failure shows on the run, D's steps go on
    slice_list = slices()
    waited >> slice_list
    # Mapped steps wait for every instance of the one before (a reduce needs them all anyway).
    checked = validate(slice_list)
    ingest.expand(slice_no=slice_list) >> validate_slice.expand(slice_no=slice_list) >> checked
    mined, scored, images = (mine.expand(slice_no=slice_list), confidence.expand(slice_no=slice_list),
                             image_quality.expand(slice_no=slice_list))
    checked >> [mined, scored, images]
    clustered, chosen = phrasings(), select()
    mined >> clustered
    [mined, scored, images] >> chosen
    pulled = pull()
    chosen >> push() >> pulled
    [chosen, clustered, pulled] >> report()


feedback_daily()
