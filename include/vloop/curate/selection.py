"""Pick the interactions most worth an annotator's time, under a daily budget.

Priority adds up four signals (weights in :class:`SelectionConfig`):

* low confidence — ``(threshold - confidence) / threshold`` when below ``low_confidence``;
* negative implicit feedback — the mined weight of a ``negative``/``weak_negative`` label;
* the category's recent error rate (share of negative labels in the category);
* weak grounding of an *accepted* answer — ``w_grounding`` when its grounding score
  (:mod:`vloop.curate.grounding`: how much more likely the image made the answer than a blank one) is
  below ``low_grounding``. Users accept answers that sound right; one the model would have given
  without looking at the photo is worth a person's check although nobody complained.

Excluded: opted-out users, already-labelled requests, poor images, and near-duplicates — the same
image (by content hash) with the same normalised question keeps only its highest-priority copy.
Each chosen row says why it was chosen, and whether priority or the audit picked it (``pick``).

The **audit**: ``audit_share`` of the budget goes to a uniform random sample of the eligible rows
(the smallest values of a salted hash of the request id: a uniform sample that parts of a day can
pick independently and merge exactly), drawn from every eligible row, priority picks included. What annotators find in it is the day's base rate of wrong
answers — what a random pick would have found — so the daily report can show whether the priority
picks are worth it (their hit rate against the base rate), in production, not only in simulation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vloop.store.frames import member


@dataclass
class SelectionConfig:
    budget: int = 200
    low_confidence: float = 0.6
    w_confidence: float = 1.0
    w_feedback: float = 1.0
    w_category: float = 0.5
    low_grounding: float = 0.0  # log-probability (nats): the image made the answer no more likely
    w_grounding: float = 0.8
    audit_share: float = 0.1  # of the budget: a uniform random sample (the base rate; see the module doc)

    @property
    def audit_budget(self) -> int:
        return int(round(self.budget * self.audit_share))

    @property
    def priority_budget(self) -> int:
        return self.budget - self.audit_budget


AUDIT_WHY = "random audit (measures the day's base rate)"


def normalise_question(q: str) -> str:
    return re.sub(r"[\s\W_]+", " ", (q or "").lower()).strip()


def select(candidates: pd.DataFrame, mined: pd.DataFrame, *, cfg: SelectionConfig | None = None,
           poor_images: set[str] = frozenset(), opted_out_users: set[str] = frozenset(),
           already_labelled: set[str] = frozenset(), category_error_rate: dict[str, float] | None = None,
           salt: str = "") -> pd.DataFrame:
    """The chosen rows of ``candidates`` (interaction columns): the priority picks, highest first,
    then the audit sample, with ``priority``, ``pick`` (priority / audit), ``why`` and the mined
    ``weak_label`` columns.
    ``salt`` (the day) seeds the audit sample."""
    cfg = cfg or SelectionConfig()
    part = select_part(candidates, mined, cfg=cfg, poor_images=poor_images, opted_out_users=opted_out_users,
                       already_labelled=already_labelled, category_error_rate=category_error_rate, salt=salt)
    return finish_selection([part], cfg)


@dataclass
class SelectionPart:
    """What one part of a day (an hour) contributes to the day's selection: its best priority
    rows and its audit pool (its ``budget`` smallest-hash eligible rows). Parts merge exactly
    (:func:`merge_parts`): memory stays at a few budgets' rows, however large the day."""
    priority: pd.DataFrame
    pool: pd.DataFrame
    category_error_rate: dict


def select_part(candidates: pd.DataFrame, mined: pd.DataFrame, *, cfg: SelectionConfig,
                poor_images: set[str] = frozenset(), opted_out_users: set[str] = frozenset(),
                already_labelled: set[str] = frozenset(), category_error_rate: dict[str, float] | None = None,
                salt: str = "") -> SelectionPart:
    # Ranked on the few columns the ranking reads; the candidates' other columns (answers, model,
    # timings...) are taken only for the rows a part keeps, a few budgets' worth: copying every
    # column through the filters cost most of the select reduce on a big day.
    narrow = candidates[[c for c in RANKING_COLUMNS if c in candidates.columns]].assign(_row=np.arange(len(candidates)))
    df = narrow.merge(mined[["request_id", "weak_label", "weight"]], on="request_id", how="left")
    # Opted-out and erased users never reach a person; nor does a row without a user key, which
    # cannot be checked against them (fail closed).
    # (astype: on a day without traffic the map of an empty string column is not boolean)
    known = df["user_key"].notna() & df["user_key"].fillna("").astype("str").str.len().gt(0)
    df = df[known & ~member(df["user_key"], opted_out_users) & ~member(df["request_id"], already_labelled)]
    df = df[~member(df["image_key"], poor_images) | df["image_key"].isna().to_numpy()]
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
    df = df.assign(priority=priority, _audit_key=audit_keys(df["request_id"], salt))
    # The audit pool keeps ``budget`` rows, not ``audit_budget``: the day's priority picks (at most
    # ``priority_budget``) are taken out of it before the audit is drawn.
    pool = df.nsmallest(cfg.budget if cfg.audit_budget else 0, "_audit_key")
    # Priority keeps up to the whole budget: slots the audit does not use (a draw that is a
    # priority pick is labelled once) go to the next priority rows.
    return SelectionPart(_widened(candidates, _best(df, cfg.budget)), _widened(candidates, pool), category_error_rate)


# What the ranking reads of a candidate (the user and photo checks, priority, near-duplicates).
RANKING_COLUMNS = ["request_id", "user_key", "image_key", "image_sha256", "question", "category", "confidence",
                   "grounding"]


def _widened(candidates: pd.DataFrame, ranked: pd.DataFrame) -> pd.DataFrame:
    """The ``candidates`` rows ``ranked`` kept (by its ``_row``), every column, with what ranking
    them added (as one wide merge would give them, in the same order and index)."""
    wide = candidates.iloc[ranked["_row"].to_numpy()].set_axis(ranked.index)
    return wide.assign(**{c: ranked[c] for c in ("weak_label", "weight", "priority", "_audit_key")})


def merge_parts(parts: list[SelectionPart], cfg: SelectionConfig) -> SelectionPart:
    """One part from several (the same as selecting over their rows at once)."""
    prio = [p.priority for p in parts if len(p.priority)] or [parts[0].priority]
    pool = [p.pool for p in parts if len(p.pool)] or [parts[0].pool]
    return SelectionPart(_best(pd.concat(prio, ignore_index=True), cfg.budget),
                         pd.concat(pool, ignore_index=True).nsmallest(cfg.budget if cfg.audit_budget else 0,
                                                                      "_audit_key"),
                         parts[0].category_error_rate)


def finish_selection(parts: list[SelectionPart], cfg: SelectionConfig) -> pd.DataFrame:
    """The day's selection from its parts: priority picks, then the audit sample drawn from all
    eligible rows — priority picks included, or the audit would miss exactly the errors priority
    found and under-state the base rate. A row both picked is labelled once, ``pick`` "both"."""
    part = merge_parts(parts, cfg) if len(parts) > 1 else parts[0]
    ranked = part.priority.reset_index(drop=True)
    audit = part.pool.nsmallest(cfg.audit_budget, "_audit_key")
    # An audit draw that is a priority pick, or the same image + question as one, is that pick's
    # label ("both"); near-copies are never labelled twice. Each such draw frees a label for the
    # next priority row (which may itself be an audit draw: repeat until it settles), so the day
    # still uses its whole budget.
    n_prio = cfg.priority_budget
    while True:
        prio = ranked.head(n_prio)
        by_key = dict(zip(_dup_key(prio), prio["request_id"]))
        stands_for = _dup_key(audit).map(by_key)
        left = audit[stands_for.isna().to_numpy()]
        left = left[~_dup_key(left).duplicated()]
        if cfg.budget - len(left) <= n_prio or n_prio >= len(ranked):
            break
        n_prio = cfg.budget - len(left)
    both = set(stands_for.dropna())
    prio, audit = prio.copy(), left
    err = part.category_error_rate
    prio["why"] = pd.Series([_why(r, cfg, err) for r in prio.itertuples(index=False)], index=prio.index,
                            dtype="str")  # typed even when nothing is chosen (a day without traffic)
    prio["pick"] = pd.Series(np.where(prio["request_id"].isin(both), "both", "priority"), index=prio.index,
                             dtype="str")
    audit = audit.assign(why=pd.Series(AUDIT_WHY, index=audit.index, dtype="str"),
                         pick=pd.Series("audit", index=audit.index, dtype="str"))
    out = pd.concat([prio, audit], ignore_index=True) if len(audit) else prio
    return out.drop(columns=["weight", "_audit_key"]).reset_index(drop=True)


PRIORITY_PICKS, AUDIT_PICKS = ("priority", "both"), ("audit", "both")


def audit_keys(request_ids: pd.Series, salt: str) -> np.ndarray:
    """A uniform pseudo-random number per request id, fixed by ``salt``: the rows with the k
    smallest keys are a uniform random sample of k, and samples of parts merge into the sample
    of the whole."""
    # SipHash (keyed by the salt, through pandas' vectorised hash): a blake2b digest per id in
    # Python was ~0.6 s a million rows, in the select reduce that waits for nothing else.
    key = hashlib.blake2b(salt.encode(), digest_size=8).hexdigest()  # the 16 bytes SipHash takes
    return pd.util.hash_array(request_ids.astype(str).to_numpy(dtype=object), hash_key=key, categorize=False)


def uniform_sample(df: pd.DataFrame, n: int, *, salt: str) -> pd.DataFrame:
    """``n`` rows of ``df`` drawn uniformly at random (seeded by ``salt``; see :func:`audit_keys`)."""
    return df.assign(_k=audit_keys(df["request_id"], salt)).nsmallest(n, "_k").drop(columns="_k")


def _dup_key(df: pd.DataFrame) -> pd.Series:
    # Each distinct wording normalised once: a day asks the same questions a great many times.
    codes, wordings = pd.factorize(df["question"], use_na_sentinel=False)
    normalised = np.array([normalise_question(q if isinstance(q, str) else "") for q in wordings], dtype=object)[codes]
    return df["image_sha256"].fillna("") + "|" + pd.Series(normalised, index=df.index, dtype="str")


def _best(df: pd.DataFrame, budget: int) -> pd.DataFrame:
    """The ``budget`` rows of highest priority (ties: request id), near-duplicates dropped. Only
    the best rows are sorted and compared, more until ``budget`` distinct ones are found: a row's
    fate depends only on the rows ranked above it, so this is the same as ranking them all."""
    df = df[df["priority"] > 0]
    prio = df["priority"].to_numpy(dtype=float)
    take = max(4 * budget, 256)
    while True:
        if take < len(df):  # the rows at least as good as the take-th best (its ties too)
            head = df[prio >= np.partition(prio, len(prio) - take)[len(prio) - take]]
        else:
            head = df
        head = head.sort_values(["priority", "request_id"], ascending=[False, True])
        kept = head[~_dup_key(head).duplicated()]
        if len(kept) >= budget or len(head) == len(df):
            return kept.head(budget)
        take *= 4


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
