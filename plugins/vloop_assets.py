"""The loop's Airflow assets, shared by the DAGs (plugins/ is on Airflow's path).

Lineage in the Assets view: feedback_daily's ``pull`` updates ``vloop_labels`` (when it pulled new
labels) → ``retrain_biweekly`` runs on it or every 14 days → its ``deploy_canary`` and
``canary_rollout``'s looks that change what is served update ``vloop_serving``.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetAlias

LABELS = Asset(name="vloop_labels", uri="vloop://labels", group="vloop")
SERVING = Asset(name="vloop_serving", uri="vloop://serving", group="vloop")
# Tasks that change an asset only sometimes emit through an alias: an event is recorded only for
# what the task adds to it, so a pull without new labels does not start a retraining run.
NEW_LABELS = AssetAlias(name="vloop_new_labels", group="vloop")
SERVING_CHANGES = AssetAlias(name="vloop_serving_changes", group="vloop")
