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


# -- one slice -------------------------------------------------------------------------------------
# The daily pipeline's mapped unit is a slice of at most `slice_rows` interactions, cut from the
# day's raw hour partitions: consecutive quiet hours share a slice, a busy hour is split at
# quantiles of its timestamps. A slice is a list of pieces; every row of the day lies in exactly
# one piece, so the slices of a day together ingest what the whole day would.
HOUR_FILE = re.compile(r"/hour=(\d\d)/[^/]+$")
FEEDBACK_BATCH_ROWS = 65_536  # feedback is scanned a record batch at a time, never a whole file decoded
INTERACTION_BATCH_ROWS = 32_768  # likewise a busy hour's interactions, when a slice takes part of it
NO_TS = np.iinfo(np.int64).min  # a row without a timestamp sorts first: it falls in its hour's first piece


@dataclass(frozen=True)
class Piece:
    """The rows of raw hour ``hour`` whose ``ts`` (epoch microseconds, UTC) lies in [lo, hi);
    None is open. An hour's pieces cover all its rows: the first is open below, the last above."""

    hour: int
    lo: int | None = None
    hi: int | None = None

    def to_json(self) -> list:
        return [self.hour, self.lo, self.hi]

    @classmethod
    def from_json(cls, v) -> "Piece":
        return cls(int(v[0]), v[1], v[2])

    def span(self, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
        """When the piece's rows happened: its bounds, or its hour's where it is open."""
        start = dt.datetime.combine(day, dt.time(self.hour), dt.timezone.utc)
        as_time = lambda us: dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc)  # noqa: E731
        return (as_time(self.lo) if self.lo is not None else start,
                as_time(self.hi) if self.hi is not None else start + dt.timedelta(hours=1))


def _hour_of(key: str) -> int | None:
    m = HOUR_FILE.search(key)
    return int(m.group(1)) if m else None


def _ts_us(ts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as int64 epoch microseconds, a missing one as NO_TS."""
    us = pc.cast(pc.cast(ts, pa.timestamp("us", tz="UTC")), pa.int64())
    return pc.fill_null(us, NO_TS).to_numpy(zero_copy_only=False)


def _day_level_hours(ts) -> np.ndarray:
    """The hour of each row of a day-level file (not the shippers' layout); 0 without a timestamp."""
    return pc.fill_null(pc.hour(ts), 0).to_numpy(zero_copy_only=False)


def _raw_files(lake: Lake, day: dt.date) -> dict[int | None, list[str]]:
    """The day's raw interaction files by hour partition (None: day-level files)."""
    out: dict[int | None, list[str]] = {}
    for k in lake.partition_keys(INTERACTIONS, day, day):
        out.setdefault(_hour_of(k), []).append(k)
    return out


def _hour_batches(lake: Lake, day: dt.date, hour: int, files: dict, columns: list[str] | None = None):
    """Record batches of raw hour ``hour`` (its partition's files, and that hour's rows of day-level
    files), a few tens of thousands of rows at a time, conformed to the interaction schema."""
    target = INTERACTION.arrow if columns is None else pa.schema([INTERACTION.arrow.field(c) for c in columns])
    for k in files.get(hour, []) + files.get(None, []):
        pf = pq.ParquetFile(pa.BufferReader(lake.get_bytes(k)))
        for batch in pf.iter_batches(batch_size=INTERACTION_BATCH_ROWS, columns=columns):
            t = conform(pa.Table.from_batches([batch]), target)  # old files lack newer optional columns
            if _hour_of(k) is None:
                t = t.filter(pa.array(_day_level_hours(t.column("ts")) == hour))
            yield t


def raw_hours(lake: Lake, day: dt.date) -> list[int]:
    """The hours of ``day`` with interactions in the lake (``hour=HH`` partitions, and the hours
    of any day-level file's rows), sorted."""
    files = _raw_files(lake, day)
    hours = {h for h in files if h is not None}
    for k in files.get(None, []):  # not the shippers' layout, but readable: its rows' own hours
        hours |= set(_day_level_hours(lake.read_parquet(k, columns=["ts"]).column("ts")).tolist())
    return sorted(hours)


def plan_slices(lake: Lake, day: dt.date, slice_rows: int) -> list[tuple[list[Piece], int]]:
    """Cut ``day``'s interactions into slices of at most ``slice_rows`` rows: (pieces, rows) each.
    The day's rows are taken in order (hour partition, then timestamp) and cut every
    ``slice_rows`` rows, so quiet hours share a slice and a busy hour is split; a cut never
    separates rows with the same timestamp (a slice can exceed the size by such ties). Only the
    ``ts`` column is read, an hour at a time. A day without interactions is one empty slice, so
    every step runs on empty tables."""
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be at least 1, got {slice_rows}")
    files = _raw_files(lake, day)
    slices: list[tuple[list[Piece], int]] = []
    current: list[Piece] = []
    rows = 0
    for hour in raw_hours(lake, day):
        ts = [_ts_us(b.column("ts")) for b in _hour_batches(lake, day, hour, files, columns=["ts"])]
        ts = np.sort(np.concatenate(ts)) if ts else np.zeros(0, np.int64)
        start, lo = 0, None  # the hour's rows before `start` are in earlier slices; they end at `lo`
        while len(ts) - start > slice_rows - rows:
            cut = int(np.searchsorted(ts, ts[start + slice_rows - rows], side="left"))  # before the ties
            if cut == start:  # the slice's room is all one instant
                if rows:
                    slices.append((current, rows))
                    current, rows = [], 0
                    continue
                cut = int(np.searchsorted(ts, ts[start], side="right"))  # a slice of the ties alone
                if cut == len(ts):
                    break
            current.append(Piece(hour, lo, int(ts[cut])))
            slices.append((current, rows + cut - start))
            current, rows, start, lo = [], 0, cut, int(ts[cut])
        current.append(Piece(hour, lo, None))
        rows += len(ts) - start
    if current or not slices:
        slices.append((current, rows))
    return slices


def slice_interactions(lake: Lake, day: dt.date, pieces: list[Piece]) -> pa.Table:
    """The interactions of one slice, read a record batch at a time (memory follows the slice,
    not the hours it is cut from)."""
    files, tables = _raw_files(lake, day), []
    for p in pieces:
        for t in _hour_batches(lake, day, p.hour, files):
            if p.lo is not None or p.hi is not None:
                ts = _ts_us(t.column("ts"))
                keep = np.ones(len(ts), dtype=bool)
                if p.lo is not None:
                    keep &= ts >= p.lo
                if p.hi is not None:
                    keep &= ts < p.hi
                t = t.filter(pa.array(keep))
            if t.num_rows:
                tables.append(t)
    return pa.concat_tables(tables) if tables else INTERACTION.arrow.empty_table()


def _last_feedback_day(day: dt.date, run_time: dt.datetime) -> dt.date:
    """The last day whose feedback partition can hold events up to ``run_time`` about ``day``."""
    return max(day, run_time.astimezone(dt.timezone.utc).date())


def _feedback_batches(lake: Lake, keys: list[str]):
    """The feedback files ``keys``, a record batch at a time, conformed to the feedback schema."""
    for k in keys:
        pf = pq.ParquetFile(pa.BufferReader(lake.get_bytes(k)))
        for batch in pf.iter_batches(batch_size=FEEDBACK_BATCH_ROWS):
            yield conform(pa.Table.from_batches([batch]), FEEDBACK.arrow)


def _feedback_about(lake: Lake, day: dt.date, run_time: dt.datetime, request_ids: pa.Array,
                    routed: tuple[str, set[str]] | None = None) -> pa.Table:
    """Feedback events from ``day`` up to ``run_time`` about ``request_ids``, one record batch at a
    time, so memory follows the matches, not the files. ``routed``: the file the plan sent this
    slice's events to (:func:`route_feedback`) and the feedback files it read, so only files
    stored since are scanned whole; without it every feedback file of those days is (an event's
    file says when it happened, not which request's hour it belongs to)."""
    until = pa.scalar(pd.Timestamp(run_time).as_unit("us"), pa.timestamp("us", tz="UTC"))
    found = []
    if len(request_ids):
        keys = lake.partition_keys(FEEDBACK_DATASET, day, _last_feedback_day(day, run_time))
        if routed is not None:
            keys = [routed[0]] + [k for k in keys if k not in routed[1]]
        for batch in _feedback_batches(lake, keys):
            keep = pc.and_(pc.is_in(batch.column("request_id"), value_set=request_ids),
                           pc.less_equal(batch.column("ts"), until))
            keep = pc.fill_null(keep, False)
            if pc.any(keep).as_py():
                found.append(batch.filter(keep))
    return pa.concat_tables(found) if found else FEEDBACK.arrow.empty_table()


def id_hashes(ids: pa.ChunkedArray | pa.Array | pd.Series) -> np.ndarray:
    """A 64-bit hash of each id, from an Arrow column or a pandas one (a missing one to a fixed
    value): the plan routes feedback by the request ids' (:func:`route_feedback`), the daily gate
    compares slices by the request and event ids' (vloop.curate.daily.gate)."""
    arrow = isinstance(ids, (pa.Array, pa.ChunkedArray))
    values = ids.to_numpy(zero_copy_only=False) if arrow else ids.to_numpy(dtype=object)
    # categorize=False: ids are mostly distinct, so finding the distinct ones first costs more than it saves
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)


def route_feedback(lake: Lake, day: dt.date, slices: list[tuple[list[Piece], int]], run_time: dt.datetime,
                   key_of) -> list[str]:
    """Send each feedback event from ``day`` to ``run_time``'s day about one of ``day``'s interactions
    to the file of the slice that holds the interaction, ``key_of(slice_no)`` (every slice gets
    one, maybe empty), in one pass over the feedback: each slice's ingest then reads its own
    events instead of every feedback file of the days (which made ingest grow with the square of
    a day's size). The day's request ids are held as 64-bit hashes with their slice (12 bytes an
    interaction, read an hour at a time); an id found in several slices, or two ids with one hash,
    send their events to each of those slices, and ingest keeps only events about its own
    interactions (:func:`_feedback_about`), so nothing is lost or counted twice. Events go through
    a file per slice on local disk, at most two batches' worth in memory. Returns the feedback
    files read: ingest scans those stored since (:func:`_feedback_about`)."""
    import tempfile

    files = _raw_files(lake, day)
    by_hour: dict[int, list[tuple[int | None, int]]] = {}
    for s, (pieces, _) in enumerate(slices):
        for p in pieces:
            by_hour.setdefault(p.hour, []).append((p.lo, s))
    # Filled in place (the plan counted the rows; a file shipped since grows them): no second copy.
    hashes = np.empty(sum(n for _, n in slices), np.uint64)
    owners = np.empty(len(hashes), np.int32)
    n = 0
    for hour, hour_pieces in by_hour.items():
        cuts = np.array([lo for lo, _ in hour_pieces[1:]], dtype=np.int64)  # the first piece starts the hour
        slice_nos = np.array([s for _, s in hour_pieces], dtype=np.int32)
        for t in _hour_batches(lake, day, hour, files, columns=["request_id", "ts"]):
            if n + t.num_rows > len(hashes):
                hashes, owners = np.resize(hashes, n + t.num_rows), np.resize(owners, n + t.num_rows)
            hashes[n:n + t.num_rows] = id_hashes(t.column("request_id"))
            owners[n:n + t.num_rows] = slice_nos[np.searchsorted(cuts, _ts_us(t.column("ts")), side="right")]
            n += t.num_rows
    hashes, owners = hashes[:n], owners[:n]
    order = np.argsort(hashes)
    owners = owners[order]
    del order
    hashes.sort()  # in place, the order argsort found (equal hashes: any order, their slices are a set)
    repeats = np.r_[hashes[1:] == hashes[:-1], False]  # the next entry has the same hash

    read = lake.partition_keys(FEEDBACK_DATASET, day, _last_feedback_day(day, run_time))
    with tempfile.TemporaryDirectory(prefix="vloop-routed-") as tmp:
        writers: dict[int, pq.ParquetWriter] = {}
        pending: dict[int, list[pa.Table]] = {}
        pending_rows: dict[int, int] = {}

        def flush(s: int) -> None:
            if s not in writers:
                writers[s] = pq.ParquetWriter(f"{tmp}/{s}.parquet", FEEDBACK.arrow, **FEEDBACK.parquet_options())
            writers[s].write_table(pa.concat_tables(pending.pop(s)))
            del pending_rows[s]

        for batch in _feedback_batches(lake, read if n else []):  # a day without interactions: no events to send
            h = id_hashes(batch.column("request_id"))
            lo = np.empty(len(h), np.int64)
            by_hash = np.argsort(h)  # needles in order: the search walks the table forward (cache)
            lo[by_hash] = np.minimum(np.searchsorted(hashes, h[by_hash]), n - 1)
            found = (hashes[lo] == h) & batch.column("request_id").is_valid().to_numpy(zero_copy_only=False)
            several = found & repeats[lo]
            rows = np.nonzero(found & ~several)[0]
            dest = owners[lo[rows]]
            extra = [(r, s) for r in np.nonzero(several)[0]
                     for s in set(owners[lo[r]:np.searchsorted(hashes, h[r], side="right")].tolist())]
            if extra:
                rows = np.concatenate([rows, np.array([r for r, _ in extra], dtype=rows.dtype)])
                dest = np.concatenate([dest, np.array([s for _, s in extra], dtype=dest.dtype)])
            by_dest = np.argsort(dest, kind="stable")
            rows, dest = rows[by_dest], dest[by_dest]
            starts = np.flatnonzero(np.r_[True, dest[1:] != dest[:-1]]) if len(dest) else []
            for a, b in zip(starts, list(starts[1:]) + [len(dest)]):
                s = int(dest[a])
                pending.setdefault(s, []).append(batch.take(pa.array(np.sort(rows[a:b]))))
                pending_rows[s] = pending_rows.get(s, 0) + (b - a)
            # Memory stays at two batches' rows, however many slices wait: the fullest go out first.
            while sum(pending_rows.values()) > 2 * FEEDBACK_BATCH_ROWS:
                flush(max(pending_rows, key=pending_rows.get))
        for s in list(pending):
            flush(s)
        for w in writers.values():
            w.close()
        for s in range(len(slices)):
            if s in writers:
                with open(f"{tmp}/{s}.parquet", "rb") as f:
                    lake.put_bytes(key_of(s), f.read(), "application/vnd.apache.parquet")
            else:
                lake.write_parquet(key_of(s), FEEDBACK.arrow.empty_table())
    return read


def ingest_slice(lake: Lake, day: dt.date, pieces: list[Piece], run_time: dt.datetime,
                 routed: tuple[str, set[str]] | None = None) -> DayBatch:
    """:func:`ingest_day` for one slice of ``day`` (:func:`plan_slices`): its interactions and every
    feedback event about them up to ``run_time`` (from the file the plan routed them to, when it
    did: ``routed``, see :func:`_feedback_about`). Exact duplicates share their timestamp, so they
    share the slice: the slices of a day together drop exactly what the whole day would."""
    inter = slice_interactions(lake, day, pieces)
    fb = _feedback_about(lake, day, run_time, pc.unique(inter.column("request_id").drop_null()), routed)
    inter, d1 = _dedupe(inter.to_pandas(), "request_id")
    fb, d2 = _dedupe(fb.to_pandas().reset_index(drop=True), "event_id", ignore=RETRY_VARIES)
    return DayBatch(inter, fb, d1 + d2)
