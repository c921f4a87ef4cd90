"""
### privacy_maintenance — erasure requests and retention, daily

1. **erase** — works the queue of erasure requests (`privacy/erasure_requests/`, filled by
   `vloop privacy erase --queue` or the app's backend): each user is removed from every lake
   partition, dataset snapshot, image and Label Studio task (connection `vloop_label_studio`,
   when configured), a tombstone keeps them out of later shipping, selection and training, and
   adapters trained on their data are marked for retraining. The whole queue is one pass over the
   lake (`vloop.privacy.erasure.erase_users`), not a scan per user.
2. **retention** — deletes day partitions older than the `VLOOP_RETAIN_*_DAYS` settings and images
   nothing references any more (`vloop.privacy.erasure.apply_retention`).

Both steps write an audit record (`vloop privacy audit`). Erasure runs first, so a user erased
today is gone before retention looks. The logic lives in `vloop.privacy.erasure`; this is wiring.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task


def _lake():
    from vloop_hooks import LakeHook

    return LakeHook().get_lake()


def _label_studio():
    """A Label Studio client, or None where no connection is configured (the lake is still erased)."""
    from airflow.sdk.exceptions import AirflowNotFoundException
    from vloop_hooks import LabelStudioHook

    try:
        return LabelStudioHook().get_client()
    except AirflowNotFoundException:
        return None


@dag(
    dag_id="privacy_maintenance",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "vloop", "retries": 2, "retry_delay": dt.timedelta(minutes=5)},
    tags=["vloop", "privacy"],
    doc_md=__doc__,
)
def privacy_maintenance():
    @task
    def erase(**context):
        from vloop.privacy.erasure import work_erasure_queue

        done = work_erasure_queue(_lake(), actor=f"privacy_maintenance {context['run_id']}",
                                  label_studio=_label_studio())
        return {"erased": len(done), "rows_removed": sum(sum(d["rows_removed"].values()) for d in done)}

    @task
    def retention(**context):
        from vloop.privacy.erasure import RetentionPolicy, apply_retention

        today = context["logical_date"].astimezone(dt.timezone.utc).date()
        return apply_retention(_lake(), RetentionPolicy.from_settings(), today=today,
                               actor=f"privacy_maintenance {context['run_id']}")

    erase() >> retention()


privacy_maintenance()
