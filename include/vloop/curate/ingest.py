"""Ingest one day: the interactions of the data interval and every feedback event about them
that has arrived by the run time (late events count), exact duplicates dropped."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vloop.store.lake import FEEDBACK_DATASET, Lake
from vloop.store.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.store.schema import FEEDBACK, INTERACTION, conform


@dataclass
class DayBatch:
    interactions: pd.DataFrame
    feedback: pd.DataFrame
    duplicates_dropped: int


# A feedback event sent again (the client's retry with the same event_id, serving's dedupe being per
# replica) differs only in when it arrived: the same event, counted once (the earliest kept).
RETRY_VARIES = ("ts",)


def _dedupe(df: pd.DataFrame, id_column: str, ignore: tuple[str, ...] = ()) -> tuple[pd.DataFrame, int]:
    """Drop rows identical in every column but ``ignore`` (lists compared by value), keeping the
    earliest by ``ts`` when ``ignore`` is given. Exact duplicates share their id, so only rows
    whose id repeats are compared in full."""
    if not len(df):
        return df, 0
    repeated = df[id_column].duplicated(keep=False).to_numpy()
    if not repeated.any():
        return df, 0
    positions = np.flatnonzero(repeated)
    if ignore:
        positions = positions[np.argsort(df["ts"].to_numpy()[positions], kind="stable")]
    sub = df.iloc[positions]
    key = sub.drop(columns=list(ignore))
    for c in key.columns[key.dtypes == object]:  # list cells (token_logprobs) compared as tuples
        first = key[c].dropna().head(1).tolist()
        if first and not isinstance(first[0], str):
            key[c] = key[c].map(lambda v: tuple(v) if v is not None and not isinstance(v, str) else v)
    drop = key.duplicated().to_numpy()
    keep = np.ones(len(df), dtype=bool)
    keep[positions[drop]] = False
    return df[keep].reset_index(drop=True), int((~keep).sum())


def ingest_day(lake: Lake, day: dt.date, run_time: dt.datetime) -> DayBatch:
    """Interactions of ``day`` (UTC) and feedback about them from ``day`` up to ``run_time``."""
    inter = lake.read_partitions(INTERACTIONS, day, day, schema=INTERACTION.arrow).to_pandas()
    last = max(day, run_time.astimezone(dt.timezone.utc).date())
    fb = lake.read_partitions(FEEDBACK_DATASET, day, last, schema=FEEDBACK.arrow).to_pandas()
    if len(fb):
        fb = fb[(fb["ts"] <= pd.Timestamp(run_time)) & fb["request_id"].isin(set(inter["request_id"]))]
    inter, d1 = _dedupe(inter, "request_id")
    fb, d2 = _dedupe(fb.reset_index(drop=True), "event_id", ignore=RETRY_VARIES)
    return DayBatch(inter, fb, d1 + d2)


# -- one hour ---------------------------------------------------------------------------------------
HOUR_FILE = re.compile(r"/hour=(\d\d)/[^/]+$")
FEEDBACK_BATCH_ROWS = 65_536  # feedback is scanned a record batch at a time, never a whole file decoded


def _hour_of(key: str) -> int | None:
    m = HOUR_FILE.search(key)
    return int(m.group(1)) if m else None


def raw_hours(lake: Lake, day: dt.date) -> list[int]:
    """The hours of ``day`` with interactions in the lake (``hour=HH`` partitions, and the hours
    of any day-level file's rows), sorted."""
    keys = lake.partition_keys(INTERACTIONS, day, day)
    hours = {h for h in map(_hour_of, keys) if h is not None}
    for k in keys:
        if _hour_of(k) is None:  # not the shippers' layout, but readable: its rows' own hours
            ts = lake.read_parquet(k, columns=["ts"]).column("ts")
            hours |= set(pc.unique(pc.hour(ts)).to_pylist())
    return sorted(hours)


def _hour_interactions(lake: Lake, day: dt.date, hour: int) -> pa.Table:
    """Interactions of one hour: its ``hour=HH`` partition plus that hour's rows of day-level files."""
    tables = []
    for k in lake.partition_keys(INTERACTIONS, day, day):
        h = _hour_of(k)
        if h == hour:
            tables.append(lake.read_parquet(k))
        elif h is None:
            t = lake.read_parquet(k)
            tables.append(t.filter(pc.equal(pc.hour(t.column("ts")), hour)))
    target = INTERACTION.arrow
    tables = [conform(t, target) for t in tables]  # old files lack newer optional columns
    return pa.concat_tables(tables) if tables else target.empty_table()


def _feedback_about(lake: Lake, day: dt.date, run_time: dt.datetime, request_ids: pa.Array) -> pa.Table:
    """Feedback events from ``day`` up to ``run_time`` about ``request_ids``. Every feedback file
    of those days is scanned (an event's file says when it happened, not which request's hour it
    belongs to), one record batch at a time, so memory follows the matches, not the files."""
    last = max(day, run_time.astimezone(dt.timezone.utc).date())
    target = FEEDBACK.arrow
    until = pa.scalar(pd.Timestamp(run_time).as_unit("us"), pa.timestamp("us", tz="UTC"))
    found = []
    if len(request_ids):
        for k in lake.partition_keys(FEEDBACK_DATASET, day, last):
            pf = pq.ParquetFile(pa.BufferReader(lake.get_bytes(k)))
            for batch in pf.iter_batches(batch_size=FEEDBACK_BATCH_ROWS):
                batch = conform(pa.Table.from_batches([batch]), target)
                keep = pc.and_(pc.is_in(batch.column("request_id"), value_set=request_ids),
                               pc.less_equal(batch.column("ts"), until))
                keep = pc.fill_null(keep, False)
                if pc.any(keep).as_py():
                    found.append(batch.filter(keep))
    return pa.concat_tables(found) if found else target.empty_table()


def ingest_hour(lake: Lake, day: dt.date, hour: int, run_time: dt.datetime) -> DayBatch:
    """:func:`ingest_day` for one hour of ``day``: its interactions and every feedback event about
    them up to ``run_time``. Exact duplicates share their timestamp, so they share the hour: the
    hours of a day together drop exactly what the whole day would."""
    inter = _hour_interactions(lake, day, hour)
    fb = _feedback_about(lake, day, run_time, pc.unique(inter.column("request_id").drop_null()))
    inter, d1 = _dedupe(inter.to_pandas(), "request_id")
    fb, d2 = _dedupe(fb.to_pandas().reset_index(drop=True), "event_id", ignore=RETRY_VARIES)
    return DayBatch(inter, fb, d1 + d2)
