"""The daily feedback pipeline, one function per step of the ``feedback_daily`` DAG.

A day is processed a **slice at a time** wherever a step only needs the rows in front of it
(ingest, validation, mining, confidence, image checks). A slice is at most ``slice_rows``
interactions cut from the day's raw hour partitions (:func:`vloop.curate.ingest.plan_slices`):
a quiet day is one slice, a busy hour is split. The DAG maps those steps over the day's slices
(Airflow dynamic task mapping), so a worker holds a slice of traffic, never a day, whatever the
day's size, and slices run side by side on as many workers as there are. The steps that need the
whole day are **reduces** over the slices' outputs: the quality gate (the day's bad share, ids
unique across slices), the phrasings clustering, the selection under one label budget (a slice
at a time, best ``budget`` kept), and the report (a slice at a time, folded into partial
aggregates). Each slice step is a plain function of
``(lake, day, slice_no)``; the whole-day functions (:func:`ingest`, :func:`validate`,
:func:`mine_feedback`, :func:`score_confidence`, :func:`check_images`) run the same slice steps
one after another, for callers without Airflow.

Each step reads what the previous one left in the lake and writes its own output there, whole
objects at a time (atomic: a failed step leaves its previous output or nothing, never half of one).
Every output of day D lives under ``…/dt=D/`` (slice outputs under ``…/dt=D/slice=NNN/``; days
processed before slices have ``hour=HH/`` instead, which every reader still reads), and a step
re-run for D replaces it, so re-running a day changes nothing. Each returns a small JSON-able
summary (the DAG's XCom and log line).

A day without traffic (a deployment's first night) is a normal day: it is one empty slice, so
every step runs, writes its output with the columns it always has and no rows, and counts
zeros; the report says "no traffic".

| step | per | reads | writes |
|---|---|---|---|
| :func:`plan` | day | ``raw/interactions`` (``ts``, ``request_id``), ``raw/feedback`` | ``curated/dt=D/slices.json`` (the slices the DAG maps over), ``curated/dt=D/slice=NNN/routed_feedback.parquet`` |
| :func:`ingest_slice` | slice | ``raw/interactions/…/hour=HH``, routed feedback (+ ``raw/feedback`` stored since the plan) | ``curated/dt=D/slice=NNN/ingested_*.parquet`` |
| :func:`validate_slice` | slice | ingested | ``quarantine/dt=D/slice=NNN/`` (rows + reasons, validation result), ``curated/dt=D/slice=NNN/validated_*.parquet`` (rows, image keys, id hashes) |
| :func:`gate` | day | validated slices (their id hashes; the ids of slices whose hashes repeat) | ``quarantine/dt=D/validation.json``; passed: ``curated/dt=D/slice=NNN/{interactions,feedback,image_keys}.parquet`` |
| :func:`mine_slice` | slice | curated (+ the next slices' first minutes) | ``curated/dt=D/slice=NNN/{mined,mined_counts,phrasing_candidates,edit_errors}.parquet``, ``…/report_part.json`` |
| :func:`mine_day_phrasings` | day | phrasing candidates | ``curated/dt=D/phrasings.parquet`` |
| :func:`score_confidence_slice` | slice | curated (+ the model) | ``curated/dt=D/slice=NNN/confidence.parquet`` |
| :func:`check_images_slot` | slice slot | the slices' ``image_keys.parquet``, ``raw/images`` | ``curated/dt=D/slice=NNN/image_quality.parquet`` (the images whose key hashes to the slot) |
| :func:`select_for_labelling` | day | all of the above, ``labeled/``, ``privacy/`` | ``labeling/dt=D/selected.parquet`` |
| :func:`push_to_label_studio` | day | selected | Label Studio tasks, ``labeling/dt=D/pushed.json`` |
| :func:`pull_annotations` | day | Label Studio | ``labeled/dt=D/annotations.parquet`` |
| :func:`report` | day (a slice at a time) | the slices' report parts, curated, labeled | ``reports/dt=D/{metrics,top_errors,error_types,edit_length,deleted_phrases,signals}.parquet``, ``reports/dt=D/slice=NNN/errors.parquet``, ``reports/dt=D/index.html`` |
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import re
import time
import zlib
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from vloop.store.frames import member
from vloop.store.lake import Lake, LakeKeyNotFound, partition_prefix
from vloop.store.schema import FEEDBACK, INTERACTION

log = logging.getLogger(__name__)

CURATED, QUARANTINE, LABELING, LABELED, REPORTS = "curated", "quarantine", "labeling", "labeled", "reports"
LABELED_FILE = "annotations.parquet"
HISTORY_DAYS = 30  # how far back the report's trend plots and the category error rates look
# The curated tables the gate publishes per slice, and the staged names validation writes them under.
PUBLISHED = {"validated_interactions.parquet": "interactions.parquet",
             "validated_feedback.parquet": "feedback.parquet",
             "validated_image_keys.parquet": "image_keys.parquet"}


def key(dataset: str, day: dt.date | str, name: str) -> str:
    return partition_prefix(dataset, day) + name


def slice_key(dataset: str, day: dt.date | str, slice_no: int, name: str) -> str:
    return f"{partition_prefix(dataset, day)}slice={slice_no:03d}/{name}"


def put_frame(lake: Lake, k: str, df: pd.DataFrame, schema: pa.Schema | None = None) -> None:
    if schema is not None:
        extra = [c for c in df.columns if c not in schema.names]
        for c in extra:  # e.g. quarantine_reason, priority: appended after the record's fields
            schema = schema.append(pa.field(c, pa.Table.from_pandas(df[[c]], preserve_index=False).schema.field(c).type))
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    else:
        if not len(df):  # an empty object column has no values to infer a type from: store strings, not nulls
            df = df.astype({c: "str" for c in df.columns[df.dtypes == object]})
        table = pa.Table.from_pandas(df, preserve_index=False)
    lake.write_parquet(k, table)


def get_frame(lake: Lake, k: str, columns: list[str] | None = None) -> pd.DataFrame:
    return lake.read_parquet(k, columns=columns).to_pandas()


# Every interaction column but the per-token log-probabilities: the steps after validation that
# do not need them skip reading a million Python lists.
# Without the log-probabilities (heavy), nor `app`: curated files from before it have no such
# column, and naming a column a file lacks fails the read (_with_app reads it when there).
LIGHT_COLUMNS = [n for n in INTERACTION.arrow.names if n not in ("token_logprobs", "app")]


def part_keys(lake: Lake, dataset: str, day: dt.date | str, name: str) -> dict[int, str]:
    """``dataset/dt=D/slice=NNN/name`` for every slice that has one, by slice number; for a day
    processed by the hour (before slices), its ``hour=HH/name`` files by hour."""
    prefix = partition_prefix(dataset, day)
    found: dict[str, dict[int, str]] = {"slice": {}, "hour": {}}
    for k in lake.list(prefix):
        m = re.fullmatch(r"(slice|hour)=(\d+)/" + re.escape(name), k[len(prefix):])
        if m:
            found[m.group(1)][int(m.group(2))] = k
    return found["slice"] or found["hour"]


def iter_table(lake: Lake, dataset: str, day: dt.date | str, name: str, columns: list[str] | None = None):
    """:func:`read_table`'s parts, one slice's file at a time (a reduce that folds them holds one)."""
    parts = part_keys(lake, dataset, day, name)
    for k in [parts[s] for s in sorted(parts)] or [key(dataset, day, name)]:
        yield get_frame(lake, k, columns)


def read_table(lake: Lake, dataset: str, day: dt.date | str, name: str,
               columns: list[str] | None = None) -> pd.DataFrame:
    """A day's table: its slices' files concatenated (:func:`part_keys`), or the day-level
    ``name`` (days processed before the pipeline was mapped, and tables only a day has);
    :class:`LakeKeyNotFound` if there is neither. Whole-day readers only (the reduces, dataset
    builds): a slice step reads its own slice."""
    parts = part_keys(lake, dataset, day, name)
    if not parts:
        return get_frame(lake, key(dataset, day, name), columns)
    tables = [lake.read_parquet(parts[h], columns=columns) for h in sorted(parts)]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _days_back(day: dt.date, n: int) -> list[dt.date]:
    return [day - dt.timedelta(days=i) for i in range(n)]


def read_days(lake: Lake, dataset: str, name: str, days=None, exclude: dt.date | None = None) -> pd.DataFrame:
    """Concatenate ``dataset/dt=*/name`` (or its slices' files) over ``days`` (or every day
    present), except ``exclude``."""
    if days is None:
        days = sorted({k.split("dt=")[1].split("/")[0] for k in lake.list(dataset + "/")
                       if k.endswith("/" + name) and "dt=" in k})
    frames = []
    for d in days:
        d = d.isoformat() if isinstance(d, dt.date) else d
        if exclude is not None and d == exclude.isoformat():
            continue
        try:
            frames.append(read_table(lake, dataset, d, name).assign(dt=d))
        except LakeKeyNotFound:
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_time(day: dt.date) -> dt.datetime:
    """Feedback counts up to this time: now. In simulation mode (the demo's simulated days, which
    may lie ahead of the real clock) the simulated run time, an hour after the day ended."""
    from vloop.store.config import load_settings

    if load_settings().simulation:
        return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), dt.timezone.utc)
    return dt.datetime.now(dt.timezone.utc)


# -- 0. the slices --------------------------------------------------------------------------------
SLICE_PLAN = "slices.json"
# Interactions per slice: on a 2-core worker a slice of 100,000 takes a few seconds per step and at
# most ~600 MB (bench/daily_pipeline.py); a quiet day is one slice, a million-row day ten. Each task
# also pays a fixed cost (process start, Great Expectations' set-up, numba's first call, ~0.5-1 s):
# at 50,000 rows a slice, the million-row day took 82 s against 71 s at 100,000, peaks 498 MB against 582.
DEFAULT_SLICE_ROWS = 100_000


ROUTED_FEEDBACK = "routed_feedback.parquet"  # a slice's feedback events, sent there by the plan


def plan(lake: Lake, day: dt.date, slice_rows: int = DEFAULT_SLICE_ROWS, run_time: dt.datetime | None = None
         ) -> list[int]:
    """Cut ``day`` into slices of at most ``slice_rows`` interactions
    (:func:`vloop.curate.ingest.plan_slices`), store the plan in ``curated/dt=D/slices.json`` and
    return the slice numbers the slice steps are mapped over. With ``run_time`` (the ingest's),
    the day's feedback up to then is also sent to the slices its interactions are in
    (:func:`vloop.curate.ingest.route_feedback`), so each ingest reads only its own."""
    from vloop.curate.ingest import plan_slices, route_feedback

    slices = plan_slices(lake, day, slice_rows)
    routed = None
    if run_time is not None:
        # The plan goes first and comes back last: a stored plan's routed files are all its own.
        if lake.exists(key(CURATED, day, SLICE_PLAN)):
            lake.delete(key(CURATED, day, SLICE_PLAN))
        routed = route_feedback(lake, day, slices, run_time, lambda s: slice_key(CURATED, day, s, ROUTED_FEEDBACK))
    lake.put_json(key(CURATED, day, SLICE_PLAN), {
        "day": day.isoformat(), "slice_rows": slice_rows, "feedback_routed_from": routed,
        "slices": [{"rows": rows, "pieces": [p.to_json() for p in pieces]} for pieces, rows in slices]})
    log.info("%s: %d interactions in %d slice(s) of at most %d", day, sum(r for _, r in slices), len(slices),
             slice_rows)
    return list(range(len(slices)))


def _stored_plan(lake: Lake, day: dt.date) -> dict:
    try:
        return lake.get_json(key(CURATED, day, SLICE_PLAN))
    except LakeKeyNotFound:
        raise LakeKeyNotFound(f"{key(CURATED, day, SLICE_PLAN)}: no slice plan for {day} (run plan first)") from None


def _plan(lake: Lake, day: dt.date) -> list[dict]:
    return _stored_plan(lake, day)["slices"]


def slice_spans(lake: Lake, day: dt.date) -> list[tuple[dt.datetime, dt.datetime]]:
    """When each slice's interactions happened (its first piece's start, its last's end), from one
    read of the stored plan."""
    from vloop.curate.ingest import Piece

    out = []
    for sl in _plan(lake, day):
        pieces = [Piece.from_json(p) for p in sl["pieces"]]
        if not pieces:
            start = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
            out.append((start, start))
        else:
            out.append((pieces[0].span(day)[0], pieces[-1].span(day)[1]))
    return out


def slice_span(lake: Lake, day: dt.date, slice_no: int) -> tuple[dt.datetime, dt.datetime]:
    """When slice ``slice_no``'s interactions happened (:func:`slice_spans`)."""
    return slice_spans(lake, day)[slice_no]


def _span_text(lake: Lake, day: dt.date, slice_no: int) -> str:
    start, end = slice_span(lake, day, slice_no)
    return f"{start:%H:%M:%S}-{end:%H:%M:%S}" if end > start else "empty"


def _summed(summaries: list[dict], day: dt.date) -> dict:
    """The slices' summaries added up (their numbers; the day's date)."""
    out: dict = {"day": day.isoformat(), "slices": len(summaries)}
    for s in summaries:
        for k, v in s.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "slice":
                out[k] = out.get(k, 0) + v
    return out


# -- 1. ingest ------------------------------------------------------------------------------------
def ingest_slice(lake: Lake, day: dt.date, slice_no: int, run_time: dt.datetime) -> dict:
    from vloop.curate.ingest import Piece
    from vloop.curate.ingest import ingest_slice as read_slice

    stored = _stored_plan(lake, day)
    read = stored.get("feedback_routed_from")  # None: a plan from before routing, or made without it
    routed = (slice_key(CURATED, day, slice_no, ROUTED_FEEDBACK), set(read)) if read is not None else None
    batch = read_slice(lake, day, [Piece.from_json(p) for p in stored["slices"][slice_no]["pieces"]], run_time, routed)
    put_frame(lake, slice_key(CURATED, day, slice_no, "ingested_interactions.parquet"), batch.interactions,
              INTERACTION.arrow)
    put_frame(lake, slice_key(CURATED, day, slice_no, "ingested_feedback.parquet"), batch.feedback, FEEDBACK.arrow)
    return {"day": day.isoformat(), "slice": slice_no, "span": _span_text(lake, day, slice_no),
            "interactions": len(batch.interactions), "feedback": len(batch.feedback),
            "duplicates_dropped": batch.duplicates_dropped, "events_until": run_time.isoformat()}


def ingest(lake: Lake, day: dt.date, run_time: dt.datetime, slice_rows: int = DEFAULT_SLICE_ROWS) -> dict:
    """:func:`plan` the day, then every slice through :func:`ingest_slice`."""
    summary = _summed([ingest_slice(lake, day, s, run_time) for s in plan(lake, day, slice_rows, run_time)], day)
    return {**summary, "events_until": run_time.isoformat()}


# -- 2. validate ----------------------------------------------------------------------------------
def validate_slice(lake: Lake, day: dt.date, slice_no: int, *, max_bad_fraction: float = 0.05) -> dict:
    """Run both suites on one slice; bad rows (with reasons) and the validation result go to
    ``quarantine/dt=D/slice=NNN/``, the good ones are staged as ``validated_*`` for :func:`gate`.
    A slice never stops the run: the gate judges the day."""
    from vloop.curate.ingest import id_hashes
    from vloop.curate.quality import QualityConfig, validate_feedback, validate_interactions

    cfg = QualityConfig(max_bad_fraction=max_bad_fraction)
    start = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    inter = get_frame(lake, slice_key(CURATED, day, slice_no, "ingested_interactions.parquet"))
    fb = get_frame(lake, slice_key(CURATED, day, slice_no, "ingested_feedback.parquet"))
    # The staged rows and their id hashes must match: a run that stops between the two leaves no
    # hashes, and the gate hashes that slice's ids itself.
    lake.delete(slice_key(CURATED, day, slice_no, ID_HASHES))
    vi = validate_interactions(inter, start, start + dt.timedelta(days=1), lake=lake, cfg=cfg)
    vf = validate_feedback(fb, cfg=cfg)
    put_frame(lake, slice_key(QUARANTINE, day, slice_no, "interactions.parquet"), vi.quarantined, INTERACTION.arrow)
    put_frame(lake, slice_key(QUARANTINE, day, slice_no, "feedback.parquet"), vf.quarantined, FEEDBACK.arrow)
    # Events about a quarantined interaction stay with it: they are not mined.
    good_fb = vf.good[member(vf.good["request_id"], vi.good["request_id"])]
    put_frame(lake, slice_key(CURATED, day, slice_no, "validated_interactions.parquet"), vi.good, INTERACTION.arrow)
    put_frame(lake, slice_key(CURATED, day, slice_no, "validated_feedback.parquet"), good_fb, FEEDBACK.arrow)
    put_frame(lake, slice_key(CURATED, day, slice_no, "validated_image_keys.parquet"), image_keys(vi.good))
    # The ids' hashes for the gate's uniqueness check across slices, made here in parallel: the
    # gate, which waits for every slice, then reads 8 bytes a row instead of hashing every id.
    put_frame(lake, slice_key(CURATED, day, slice_no, ID_HASHES), pd.concat(
        [pd.DataFrame({"table": pd.Series([what] * len(h), dtype="str"), "hash": h})
         for what, h in (("interactions", np.unique(id_hashes(vi.good["request_id"]))),
                         ("feedback", np.unique(id_hashes(good_fb["event_id"]))))],
        ignore_index=True))
    summary = {"day": day.isoformat(), "slice": slice_no, "interactions": len(inter), "feedback": len(fb),
               "quarantined_interactions": len(vi.quarantined), "quarantined_feedback": len(vf.quarantined),
               "reasons": _reason_counts(vi.quarantined, vf.quarantined)}
    lake.put_json(slice_key(QUARANTINE, day, slice_no, "validation.json"),
                  {**summary, "interactions_result": vi.result, "feedback_result": vf.result})
    return summary


def _reason_counts(*quarantined: pd.DataFrame) -> dict[str, int]:
    reasons = pd.concat([q.get("quarantine_reason", pd.Series(dtype=str)) for q in quarantined])
    return {k: int(v) for k, v in reasons.str.split("; ").explode().value_counts().items()} if len(reasons) else {}


ID_HASHES = "validated_id_hashes.parquet"  # per slice: table ("interactions"/"feedback"), hash of each distinct id


def _ids_in_several_slices(lake: Lake, day: dt.date, slices: list[int], what: str, column: str) -> dict[int, set]:
    """Per slice, the ``column`` values of its staged ``validated_{what}`` that another slice has
    too. Each slice checked its own ids; across slices only one sorted array of 64-bit hashes is
    held (each slice's distinct ids, 8 bytes a row, as :func:`validate_slice` stored them), then
    the slices whose hashes repeat are read and those values compared as strings. A slice's hashes
    may name ids since moved to quarantine (a gate run again): those only cost a comparison."""
    from vloop.curate.ingest import id_hashes

    if len(slices) < 2:
        return {}
    name = f"validated_{what}.parquet"

    def ids(s: int) -> pd.Series:
        return get_frame(lake, slice_key(CURATED, day, s, name), [column])[column]

    def distinct_hashes(s: int) -> np.ndarray:
        try:
            stored = lake.read_parquet(slice_key(CURATED, day, s, ID_HASHES))
        except LakeKeyNotFound:  # validated before the hashes were stored
            return np.unique(id_hashes(ids(s)))
        return stored.filter(pc.equal(stored["table"], what))["hash"].to_numpy()

    hashes = {s: distinct_hashes(s) for s in slices}
    every = np.concatenate(list(hashes.values()))
    every.sort()  # in place: no second copy
    shared = np.unique(every[1:][every[1:] == every[:-1]])
    del every
    if not len(shared):
        return {}
    found: dict[int, set] = {}
    for s in slices:
        if np.isin(hashes[s], shared).any():
            col = ids(s)
            found[s] = set(col[np.isin(id_hashes(col), shared)].dropna())
    seen: dict = {}
    for s, vals in found.items():
        for v in vals:
            seen.setdefault(v, set()).add(s)
    return {s: {v for v in vals if len(seen[v]) > 1} for s, vals in found.items() if any(len(seen[v]) > 1 for v in vals)}


def _quarantine_more(lake: Lake, day: dt.date, slice_no: int, what: str, column: str, ids: set, reason: str) -> None:
    """Move the staged rows of slice ``slice_no`` whose ``column`` is in ``ids`` to its quarantine (and, for
    interactions, their events out of the staged feedback, and the slice's image keys listed again
    from the rows that stay)."""
    schema = INTERACTION.arrow if what == "interactions" else FEEDBACK.arrow
    staged = get_frame(lake, slice_key(CURATED, day, slice_no, f"validated_{what}.parquet"))
    bad = member(staged[column], ids)
    q = get_frame(lake, slice_key(QUARANTINE, day, slice_no, f"{what}.parquet"))
    moved = staged[bad].assign(quarantine_reason=reason)
    put_frame(lake, slice_key(QUARANTINE, day, slice_no, f"{what}.parquet"), pd.concat([q, moved], ignore_index=True), schema)
    put_frame(lake, slice_key(CURATED, day, slice_no, f"validated_{what}.parquet"), staged[~bad].reset_index(drop=True), schema)
    if what == "interactions":
        fb = get_frame(lake, slice_key(CURATED, day, slice_no, "validated_feedback.parquet"))
        put_frame(lake, slice_key(CURATED, day, slice_no, "validated_feedback.parquet"),
                  fb[~member(fb["request_id"], ids)].reset_index(drop=True), FEEDBACK.arrow)
        put_frame(lake, slice_key(CURATED, day, slice_no, "validated_image_keys.parquet"), image_keys(staged[~bad]))


def gate(lake: Lake, day: dt.date, slices: list[int], *, max_bad_fraction: float = 0.05) -> dict:
    """The quality gate over the validated ``slices`` of ``day``: ids are made unique across slices
    (a request or event id that two slices both have is quarantined in both, as a whole-day suite
    would), the day's bad share is added up and the result stored in
    ``quarantine/dt=D/validation.json``. Over the threshold, raise
    :class:`~vloop.curate.quality.QualityGateError` before anything reaches the curated tables, so
    nothing downstream runs on the day (and an earlier run's curated tables stay as they were).
    Passed: each slice's staged rows become ``curated/dt=D/slice=NNN/{interactions,feedback}.parquet``
    (and its image keys ``image_keys.parquet``),
    and the outputs of slices the day no longer has (a re-run with fewer slices) are removed, as
    are those of a run from before slices (by the hour, or the whole day)."""
    from vloop.curate.quality import QualityGateError

    shared = {}
    for what, column, reason in (("interactions", "request_id", "request_id not unique"),
                                 ("feedback", "event_id", "event_id not unique")):
        shared[what] = _ids_in_several_slices(lake, day, slices, what, column)
        for h, ids in shared[what].items():
            _quarantine_more(lake, day, h, what, column, ids, reason)
    per_slice = [lake.get_json(slice_key(QUARANTINE, day, s, "validation.json")) for s in slices]
    quarantined = {what: [get_frame(lake, slice_key(QUARANTINE, day, s, f"{what}.parquet"), ["quarantine_reason"])
                          for s in slices] for what in ("interactions", "feedback")}
    n_inter = sum(v["interactions"] for v in per_slice)
    n_fb = sum(v["feedback"] for v in per_slice)
    bad_inter = sum(len(q) for q in quarantined["interactions"])
    bad_fb = sum(len(q) for q in quarantined["feedback"])
    frac_inter, frac_fb = (bad_inter / n_inter if n_inter else 0.0), (bad_fb / n_fb if n_fb else 0.0)
    summary = {
        "day": day.isoformat(), "slices": len(slices), "interactions": n_inter, "feedback": n_fb,
        "quarantined_interactions": bad_inter, "quarantined_feedback": bad_fb,
        "bad_fraction_interactions": round(frac_inter, 6), "bad_fraction_feedback": round(frac_fb, 6),
        "max_bad_fraction": max_bad_fraction,
        "reasons": _reason_counts(*quarantined["interactions"], *quarantined["feedback"]),
    }
    summary["passed"] = max(frac_inter, frac_fb) <= max_bad_fraction

    def results(which: str, shared: dict) -> dict:  # the slices' Great Expectations results, and the day's verdict
        return {"success": all(v[which]["success"] for v in per_slice) and not shared,
                "slices": {f"{v['slice']:03d}": v[which] for v in per_slice}}

    lake.put_json(key(QUARANTINE, day, "validation.json"),
                  {**summary, "interactions_result": results("interactions_result", shared["interactions"]),
                   "feedback_result": results("feedback_result", shared["feedback"])})
    if not summary["passed"]:
        raise QualityGateError(
            f"{day}: {frac_inter:.1%} of interactions and {frac_fb:.1%} of feedback events failed "
            f"validation, over the threshold of {max_bad_fraction:.1%}; the rows and reasons are in "
            f"{partition_prefix(QUARANTINE, day)}slice=*/")
    for s in slices:
        keys_list = slice_key(CURATED, day, s, "validated_image_keys.parquet")
        if not lake.exists(keys_list):  # validated before the key lists (a run that spans an upgrade)
            put_frame(lake, keys_list, image_keys(get_frame(
                lake, slice_key(CURATED, day, s, "validated_interactions.parquet"), ["image_key"])))
        for staged, published in PUBLISHED.items():
            lake.put_bytes(slice_key(CURATED, day, s, published), lake.get_bytes(slice_key(CURATED, day, s, staged)),
                           "application/vnd.apache.parquet")
    for dataset in (CURATED, QUARANTINE):
        prefix = partition_prefix(dataset, day)
        for k in lake.list(prefix):
            m = re.match(r"(slice|hour)=(\d+)/", k[len(prefix):])
            if m and (m.group(1) == "hour" or int(m.group(2)) not in slices):
                lake.delete(k)  # a slice the day no longer has, or an hour of a run from before slices
            elif dataset == CURATED and not m and k[len(prefix):] in DAY_LEVEL_BEFORE_HOURS:
                lake.delete(k)  # a run from before the pipeline was mapped: its tables now come per slice
    return summary


# What a run from before the pipeline was mapped (by the hour, then by the slice) left at the day level of curated/.
DAY_LEVEL_BEFORE_HOURS = {"ingested_interactions.parquet", "ingested_feedback.parquet", "interactions.parquet",
                          "feedback.parquet", "mined.parquet", "confidence.parquet", "image_quality.parquet",
                          "report_part.json", "edit_errors.parquet"}  # the last two: a report of such a day


def validate(lake: Lake, day: dt.date, *, max_bad_fraction: float = 0.05) -> dict:
    """Every ingested slice of ``day`` (the stored plan) through :func:`validate_slice`, then :func:`gate`."""
    slices = list(range(len(_plan(lake, day))))
    for s in slices:
        validate_slice(lake, day, s, max_bad_fraction=max_bad_fraction)
    return gate(lake, day, slices, max_bad_fraction=max_bad_fraction)


def curated_slice(lake: Lake, day: dt.date, slice_no: int, columns: list[str] | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (get_frame(lake, slice_key(CURATED, day, slice_no, "interactions.parquet"), columns),
            get_frame(lake, slice_key(CURATED, day, slice_no, "feedback.parquet")))


def curated(lake: Lake, day: dt.date, columns: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole day's curated interactions and feedback (a reduce's view; slices concatenated)."""
    return (read_table(lake, CURATED, day, "interactions.parquet", columns),
            read_table(lake, CURATED, day, "feedback.parquet"))


def curated_slices(lake: Lake, day: dt.date) -> list[int]:
    """The slices the gate published for ``day``."""
    return sorted(part_keys(lake, CURATED, day, "interactions.parquet"))


# -- 3. mine --------------------------------------------------------------------------------------
def mine_slice(lake: Lake, day: dt.date, slice_no: int, rules=None) -> dict:
    """Weak labels of one slice's interactions. A question asked again within the repeat window
    may fall in a later slice: those slices' first minutes are read too (three columns), so the
    slices of a day mine exactly what the whole day would."""
    from vloop.curate.mining import WEAK_LABELS, MiningRules, mine, phrasing_candidates
    from vloop.curate.report import slice_part

    rules = rules or MiningRules()
    folder = slice_key(CURATED, day, slice_no, "")
    inter, fb, apps = _slice_rows(lake, folder)
    later = []
    spans = slice_spans(lake, day)  # the plan read once, not once per later slice
    horizon = pd.Timestamp(spans[slice_no][1] + dt.timedelta(seconds=rules.repeat_window_s))
    for s in curated_slices(lake, day):
        if s > slice_no and pd.Timestamp(spans[s][0]) <= horizon:
            nxt = get_frame(lake, slice_key(CURATED, day, s, "interactions.parquet"), ["session_id", "question", "ts"])
            later.append(nxt[pd.to_datetime(nxt["ts"], utc=True) <= horizon])
    later = pd.concat(later, ignore_index=True) if later else None
    # A slice without traffic (mine returns no rows) still writes mined.parquet, with its columns.
    mined = mine(inter, fb, rules, later=later).merge(inter[["request_id", "category"]], on="request_id", how="left")
    put_frame(lake, slice_key(CURATED, day, slice_no, "mined.parquet"), mined)
    # What the day's reduces need of it, small: category error counts, badly handled phrasings.
    put_frame(lake, slice_key(CURATED, day, slice_no, "mined_counts.parquet"), mined_counts(mined))
    put_frame(lake, slice_key(CURATED, day, slice_no, "phrasing_candidates.parquet"), phrasing_candidates(inter, mined))
    # The slice's share of the day's report, here where its rows are at hand (the report is a reduce).
    write_report_part(lake, folder, *slice_part(inter, fb, mined, apps))
    return {"day": day.isoformat(), "slice": slice_no, "interactions": len(mined), **dict.fromkeys(WEAK_LABELS, 0),
            **{k: int(v) for k, v in mined["weak_label"].value_counts().items()}}


BAD_LABELS = ["negative", "weak_negative"]


def mined_counts(mined: pd.DataFrame) -> pd.DataFrame:
    """Per category: interactions and how many were mined as bad (additive over slices and days)."""
    m = mined.dropna(subset=["category"])
    out = m.assign(bad=m["weak_label"].isin(BAD_LABELS).astype("int64")).groupby("category", as_index=False)         .agg(n=("bad", "size"), bad=("bad", "sum"))
    return out.astype({"category": "str", "n": "int64", "bad": "int64"})


def mine_day_phrasings(lake: Lake, day: dt.date) -> dict:
    """The reduce of the slices' phrasing candidates: ``curated/dt=D/phrasings.parquet``."""
    from vloop.curate.mining import PHRASING_ARROW, cluster_phrasing_parts

    # Two passes over the slices' candidates, one slice's in memory at a time.
    phrasings = cluster_phrasing_parts(lambda: iter_table(lake, CURATED, day, "phrasing_candidates.parquet"))
    # With the request ids its wordings came from (PHRASING_ARROW), so an erasure can match them.
    put_frame(lake, key(CURATED, day, "phrasings.parquet"), phrasings, PHRASING_ARROW)
    return {"day": day.isoformat(), "phrasings": len(phrasings)}


def mine_feedback(lake: Lake, day: dt.date, rules=None) -> dict:
    """Every curated slice of ``day`` through :func:`mine_slice`, then :func:`mine_day_phrasings`."""
    summary = _summed([mine_slice(lake, day, s, rules) for s in curated_slices(lake, day)], day)
    mine_day_phrasings(lake, day)
    return summary


def remine(lake: Lake, day: dt.date, run_time: dt.datetime, *, max_bad_fraction: float = 0.05,
           slice_rows: int = DEFAULT_SLICE_ROWS) -> dict:
    """Ingest, validate and mine an already processed ``day`` again, so feedback that arrived after
    its run counts (its selection and Label Studio tasks stay as they were). Slice after slice in
    one task: memory stays a slice's. A day never processed is left alone; one that now fails the
    quality gate keeps its curated tables as its own run left them."""
    from vloop.curate.quality import QualityGateError

    if not part_keys(lake, CURATED, day, "mined.parquet") and not lake.exists(key(CURATED, day, "mined.parquet")):
        return {"day": day.isoformat(), "remined": False, "why": "never processed"}
    ingested = ingest(lake, day, run_time, slice_rows)
    try:
        validate(lake, day, max_bad_fraction=max_bad_fraction)
    except QualityGateError as e:
        return {"day": day.isoformat(), "remined": False, "why": str(e)}
    return {**mine_feedback(lake, day), "remined": True, "feedback": ingested["feedback"]}


# -- 4. confidence --------------------------------------------------------------------------------
def score_confidence_slice(lake: Lake, day: dt.date, slice_no: int, load_model: Callable[[], object] | None = None,
                          batch_size: int = 32, grounding: bool = True, scoring_url: str | None = None) -> dict:
    """Confidence per interaction of one slice: as logged; else from the logged token logprobs;
    else the model re-scores the logged answer (teacher-forced, in batches). With a model
    (``load_model``) and ``grounding``, also each answer's image-text grounding
    (:mod:`vloop.curate.grounding`); without one, ``load_model`` is called only if some row needs
    re-scoring and grounding is left empty.

    With a scoring server (``scoring_url``; None reads ``VLOOP_SCORING_URL``, "" means none) the
    re-scoring and the grounding are asked of that vLLM instead, each row of the model version
    that answered it, and ``load_model`` is never called; a row the server cannot score gets no
    score and a logged reason (counted as ``unscored``), an unreachable server fails the step."""
    from vloop.vlm.model import Confidence, score_answers

    inter, _ = curated_slice(lake, day, slice_no)
    conf = inter["confidence"].astype("float64")
    source = pd.Series("logged", index=inter.index, dtype=object)
    source[conf.isna()] = "logprobs"
    has_lp = inter["token_logprobs"].map(lambda v: v is not None and len(v) > 0)
    from_lp = conf.isna() & has_lp
    conf[from_lp] = [Confidence.from_logprobs(v).geo_mean_prob for v in inter.loc[from_lp, "token_logprobs"]]
    todo = inter[conf.isna() & inter["image_key"].notna() & inter["answer"].notna()]
    answered = inter[inter["image_key"].notna() & inter["answer"].notna()]
    grounded = pd.Series(float("nan"), index=inter.index, dtype="float64")
    lm = remote = None
    from vloop.store.config import load_settings

    if scoring_url is None:
        scoring_url = load_settings().scoring_url
    if scoring_url and (len(todo) or (grounding and len(answered))):
        from vloop.curate.grounding import score_rows_on_server
        from vloop.vlm.scoring_client import ScoringClient

        t0 = time.perf_counter()
        with ScoringClient(scoring_url, api_key=load_settings().upstream_api_key) as client:
            remote = score_rows_on_server(client, lake, answered if grounding else todo, grounding=grounding)
        conf[todo.index] = [Confidence.from_logprobs(remote.logprobs[r]).geo_mean_prob if r in remote.logprobs
                            else np.nan for r in todo["request_id"]]
        source[todo.index] = "rescored"
        if grounding:
            grounded = inter["request_id"].map(remote.grounding).astype("float64")
        log.info("scored %d answers on %s in %.1fs (%d re-scored, %d not scorable)", len(remote.logprobs),
                 scoring_url, time.perf_counter() - t0, len(todo), len(remote.failed))
    elif len(todo) and not scoring_url:
        if load_model is None:
            raise RuntimeError(f"{len(todo)} interactions have neither confidence nor logprobs, and no model "
                               "was given to re-score them (set VLOOP_BASE_MODEL)")
        lm = load_model()
        t0 = time.perf_counter()
        for s in range(0, len(todo), batch_size):
            chunk = todo.iloc[s:s + batch_size]
            images = [lake.get_bytes(k) for k in chunk["image_key"]]
            scores = score_answers(lm, images, chunk["question"].tolist(), chunk["answer"].tolist(),
                                   batch_size=batch_size)
            conf[chunk.index] = [x.confidence.geo_mean_prob for x in scores]
            done = s + len(chunk)
            rate = done / (time.perf_counter() - t0)
            log.info("re-scored %d/%d (%.0f/s, eta %.0fs)", done, len(todo), rate, (len(todo) - done) / rate)
        source[todo.index] = "rescored"
    source[conf.isna()] = "missing"
    if not scoring_url and grounding and load_model is not None and len(answered):
        from vloop.curate.grounding import GroundingConfig, score_rows

        t0 = time.perf_counter()
        by_request = score_rows(lm or load_model(), lake, answered, GroundingConfig(batch_size=batch_size))
        grounded = inter["request_id"].map(by_request).astype("float64")
        log.info("grounding of %d answers in %.1fs", len(answered), time.perf_counter() - t0)
    out = pd.DataFrame({"request_id": inter["request_id"], "confidence": conf,
                        "confidence_source": source.astype("str"), "grounding": grounded})
    put_frame(lake, slice_key(CURATED, day, slice_no, "confidence.parquet"), out)  # no rows on an empty day
    return {"day": day.isoformat(), "slice": slice_no, "interactions": len(out),
            "grounded": int(out["grounding"].notna().sum()),
            **dict.fromkeys(("logged", "logprobs", "rescored", "missing"), 0),
            **{k: int(v) for k, v in out["confidence_source"].value_counts().items()},
            **({"scored_on": "server", "unscored": len(remote.failed) if remote else 0} if scoring_url else {})}


def base_model_loader(name_or_path: str | None) -> Callable[[], object] | None:
    """The ``load_model`` argument of :func:`score_confidence_slice` for the base model
    ``VLOOP_BASE_MODEL`` (None without one): the model is loaded once per process, so a worker
    that runs several slice tasks (``dag.test()``, a warm worker) pays the load once, not per slice.
    A model directory replaced on disk (its config's mtime changes) is loaded again."""
    if not name_or_path:
        return None
    from pathlib import Path

    config = Path(name_or_path) / "config.json"
    stamp = config.stat().st_mtime_ns if config.is_file() else None
    return functools.partial(_load_model_once, str(name_or_path), stamp)


@functools.lru_cache(maxsize=1)  # one model at a time: an 8B model twice would not fit a worker
def _load_model_once(name_or_path: str, stamp) -> object:
    from vloop.vlm.model import load_model

    return load_model(name_or_path)


def score_confidence(lake: Lake, day: dt.date, load_model: Callable[[], object] | None = None,
                     batch_size: int = 32, grounding: bool = True, scoring_url: str | None = None) -> dict:
    """Every curated slice of ``day`` through :func:`score_confidence_slice`, the model (when one is
    needed) loaded once for them all."""
    loader = functools.cache(load_model) if load_model is not None else None
    return _summed([score_confidence_slice(lake, day, s, loader, batch_size, grounding, scoring_url)
                    for s in curated_slices(lake, day)], day)


# -- 5. image quality -----------------------------------------------------------------------------
IMAGE_QUALITY_TYPES = {"image_key": "str", "poor": "bool", "flags": "str", "sharpness": "float64",
                       "brightness": "float64", "blown_out": "float64", "width": "int64", "height": "int64",
                       "niqe": "float64"}


def image_keys(interactions: pd.DataFrame) -> pd.DataFrame:
    """The distinct image keys of a slice's interactions with each one's hash (crc32), which
    decides the slot that checks it (:func:`check_images_slot`): hashed once here, in the slice's
    own step, not by every slot's task for every slice."""
    keys = interactions["image_key"].dropna().unique()
    return pd.DataFrame({"image_key": pd.Series(keys, dtype=object),
                         "key_hash": np.fromiter((zlib.crc32(k.encode()) for k in keys), np.int64, len(keys))})


def check_images_slot(lake: Lake, day: dt.date, slice_no: int, thresholds=None) -> dict:
    """Image quality of the day's images whose key hashes to slice ``slice_no``'s slot: slot i of
    the day's n slices checks the keys whose crc32 is i modulo n. The slices' key lists
    (:func:`image_keys`) are read one at a time, and each image is checked once."""
    from vloop.curate.imagequality import QualityThresholds

    thresholds = thresholds or QualityThresholds()
    slices = curated_slices(lake, day) or [slice_no]
    owner = np.asarray(slices)
    mine: set[str] = set()
    for s in slices:
        try:  # Arrow, not pandas: only this slot's keys become Python strings
            keys = lake.read_parquet(slice_key(CURATED, day, s, "image_keys.parquet"))
        except LakeKeyNotFound:  # a day curated before the key lists: from its interactions
            keys = pa.Table.from_pandas(image_keys(get_frame(
                lake, slice_key(CURATED, day, s, "interactions.parquet"), ["image_key"])), preserve_index=False)
        ours = owner[keys["key_hash"].to_numpy() % len(slices)] == slice_no
        mine.update(keys["image_key"].filter(pa.array(ours)).to_pylist())
    rows = []
    t0 = time.perf_counter()
    for i, (k, data) in enumerate(lake.get_many(sorted(mine)), 1):  # on S3, fetched a few ahead
        if data is None:  # erased since validation (vloop.privacy.erasure): nothing to check
            continue
        # NIQE on every photo, from a reduced decode (vloop.curate.imagequality.niqe_reduced).
        rows.append(image_check(lake, k, thresholds, data=data))
        if i % 2000 == 0:
            log.info("checked %d/%d images (%.0f/s)", i, len(mine), i / (time.perf_counter() - t0))
    out = pd.DataFrame(rows, columns=list(IMAGE_QUALITY_TYPES))
    if not len(out):  # no images: the same typed columns
        out = out.astype(IMAGE_QUALITY_TYPES)
    put_frame(lake, slice_key(CURATED, day, slice_no, "image_quality.parquet"), out)
    return {"day": day.isoformat(), "slice": slice_no, "images": len(out), "poor": int(out["poor"].sum())}


def image_check(lake: Lake, image_key: str, thresholds, with_niqe: bool = True, data: bytes | None = None) -> dict:
    """One image's row of ``image_quality.parquet`` (from ``data``, its bytes, when the caller has
    them), measured as shown (a JPEG's orientation tag applied). Intake checks a file's structure,
    not every byte of its compressed data: a photo no decoder reads is flagged ``unreadable``
    (poor: never sent to annotators or training), not the day's failure."""
    from PIL import Image, ImageOps

    from vloop.curate.imagequality import DEFAULT_MAX_NIQE, assess_pixels, flags_with_niqe, is_poor, niqe_reduced
    from vloop.store.images import EXIF_ORIENTATION

    score = float("nan")
    try:
        data = lake.get_bytes(image_key) if data is None else data
        with Image.open(io.BytesIO(data)) as img:
            jpeg = img.format == "JPEG"  # decoded again at a reduced scale for NIQE, cheaply
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            pixels = np.asarray(img.convert("L"))  # once, for both checks
            q = assess_pixels(pixels, thresholds, size=img.size)
            if with_niqe:
                score = niqe_reduced(data if jpeg else pixels)
    except (OSError, SyntaxError, ValueError) as e:
        log.warning("image %s cannot be decoded: %s", image_key, e)
        return {"image_key": image_key, "poor": True, "flags": "unreadable", "sharpness": float("nan"),
                "brightness": float("nan"), "blown_out": float("nan"), "width": 0, "height": 0, "niqe": score}
    flags = flags_with_niqe(q.flags, score, thresholds, default=DEFAULT_MAX_NIQE)
    return {"image_key": image_key, "poor": is_poor(flags, thresholds), "flags": ",".join(flags), "sharpness": q.sharpness,
            "brightness": q.brightness, "blown_out": q.blown_out, "width": q.width, "height": q.height,
            "niqe": score}


def check_images(lake: Lake, day: dt.date, thresholds=None) -> dict:
    """Every slice slot of ``day`` through :func:`check_images_slot`."""
    return _summed([check_images_slot(lake, day, s, thresholds) for s in curated_slices(lake, day)], day)


# -- 6. select ------------------------------------------------------------------------------------
def labelled_request_ids(lake: Lake, exclude: dt.date | None = None) -> set[str]:
    """Request ids already chosen for labelling (any day but ``exclude``) or labelled."""
    done = read_days(lake, LABELING, "selected.parquet", exclude=exclude)
    back = read_days(lake, LABELED, LABELED_FILE, exclude=exclude)
    return set(done.get("request_id", [])) | set(back.get("request_id", []))


def category_error_rates(lake: Lake, day: dt.date) -> dict[str, float]:
    """Share of interactions mined as bad per category over ``day`` and the HISTORY_DAYS before it,
    from the slices' ``mined_counts`` (or the whole ``mined.parquet`` of a day processed before)."""
    counts = []
    for d in _days_back(day, HISTORY_DAYS):
        try:
            counts.append(read_table(lake, CURATED, d, "mined_counts.parquet"))
        except LakeKeyNotFound:
            try:
                counts.append(mined_counts(get_frame(lake, key(CURATED, d, "mined.parquet"))))
            except LakeKeyNotFound:
                continue
    counts = [c for c in counts if len(c)]
    if not counts:  # no traffic today nor in the last HISTORY_DAYS days
        return {}
    total = pd.concat(counts).groupby("category")[["n", "bad"]].sum()
    return (total["bad"] / total["n"]).to_dict()


def select_for_labelling(lake: Lake, day: dt.date, cfg=None) -> dict:
    """The reduce that picks the day's items under one budget. It reads the day a slice at a time
    and keeps what the day's selection can still need (the best priority rows so far and the audit
    pool, :class:`vloop.curate.selection.SelectionPart`): each slice's contribution can only lose to
    better rows, so the result is the whole day's selection."""
    from vloop.privacy import excluded_users
    from vloop.curate.selection import SelectionConfig, finish_selection, merge_parts, select_part

    cfg = cfg or SelectionConfig()
    poor = read_table(lake, CURATED, day, "image_quality.parquet", ["image_key", "poor"])
    poor_images = set(poor.loc[poor["poor"], "image_key"])
    opted_out, already = excluded_users(lake), labelled_request_ids(lake, exclude=day)
    err = category_error_rates(lake, day)
    best, candidates = None, 0
    for _, folder in _slice_folders(lake, day):
        inter = get_frame(lake, folder + "interactions.parquet", LIGHT_COLUMNS)
        mined = get_frame(lake, folder + "mined.parquet")
        conf = get_frame(lake, folder + "confidence.parquet")
        cands = inter.drop(columns=["confidence"]).merge(
            conf[[c for c in ("request_id", "confidence", "grounding") if c in conf.columns]], on="request_id")
        candidates += len(cands)
        part = select_part(cands, mined, cfg=cfg, poor_images=poor_images, opted_out_users=opted_out,
                           already_labelled=already, category_error_rate=err, salt=day.isoformat())
        best = part if best is None else merge_parts([best, part], cfg)
    chosen = finish_selection([best], cfg).assign(selected_on=day.isoformat())
    put_frame(lake, key(LABELING, day, "selected.parquet"), chosen)
    return {"day": day.isoformat(), "candidates": candidates, "selected": len(chosen),
            "audit": int((chosen["pick"] == "audit").sum())}


# -- 7. push --------------------------------------------------------------------------------------
def model_version(row) -> str:
    """The name annotators see for the model that answered: the adapter's ``name@version``, or
    ``"base"`` (never ``base_model``, which is whatever path or hub id serving loaded)."""
    from vloop.curate.report import model_version_name

    return model_version_name(row.get("adapter"))


def image_flags_text(iq: pd.DataFrame) -> dict[str, str]:
    """What annotators read of the automatic image check, per image key: its flags and NIQE."""
    niqe = iq["niqe"] if "niqe" in iq.columns else pd.Series(float("nan"), index=iq.index)
    return {k: ", ".join([f for f in str(fl or "").split(",") if f] + ([f"NIQE {n:.1f}"] if pd.notna(n) else []))
            for k, fl, n in zip(iq.index, iq["flags"], niqe)}


def push_to_label_studio(lake: Lake, day: dt.date, ls, *, project_title: str,
                         document_root: str | None = None) -> dict:
    """Tasks for the day's selection, with the model's answer as a prediction; request ids the
    project already holds are skipped, so a re-run never duplicates a task."""
    from vloop.curate.labelstudio import image_reference, task_payload

    chosen = get_frame(lake, key(LABELING, day, "selected.parquet"))
    iq = read_table(lake, CURATED, day, "image_quality.parquet").set_index("image_key")
    # NIQE for what annotators will read, where the day's check has none (a day checked before
    # NIQE was on by default).
    need = [k for k in chosen["image_key"].dropna().unique()
            if k in iq.index and pd.isna(iq.at[k, "niqe"]) and "unreadable" not in str(iq.at[k, "flags"])]
    for k in need:
        iq.at[k, "niqe"] = image_check(lake, k, None, with_niqe=True)["niqe"]
    poor, flags = iq["poor"].to_dict(), image_flags_text(iq)
    project = ls.ensure_project(project_title)
    ls.ensure_storage(project, lake, document_root)
    tasks = [task_payload(r, image_reference(lake, r["image_key"], document_root), model_version(r),
                          poor_image=bool(poor.get(r["image_key"], False)), image_flags=flags.get(r["image_key"], ""))
             for r in chosen.to_dict("records")]
    t0 = time.perf_counter()
    res = ls.import_tasks(project, tasks)
    # What the lake keeps is the state (these request ids are tasks of that project), the same on
    # every re-run; how many this call sent goes to the task log.
    lake.put_json(key(LABELING, day, "pushed.json"), {
        "day": day.isoformat(), "label_studio": ls.url, "project": project,
        "request_ids": sorted(chosen["request_id"])})
    return {"day": day.isoformat(), "project": project, "selected": len(chosen), "sent": res.sent,
            "already_in_label_studio": res.already_there, "seconds": round(time.perf_counter() - t0, 2)}


# -- 8. pull --------------------------------------------------------------------------------------
def pull_annotations(lake: Lake, day: dt.date, ls, *, project_title: str) -> dict:
    """Every finished annotation not already pulled on another day goes to ``labeled/dt=D/``."""
    from vloop.curate.labelstudio import LABELED_COLUMNS

    from vloop.privacy import erased_request_hashes, read_tombstones, request_hash

    project = ls.ensure_project(project_title)
    finished = ls.finished_annotations(project)
    # An erased user's task still in Label Studio (an erasure that could not reach it) is not
    # pulled back into the lake.
    erased = finished["request_id"].map(request_hash).isin(erased_request_hashes(lake)) | \
        finished["user_key"].isin(read_tombstones(lake))
    finished = finished[~erased]
    earlier = read_days(lake, LABELED, LABELED_FILE, exclude=day)
    new = finished[~finished["request_id"].isin(set(earlier.get("request_id", [])))]
    put_frame(lake, key(LABELED, day, LABELED_FILE), new[LABELED_COLUMNS].reset_index(drop=True))
    return {"day": day.isoformat(), "finished_in_label_studio": len(finished), "new": len(new),
            **{f"verdict_{k}": int(v) for k, v in new["verdict"].value_counts().items()}}


def _experiment(lake: Lake, day: dt.date, summary: dict) -> str | None:
    """The canary experiments' looks up to the end of ``day`` (plot), and the newest in words."""
    from vloop.release.canary import looks
    from vloop.curate.report import experiment_plot

    lk = looks(lake)
    if not len(lk):
        return None
    at = pd.to_datetime(lk["at"], utc=True)
    end = pd.Timestamp(day + dt.timedelta(days=1), tz="UTC")
    lk = lk[(at < end) & (at >= end - pd.Timedelta(days=HISTORY_DAYS))]
    if not len(lk):
        return None
    last = lk.sort_values("at").iloc[-1]
    summary["experiment"] = (f"{last['experiment']} at {last['canary_share']:.0%}: last look {last['at']} "
                             f"decided {last['action']}")
    return experiment_plot(lk)


# -- 9. report ------------------------------------------------------------------------------------
def _slice_folders(lake: Lake, day: dt.date) -> list[tuple[int, str]]:
    """(slice number, folder) of each curated slice of ``day`` (the hours of a day processed by the
    hour; the day itself, as slice 0, for a day processed before the pipeline was mapped)."""
    parts = part_keys(lake, CURATED, day, "interactions.parquet")
    if parts:
        return [(s, k.rsplit("/", 1)[0] + "/") for s, k in sorted(parts.items())]
    if lake.exists(key(CURATED, day, "interactions.parquet")):
        return [(0, partition_prefix(CURATED, day))]
    raise LakeKeyNotFound(f"{partition_prefix(CURATED, day)}slice=*/interactions.parquet (did the gate pass?)")


def _with_app(lake: Lake, k: str, columns: list[str]) -> pd.DataFrame:
    """``columns`` and ``app`` of a curated interactions file, in one read; a file from before the
    ``app`` column counts as no app."""
    from vloop.store.lake import LakeError

    try:
        return get_frame(lake, k, [*columns, "app"])
    except LakeError:  # no app column: written before it existed
        return get_frame(lake, k, columns).assign(app=None)


def app_metrics(lake: Lake, day: dt.date, mined: pd.DataFrame) -> pd.DataFrame:
    """Per app (the API key's name, VLOOP_API_KEYS): requests and the shares accepted, edited and
    negative (mined). Two columns of the curated interactions, a slice at a time; a file from
    before the ``app`` column counts as no app. Empty when no request of the day named an app."""
    from vloop.curate.report import app_part, apps_from, merge_sums

    total: dict = {}
    try:
        folders = _slice_folders(lake, day)
    except LakeKeyNotFound:
        folders = []
    for _, folder in folders:
        merge_sums(total, app_part(_with_app(lake, folder + "interactions.parquet", ["request_id"]), mined))
    return apps_from(total)


def image_summary(lake: Lake, day: dt.date) -> str | None:
    """The day's image check in words for the report: photos checked, poor, flagged distorted by
    NIQE, and the median NIQE; None when the day has no image check."""
    try:
        iq = read_table(lake, CURATED, day, "image_quality.parquet", ["poor", "flags", "niqe"])
    except LakeKeyNotFound:
        return None
    if not len(iq):
        return None
    distorted = int(iq["flags"].fillna("").astype("str").str.contains(r"(?:^|,)distorted(?:,|$)").sum())
    median = iq["niqe"].median()
    return (f"{len(iq)} checked, {int(iq['poor'].sum())} poor, {distorted} distorted (NIQE)"
            + (f", median NIQE {median:.1f}" if pd.notna(median) else ""))


REPORT_PART = "report_part.json"  # a slice's counts for the report (vloop.curate.report.slice_part)
EDIT_ERRORS = "edit_errors.parquet"  # a slice's user edits with their error types, before the verdicts


def _slice_rows(lake: Lake, folder: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A curated slice's interactions (:data:`LIGHT_COLUMNS`), feedback and request_id/app pairs,
    from one read of its interactions."""
    inter = _with_app(lake, folder + "interactions.parquet", LIGHT_COLUMNS)
    return inter.drop(columns=["app"]), get_frame(lake, folder + "feedback.parquet"), inter[["request_id", "app"]]


def _slice_tables(lake: Lake, folder: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A curated slice's interactions, feedback, mined labels and request_id/app pairs."""
    inter, fb, apps = _slice_rows(lake, folder)
    return inter, fb, get_frame(lake, folder + "mined.parquet"), apps


def report_part_of(lake: Lake, folder: str) -> tuple[dict, pd.DataFrame]:
    """:func:`vloop.curate.report.slice_part` of the curated slice in ``folder``, from its tables."""
    from vloop.curate.report import slice_part

    return slice_part(*_slice_tables(lake, folder))


def report_counts_of(lake: Lake, folder: str) -> dict:
    """:func:`vloop.curate.report.slice_counts` of the curated slice in ``folder`` (no error types)."""
    from vloop.curate.report import slice_counts

    return slice_counts(*_slice_tables(lake, folder))


def write_report_part(lake: Lake, folder: str, part: dict, edit_errors: pd.DataFrame) -> None:
    """A curated slice's share of the day's report, stored beside it (``folder``)."""
    put_frame(lake, folder + EDIT_ERRORS, edit_errors)
    lake.put_json(folder + REPORT_PART, part)


def report(lake: Lake, day: dt.date) -> dict:
    """Metrics, top errors and the HTML page for ``day``: a reduce that reads the day a slice at a
    time and folds each into partial aggregates (:class:`vloop.curate.report.DayReport`), so its
    memory follows a slice, not the day; the day's erroneous answers go to
    ``reports/dt=D/slice=NNN/errors.parquet`` as they come. A day without interactions is reported
    as such (``summary["traffic"] == "no traffic"``), with empty tables, not as an error."""
    from vloop.curate.report import NO_TRAFFIC, AnswerQualityConfig, DayReport, plots, render_html, selection_hit_rates

    try:
        labels = get_frame(lake, key(LABELED, day, LABELED_FILE))
    except LakeKeyNotFound:  # the pull did not run (no Label Studio configured)
        labels = pd.DataFrame()
    day_report = DayReport(labels if len(labels) else None)
    written = set()
    for s, folder in _slice_folders(lake, day):
        try:  # the slice's part, from its mine task
            part = lake.get_json(folder + REPORT_PART)
            edit_errors = get_frame(lake, folder + EDIT_ERRORS)
        except LakeKeyNotFound:  # a slice mined before the parts: made here, and kept
            part, edit_errors = report_part_of(lake, folder)
            write_report_part(lake, folder, part, edit_errors)
        conf = get_frame(lake, folder + "interactions.parquet", ["request_id", "adapter", "arm", "latency_ms"]).merge(
            get_frame(lake, folder + "confidence.parquet", ["request_id", "confidence"]), on="request_id", how="left")
        mined = get_frame(lake, folder + "mined.parquet", ["request_id", "weak_label"]) if day_report.needs_answers \
            else None
        errors = day_report.add_part(part, edit_errors, conf, mined)
        put_frame(lake, slice_key(REPORTS, day, s, "errors.parquet"), errors)
        written.add(slice_key(REPORTS, day, s, "errors.parquet"))
    for k in lake.list(partition_prefix(REPORTS, day)):  # a re-run with fewer slices, or from before slices
        if (k.endswith("/errors.parquet") and k not in written) or k == key(REPORTS, day, "errors.parquet"):
            lake.delete(k)
    metrics = day_report.metrics()
    metrics.insert(0, "dt", day.isoformat())
    top = day_report.top_error_categories()
    put_frame(lake, key(REPORTS, day, "metrics.parquet"), metrics)
    put_frame(lake, key(REPORTS, day, "top_errors.parquet"), top)
    # Error types, edit length per category against its previous 7 days, phrases users delete.
    earlier = _days_back(day - dt.timedelta(days=1), AnswerQualityConfig.trend_days)
    # The grounding of the judged answers, from the confidence step of the days they were chosen.
    judged_on = sorted(set(labels["selected_on"].dropna())) if "selected_on" in labels.columns else []
    scored = read_days(lake, CURATED, "confidence.parquet", days=judged_on)
    grounding = dict(zip(scored["request_id"], scored["grounding"])) if "grounding" in scored.columns else {}
    quality = day_report.answer_quality(read_days(lake, REPORTS, "edit_length.parquet", days=earlier),
                                        grounding=grounding)
    recent = _days_back(day, HISTORY_DAYS)
    quality["selection"] = selection_hit_rates(read_days(lake, LABELING, "selected.parquet", days=recent),
                                               read_days(lake, LABELED, LABELED_FILE, days=recent))
    for name, table in quality.items():
        put_frame(lake, key(REPORTS, day, f"{name}.parquet"), table)
    apps = day_report.apps()
    if len(apps):  # only deployments with API keys name apps
        put_frame(lake, key(REPORTS, day, "apps.parquet"), apps)
    history = read_days(lake, REPORTS, "metrics.parquet", days=_days_back(day, HISTORY_DAYS))
    validation = lake.get_json(key(QUARANTINE, day, "validation.json"))
    summary = {
        "day": day.isoformat(), "interactions": day_report.interactions, "feedback events": day_report.feedback,
        "quarantined": validation["quarantined_interactions"] + validation["quarantined_feedback"],
        "labels pulled": len(labels),
    }
    if len(apps):
        summary["apps"] = "; ".join(f"{r.app}: {r.requests} requests, {r.edited:.0%} edited, {r.accepted:.0%} "
                                    f"accepted" for r in apps.itertuples())
    photos = image_summary(lake, day)
    if photos:
        summary["photos"] = photos
    if not validation["interactions"]:  # a normal day (a deployment's first night): empty tables, a note
        summary["traffic"] = NO_TRAFFIC
    for name in ("selected.parquet", "pushed.json"):
        k = key(LABELING, day, name)
        if lake.exists(k):
            summary[name.split(".")[0]] = (len(get_frame(lake, k)) if name.endswith(".parquet")
                                           else len(lake.get_json(k)["request_ids"]))
    images = plots(history, day_report.confidence, labels)
    images["experiment"] = _experiment(lake, day, summary)
    page = render_html(day.isoformat(), metrics, top, summary, images, quality)
    lake.put_bytes(key(REPORTS, day, "index.html"), page.encode(), "text/html")
    return summary
