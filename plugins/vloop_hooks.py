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
        from vloop.lake import lake_from_connection

        return lake_from_connection(self.get_connection(self.lake_conn_id))
