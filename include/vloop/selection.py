"""Pick the interactions most worth an annotator's time, under a daily budget.

Priority adds up four signals (weights in :class:`SelectionConfig`):

* low confidence — ``(threshold - confidence) / threshold`` when below ``low_confidence``;
* negative implicit feedback — the mined weight of a ``negative``/``weak_negative`` label;
* the category's recent error rate (share of negative labels in the category);
* weak grounding of an *accepted* answer — ``w_grounding`` when its grounding score
  (:mod:`vloop.grounding`: how much more likely the image made the answer than a blank one) is
  below ``low_grounding``. Users accept answers that sound right; one the model would have given
  without looking at the photo is worth a person's check although nobody complained.

Excluded: opted-out users, already-labelled requests, poor images, and near-duplicates — the same
image (by content hash) with the same normalised question keeps only its highest-priority copy.
Each chosen row says why it was chosen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vloop.frames import member


@dataclass
class SelectionConfig:
    budget: int = 200
    low_confidence: float = 0.6
    w_confidence: float = 1.0
    w_feedback: float = 1.0
    w_category: float = 0.5
    low_grounding: float = 0.0  # log-probability (nats): the image made the answer no more likely
    w_grounding: float = 0.8


def normalise_question(q: str) -> str:
    return re.sub(r"[\s\W_]+", " ", (q or "").lower()).strip()


def select(candidates: pd.DataFrame, mined: pd.DataFrame, *, cfg: SelectionConfig | None = None,
           poor_images: set[str] = frozenset(), opted_out_users: set[str] = frozenset(),
           already_labelled: set[str] = frozenset(), category_error_rate: dict[str, float] | None = None
           ) -> pd.DataFrame:
    """The chosen rows of ``candidates`` (interaction columns), highest priority first, with
    ``priority`` and ``why`` columns."""
    cfg = cfg or SelectionConfig()
    df = candidates.merge(mined[["request_id", "weak_label", "weight"]], on="request_id", how="left")
    # Opted-out and erased users never reach a person; nor does a row without a user key, which
    # cannot be checked against them (fail closed).
    # (astype: on a day without traffic the map of an empty string column is not boolean)
    known = df["user_key"].map(lambda k: isinstance(k, str) and bool(k)).astype(bool)
    df = df[known & ~member(df["user_key"], opted_out_users) & ~member(df["request_id"], already_labelled)]
    df = df[~df["image_key"].isin(poor_images) | df["image_key"].isna()]
    if category_error_rate is None:  # from today's labels when no history is given
        neg = df.assign(bad=df["weak_label"].isin(["negative", "weak_negative"]))
        category_error_rate = neg.groupby("category")["bad"].mean().to_dict() if len(neg) else {}
    neg = df["weak_label"].isin(["negative", "weak_negative"]).to_numpy()
    conf = pd.to_numeric(df["confidence"], errors="coerce").to_numpy(dtype=float)
    low = np.nan_to_num(conf, nan=np.inf) < cfg.low_confidence
    err = df["category"].map(category_error_rate).fillna(0.0).to_numpy(dtype=float)
    grounding = pd.to_numeric(df["grounding"], errors="coerce").to_numpy(dtype=float) if "grounding" in df.columns \
        else np.full(len(df), np.nan)
    weak = (df["weak_label"] == "positive").to_numpy(dtype=bool) & (np.nan_to_num(grounding, nan=np.inf)
                                                                   < cfg.low_grounding)
    priority = (np.where(low, cfg.w_confidence * (cfg.low_confidence - np.nan_to_num(conf)) / cfg.low_confidence, 0)
                + np.where(neg, cfg.w_feedback * df["weight"].fillna(0).to_numpy(dtype=float), 0)
                + np.where(weak, cfg.w_grounding, 0)
                + cfg.w_category * err)
    df = _best(df.assign(priority=priority), cfg.budget)
    df["why"] = pd.Series([_why(r, cfg, category_error_rate) for r in df.itertuples(index=False)], index=df.index,
                          dtype="str")  # typed even when nothing is chosen (a day without traffic)
    return df.drop(columns=["weak_label", "weight"]).reset_index(drop=True)


def _best(df: pd.DataFrame, budget: int) -> pd.DataFrame:
    """The ``budget`` rows of highest priority (ties: request id), near-duplicates dropped."""
    df = df[df["priority"] > 0].sort_values(["priority", "request_id"], ascending=[False, True])
    dup_key = df["image_sha256"].fillna("") + "|" + df["question"].map(normalise_question)
    return df[~dup_key.duplicated()].head(budget)


def merge_selected(parts: list[pd.DataFrame], budget: int) -> pd.DataFrame:
    """One selection from the selections of parts of a day (each :func:`select` ed with the same
    config and day-wide inputs). The same as selecting over the whole day: a row of the day's
    selection is the best copy of its image + question anywhere, so its part kept it, and fewer
    than ``budget`` distinct better rows exist in its part, so its part's cut kept it too."""
    parts = [p for p in parts if len(p)] or parts[:1]
    return _best(pd.concat(parts, ignore_index=True), budget).reset_index(drop=True)


def _why(r, cfg: SelectionConfig, category_error_rate: dict) -> str:
    """Why a chosen row was chosen, in words (only built for the few rows chosen)."""
    why = []
    if r.confidence is not None and not pd.isna(r.confidence) and r.confidence < cfg.low_confidence:
        why.append(f"low confidence {r.confidence:.2f}")
    if r.weak_label in ("negative", "weak_negative"):
        why.append(f"{r.weak_label.replace('_', ' ')} feedback")
    g = getattr(r, "grounding", None)
    if r.weak_label == "positive" and g is not None and not pd.isna(g) and g < cfg.low_grounding:
        why.append(f"accepted but weakly grounded in the image ({g:+.2f})")
    err = category_error_rate.get(r.category, 0.0) if r.category else 0.0
    if err:
        why.append(f"category {r.category} error rate {err:.0%}")
    return "; ".join(why)
