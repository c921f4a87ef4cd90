"""Airflow hooks for vloop's connections.

Airflow puts ``plugins/`` on the path, so DAG tasks can ``from vloop_hooks import LakeHook``.
A hook only resolves its Airflow connection (declared in airflow_settings.yaml, overridable with
``AIRFLOW_CONN_VLOOP_LAKE`` and friends) and hands the values to the ``vloop`` library.
"""

from __future__ import annotations

from airflow.sdk import BaseHook


class LakeHook(BaseHook):
    """The lake named by an Airflow connection: extra ``lake_url``; for S3 host/port, login/password."""

    conn_name_attr = "lake_conn_id"
    default_conn_name = "vloop_lake"
    conn_type = "generic"
    hook_name = "vloop lake"

    def __init__(self, lake_conn_id: str = default_conn_name):
        super().__init__()
        self.lake_conn_id = lake_conn_id

    def get_lake(self):
        from vloop.store.lake import lake_from_connection

        return lake_from_connection(self.get_connection(self.lake_conn_id))


class LabelStudioHook(BaseHook):
    """Label Studio named by an Airflow connection: host = its URL, password = the API token,
    extra ``project_title`` and, for a local lake, ``document_root`` (the directory Label Studio
    serves local files from, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)."""

    conn_name_attr = "label_studio_conn_id"
    default_conn_name = "vloop_label_studio"
    conn_type = "http"
    hook_name = "vloop Label Studio"

    def __init__(self, label_studio_conn_id: str = default_conn_name):
        super().__init__()
        self.label_studio_conn_id = label_studio_conn_id
        conn = self.get_connection(label_studio_conn_id)
        extra = conn.extra_dejson or {}
        url = conn.host if "://" in (conn.host or "") else f"http://{conn.host}"
        self.url = f"{url}:{conn.port}" if conn.port else url
        self.token = conn.password
        self.project_title = extra.get("project_title") or "vloop VQA review"
        self.document_root = extra.get("document_root")

    def get_client(self):
        from vloop.curate.labelstudio import LabelStudio

        return LabelStudio(self.url, self.token)


def set_run_note(context, text: str) -> None:
    """Set the running DAG run's note through Airflow's public API (connection
    ``vloop_airflow_api``: host = the API server's URL, login/password = an auth-manager user
    allowed to edit the DAG's runs, or only password = a bearer token): the Task SDK lets a task
    read its run's note, not write it. Without the connection the note is only logged; a failure
    to set it is logged and fails nothing (the decision is in the registry either way)."""
    from vloop.learn.retrain import patch_run_note

    print(f"run note: {text}")
    try:
        conn = BaseHook.get_connection("vloop_airflow_api")
    except Exception as e:  # not configured
        print(f"not set on the run: no vloop_airflow_api connection ({type(e).__name__})")
        return
    url = conn.host if not conn.port else f"{conn.host}:{conn.port}"
    try:
        patch_run_note(url, context["dag"].dag_id, context["run_id"], text, username=conn.login or None,
                       password=conn.password if conn.login else None,
                       token=None if conn.login else conn.password)
    except Exception as e:
        print(f"WARNING: the run's note was not set: {e}")
