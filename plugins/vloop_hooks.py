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
