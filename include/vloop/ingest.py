"""Ingest one day: the interactions of the data interval and every feedback event about them
that has arrived by the run time (late events count), exact duplicates dropped."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vloop.lake import FEEDBACK_DATASET, Lake
from vloop.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.schema import FEEDBACK, INTERACTION


@dataclass
class DayBatch:
    interactions: pd.DataFrame
    feedback: pd.DataFrame
    duplicates_dropped: int


def _dedupe(df: pd.DataFrame, id_column: str) -> tuple[pd.DataFrame, int]:
    """Drop rows identical in every column (lists compared by value). Exact duplicates share
    their id, so only rows whose id repeats are compared in full."""
    if not len(df):
        return df, 0
    repeated = df[id_column].duplicated(keep=False).to_numpy()
    if not repeated.any():
        return df, 0
    sub = df[repeated]
    key = sub.copy()
    for c in key.columns[key.dtypes == object]:  # list cells (token_logprobs) compared as tuples
        first = key[c].dropna().head(1).tolist()
        if first and not isinstance(first[0], str):
            key[c] = key[c].map(lambda v: tuple(v) if v is not None and not isinstance(v, str) else v)
    drop = key.duplicated().to_numpy()
    keep = np.ones(len(df), dtype=bool)
    keep[np.flatnonzero(repeated)[drop]] = False
    return df[keep].reset_index(drop=True), int((~keep).sum())


def ingest_day(lake: Lake, day: dt.date, run_time: dt.datetime) -> DayBatch:
    """Interactions of ``day`` (UTC) and feedback about them from ``day`` up to ``run_time``."""
    inter = lake.read_partitions(INTERACTIONS, day, day, schema=INTERACTION.arrow).to_pandas()
    last = max(day, run_time.astimezone(dt.timezone.utc).date())
    fb = lake.read_partitions(FEEDBACK_DATASET, day, last, schema=FEEDBACK.arrow).to_pandas()
    if len(fb):
        fb = fb[(fb["ts"] <= pd.Timestamp(run_time)) & fb["request_id"].isin(set(inter["request_id"]))]
    inter, d1 = _dedupe(inter, "request_id")
    fb, d2 = _dedupe(fb.reset_index(drop=True), "event_id")
    return DayBatch(inter, fb, d1 + d2)
