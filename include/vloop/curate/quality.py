"""Data quality of a day's interactions: a Great Expectations suite, per-row quarantine.

The suite is code (versioned with the project, ``SUITE_NAME``), built over the columns of the
interaction record plus a few derived ones (``question_len``, ``max_logprob``, ``image_present``).
:func:`validate_interactions` runs it on a pandas batch and splits the rows: every row that
breaks an expectation goes to quarantine with the reasons it broke, nothing is dropped silently,
and the run fails when the bad fraction is over the threshold.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vloop.store.frames import member
from vloop.store.schema import ARMS, FEEDBACK_TYPES, STATUSES

SUITE_NAME = "vloop_interactions_v1"
FEEDBACK_SUITE_NAME = "vloop_feedback_v1"


class QualityGateError(RuntimeError):
    """Too large a share of the batch failed validation; nothing downstream should run."""


@dataclass
class QualityConfig:
    max_bad_fraction: float = 0.05
    max_question_chars: int = 2000
    max_answer_chars: int = 4000
    max_latency_ms: float = 600_000


@dataclass
class ValidationOutcome:
    good: pd.DataFrame
    quarantined: pd.DataFrame  # the bad rows plus a "quarantine_reason" column
    bad_fraction: float
    result: dict  # the Great Expectations validation result, JSON-ready


def interval_parameters(start: dt.datetime, end: dt.datetime) -> dict[str, float]:
    """The suite parameters of the interval [start, end) a batch's timestamps must fall in."""
    return {"start_s": start.timestamp(), "end_s": end.timestamp() - 1e-6}


def expectations(cfg: QualityConfig):
    """The suite: (expectation, human-readable reason) pairs. The interval's bounds are suite
    parameters (:func:`interval_parameters`), so one suite serves every day."""
    import great_expectations as gx

    E = gx.expectations
    return [
        (E.ExpectColumnValuesToNotBeNull(column="request_id"), "request_id missing"),
        (E.ExpectColumnValuesToBeUnique(column="request_id"), "request_id not unique"),
        (E.ExpectColumnValuesToNotBeNull(column="user_key"), "user_key missing"),
        (E.ExpectColumnValuesToNotBeNull(column="question"), "question missing"),
        (E.ExpectColumnValuesToBeBetween(column="question_len", min_value=1, max_value=cfg.max_question_chars),
         "question empty or too long"),
        (E.ExpectColumnValuesToBeBetween(column="answer_len", min_value=0, max_value=cfg.max_answer_chars),
         "answer too long"),
        (E.ExpectColumnValuesToBeBetween(column="ts_epoch_s", min_value={"$PARAMETER": "start_s"},
                                         max_value={"$PARAMETER": "end_s"}), "timestamp outside the interval"),
        (E.ExpectColumnValuesToBeBetween(column="latency_ms", min_value=0, max_value=cfg.max_latency_ms),
         "latency out of range"),
        (E.ExpectColumnValuesToBeBetween(column="confidence", min_value=0, max_value=1), "confidence out of [0, 1]"),
        (E.ExpectColumnValuesToBeBetween(column="max_logprob", max_value=0), "a token logprob above 0"),
        (E.ExpectColumnValuesToBeInSet(column="arm", value_set=list(ARMS)), "unknown arm"),
        (E.ExpectColumnValuesToBeInSet(column="status", value_set=list(STATUSES)), "unknown status"),
        (E.ExpectColumnValuesToBeInSet(column="image_present", value_set=[True]), "image object missing"),
    ]


def max_per_list(lists: pd.Series) -> np.ndarray:
    """The largest element of each list (NaN for an empty or missing one; NaN elements skipped),
    vectorised: the elements are flattened once and reduced row by row (``fmax.reduceat``)."""
    values = lists.to_numpy(dtype=object)
    lengths = np.fromiter((len(v) if isinstance(v, (list, tuple, np.ndarray)) else 0 for v in values),
                          np.int64, len(values))
    out = np.full(len(values), np.nan)
    rows = np.flatnonzero(lengths)
    if len(rows):
        flat = np.concatenate([values[i] for i in rows]).astype(float)
        out[rows] = np.fmax.reduceat(flat, np.concatenate([[0], np.cumsum(lengths[rows])[:-1]]))
    return out


def derived_columns(df: pd.DataFrame, lake=None) -> pd.DataFrame:
    """Columns the suite checks that are not stored as such. Numeric ones are plain float64:
    Great Expectations checks ranges vectorised only on numpy dtypes, row by row otherwise."""
    out = df.copy()
    out["question_len"] = out["question"].fillna("").str.len().astype("float64")
    out["answer_len"] = out["answer"].fillna("").str.len().astype("float64")
    out["ts_epoch_s"] = (pd.to_datetime(out["ts"], utc=True).dt.as_unit("us").astype("int64") / 1e6
                         if len(out) else pd.Series(dtype=float))
    out["max_logprob"] = max_per_list(out["token_logprobs"])
    for c in ("latency_ms", "confidence"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("float64")
    if lake is not None:
        keys = out["image_key"].dropna().unique()
        there = lake.existing(keys)
        out["image_present"] = out["image_key"].isna() | member(out["image_key"], there)
    else:
        out["image_present"] = True
    return out


def feedback_expectations(cfg: QualityConfig):
    """The feedback-event suite: (expectation, reason) pairs."""
    import great_expectations as gx

    E = gx.expectations
    return [
        (E.ExpectColumnValuesToNotBeNull(column="event_id"), "event_id missing"),
        (E.ExpectColumnValuesToBeUnique(column="event_id"), "event_id not unique"),
        (E.ExpectColumnValuesToNotBeNull(column="request_id"), "request_id missing"),
        (E.ExpectColumnValuesToBeInSet(column="type", value_set=list(FEEDBACK_TYPES)), "unknown feedback type"),
        (E.ExpectColumnValuesToBeBetween(column="edited_len", min_value=0, max_value=cfg.max_answer_chars),
         "edited text too long"),
        (E.ExpectColumnValuesToBeBetween(column="dwell_ms", min_value=0), "negative dwell"),
        (E.ExpectColumnValuesToBeBetween(column="rating", min_value=1, max_value=5), "rating outside 1-5"),
    ]


@dataclass(frozen=True)
class _Validation:
    context: object  # the Great Expectations context that holds it
    definition: object  # its ValidationDefinition
    columns: list[str]  # the columns the suite looks at
    reasons: dict  # (expectation type, column) -> reason


@functools.lru_cache(maxsize=4)
def _validations(limits: tuple) -> dict[str, _Validation]:
    """Both suites and their validation definitions in one ephemeral Great Expectations context,
    built once per process and per set of limits (``QualityConfig`` but its gate threshold).
    Building them cost ~45 ms a call, two calls a slice task."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    cfg = QualityConfig(0.0, *limits)
    ctx = gx.get_context(mode="ephemeral")
    # Task logs and the demo get a line per step, not a progress bar per metric.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("vloop")
    out = {}
    for name, suite in ((SUITE_NAME, expectations(cfg)), (FEEDBACK_SUITE_NAME, feedback_expectations(cfg))):
        asset = source.add_dataframe_asset(name)
        gx_suite = ctx.suites.add(gx.ExpectationSuite(name=name))
        for exp, _ in suite:
            gx_suite.add_expectation(exp)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(
            name=name, data=asset.add_batch_definition_whole_dataframe("day"), suite=gx_suite))
        out[name] = _Validation(ctx, vd, sorted({exp.column for exp, _ in suite}),
                                {(exp.expectation_type, exp.column): reason for exp, reason in suite})
    return out


def _run_suite(df: pd.DataFrame, batch: pd.DataFrame, suite_name: str, cfg: QualityConfig,
               parameters: dict | None = None) -> ValidationOutcome:
    """Validate ``batch`` (``df`` plus derived columns, same index) and split ``df`` by the result."""
    v = _validations((cfg.max_question_chars, cfg.max_answer_chars, cfg.max_latency_ms))[suite_name]
    # Only the columns the suite looks at: GE fingerprints (pickles) the whole batch it is given.
    res = v.definition.run(batch_parameters={"dataframe": batch[v.columns]}, expectation_parameters=parameters,
                           result_format={"result_format": "COMPLETE"})
    # The context keeps every result it ran in memory: dropped, or a long-lived process piles them up.
    store = v.context.validation_results_store
    for k in store.list_keys():
        store.remove_key(k)
    reasons: dict[int, list[str]] = {}
    for r in res.results:
        if r.success:
            continue
        reason = v.reasons[(r.expectation_config.type, r.expectation_config.kwargs.get("column"))]
        for i in r.result.get("unexpected_index_list") or []:
            reasons.setdefault(int(i), []).append(reason)
    bad_idx = sorted(reasons)
    quarantined = df.iloc[bad_idx].copy()
    # dtype "str" so a batch without bad rows (or without rows: a day without traffic) stores a string column
    quarantined["quarantine_reason"] = pd.Series(["; ".join(reasons[i]) for i in bad_idx], index=quarantined.index,
                                                 dtype="str")
    good = df.drop(index=bad_idx).reset_index(drop=True)
    bad_fraction = len(bad_idx) / len(df) if len(df) else 0.0
    return ValidationOutcome(good, quarantined.reset_index(drop=True), bad_fraction, _stable(res.to_json_dict()))


def _stable(result: dict) -> dict:
    """The validation result without its per-run ids and clock readings, so validating the same
    batch twice stores the same JSON (re-running a day changes nothing)."""
    result.pop("id", None)
    meta = result.get("meta", {})
    for k in ("run_id", "validation_id", "validation_time"):
        meta.pop(k, None)
    meta.get("batch_markers", {}).pop("ge_load_time", None)
    for r in result.get("results", []):
        r.get("expectation_config", {}).pop("id", None)
    return result


def validate_interactions(df: pd.DataFrame, start: dt.datetime, end: dt.datetime, *, lake=None,
                          cfg: QualityConfig | None = None) -> ValidationOutcome:
    """Run the suite on ``df`` (interaction rows of the interval [start, end)) and split it."""
    cfg = cfg or QualityConfig()
    df = df.reset_index(drop=True)
    return _run_suite(df, derived_columns(df, lake), SUITE_NAME, cfg, interval_parameters(start, end))


def validate_feedback(df: pd.DataFrame, cfg: QualityConfig | None = None) -> ValidationOutcome:
    """Run the feedback suite on ``df`` (events already joined to the day's interactions)."""
    cfg = cfg or QualityConfig()
    df = df.reset_index(drop=True)
    batch = df.assign(edited_len=df["edited_text"].fillna("").str.len().astype("float64"),
                      dwell_ms=pd.to_numeric(df["dwell_ms"], errors="coerce").astype("float64"),
                      rating=pd.to_numeric(df["rating"], errors="coerce").astype("float64"))
    return _run_suite(df, batch, FEEDBACK_SUITE_NAME, cfg)


def check_gate(outcome: ValidationOutcome, cfg: QualityConfig | None = None) -> None:
    cfg = cfg or QualityConfig()
    if outcome.bad_fraction > cfg.max_bad_fraction:
        raise QualityGateError(f"{outcome.bad_fraction:.1%} of the rows failed validation, over the "
                               f"threshold of {cfg.max_bad_fraction:.1%}; see quarantine/")
