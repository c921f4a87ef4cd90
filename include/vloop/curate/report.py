"""Daily metrics per model version and arm, from the day's interactions, mined feedback and the
annotators' verdicts.

Per (model_version, arm): requests, acceptance rate, edit rate, mean edit ratio, repeat
(re-ask/regenerate) rate, p50/p95 latency; where humans judged answers: the expected calibration
error of confidence against their verdicts, and how often the implicit label agreed with them.
Separately, the five categories with the most negative outcomes.

A model version is a name: the adapter's (``name@version``), or ``"base"`` for the base model
alone (:func:`model_version_name`), never the path the base model was loaded from. Acceptance and
edits are defined once, in :func:`outcome_flags`, for this report, the demo and the canary rollout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vloop.store.frames import member


def expected_calibration_error(confidence, correct, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    c = np.asarray(confidence, dtype=float)
    y = np.asarray(correct, dtype=float)
    if len(c) == 0:
        return float("nan")
    idx = np.minimum((c * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - c[m].mean())
    return float(ece)


NO_TRAFFIC = "no traffic"  # what the report says of a day without interactions (a normal day)
BASE_VERSION = "base"  # the model version of answers given by the base model without an adapter


def model_version_name(adapter) -> str:
    """The readable name of the model that gave an answer: its adapter (``name@version``), or
    ``"base"`` when no adapter was used. The base model's path or hub id (``base_model``, whatever
    serving logged) is not a name annotators or report readers should see."""
    return adapter if isinstance(adapter, str) and adapter.strip() else BASE_VERSION


def model_versions(adapters: pd.Series) -> pd.Series:
    """:func:`model_version_name` of each element (vectorised), as strings."""
    a = adapters.astype("str")
    return a.where(a.notna() & a.str.strip().ne(""), BASE_VERSION)


# Feedback event types that define the per-request outcomes (see outcome_flags).
OUTCOME_EVENTS = {"accepted": "accept", "edited": "edit"}


def outcome_flags(interactions: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """Whether each answered request was accepted and whether it was edited: the one definition of
    acceptance and edit rates (daily report, demo, canary rollout).

    * ``accepted``: the request has at least one ``accept`` feedback event. Nothing else counts:
      dwelling on an answer, closing it, a good rating or the absence of complaints are not
      acceptance.
    * ``edited``: the request has at least one ``edit`` event (with or without corrected text).

    Both can be true (accepted, then edited). ``interactions`` needs ``request_id`` (other columns,
    e.g. ``user_key``, ``arm``, are ignored); ``feedback`` needs ``request_id`` and ``type``, and
    events about requests not in ``interactions`` are ignored. Returns one row per interaction, in
    its order (index reset): ``request_id``, ``accepted``, ``edited`` (bool). Rates are the means of
    the columns over the requests of a group (e.g. an arm); either frame may be empty."""
    rid = interactions["request_id"].reset_index(drop=True)
    out = pd.DataFrame({"request_id": rid})
    for col, kind in OUTCOME_EVENTS.items():
        ids = feedback.loc[feedback["type"] == kind, "request_id"] if len(feedback) else ()
        out[col] = member(rid, ids)
    return out


GROUP = ["model_version", "arm"]
TRAFFIC_TYPES = {"model_version": "str", "arm": "str", "requests": "int64", "acceptance_rate": "float64",
                 "edit_rate": "float64", "mean_edit_ratio": "float64", "repeat_rate": "float64",
                 "latency_p50_ms": "float64", "latency_p95_ms": "float64", "hedge_rate": "float64",
                 "mean_answer_chars": "float64"}
JUDGED_TYPES = {"model_version": "str", "arm": "str", "judged": "int64", "human_accuracy": "float64",
                "ece": "float64", "implicit_agreement": "float64"}


def traffic_metrics(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    """One row per (model_version, arm): what the users did with the day's answers (no rows for a
    day without traffic)."""
    df = interactions.merge(mined[["request_id", "weak_label", "reason", "edit_ratio"]], on="request_id", how="left")
    df["model_version"] = model_versions(df["adapter"])
    flags = outcome_flags(df, feedback)
    df["accepted"], df["edited"] = flags["accepted"].to_numpy(), flags["edited"].to_numpy()
    df["repeated"] = df["reason"].isin(["regenerated", "question repeated in the session"])
    # Answer style per arm: how often the model hedges, how long it talks (what a decoding policy
    # against hedging and padding should move).
    from vloop.curate.errortypes import hedged_mask

    df["hedged"] = hedged_mask(df["answer"]).to_numpy() if len(df) else []
    df["answer_chars"] = df["answer"].fillna("").astype("str").str.len()
    rows = []
    for (version, arm), g in df.groupby(GROUP, dropna=False):
        lat = g["latency_ms"].dropna()
        rows.append({
            "model_version": version, "arm": arm, "requests": len(g),
            "acceptance_rate": g["accepted"].mean(), "edit_rate": g["edited"].mean(),
            "mean_edit_ratio": g["edit_ratio"].dropna().mean() if g["edit_ratio"].notna().any() else float("nan"),
            "repeat_rate": g["repeated"].mean(),
            "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
            "hedge_rate": g["hedged"].mean(), "mean_answer_chars": g["answer_chars"].mean(),
        })
    return pd.DataFrame(rows, columns=list(TRAFFIC_TYPES)).astype(TRAFFIC_TYPES)


def judged_metrics(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per (model_version, arm) of human-judged answers: how many, the expected
    calibration error of confidence against the verdicts, and how often the implicit label agreed.

    ``labels``: adapter, arm, confidence, weak_label, verdict (correct/wrong/unclear)."""
    cols = list(JUDGED_TYPES)
    if labels is None or not len(labels):
        return pd.DataFrame(columns=cols).astype(JUDGED_TYPES)
    df = labels[labels["verdict"].isin(["correct", "wrong"])].copy()
    df["model_version"] = model_versions(df["adapter"])
    rows = []
    for (version, arm), g in df.groupby(GROUP, dropna=False):
        implicit = g[g["weak_label"].isin(["positive", "negative", "weak_negative"])]
        conf = g["confidence"].dropna()
        rows.append({
            "model_version": version, "arm": arm, "judged": len(g),
            "human_accuracy": (g["verdict"] == "correct").mean(),
            "ece": expected_calibration_error(conf, g.loc[conf.index, "verdict"] == "correct")
            if len(conf) else float("nan"),
            "implicit_agreement": ((implicit["weak_label"] == "positive") == (implicit["verdict"] == "correct")).mean()
            if len(implicit) else float("nan"),
        })
    return pd.DataFrame(rows, columns=cols).astype(JUDGED_TYPES)


def daily_metrics(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame,
                  labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """Traffic metrics joined with judged metrics per (model_version, arm).

    ``labels`` either carries its own group columns and confidence (labels pulled today, about
    any day's answers) or only request_id + verdict about ``interactions``."""
    if labels is not None and len(labels) and "confidence" not in labels.columns:
        labels = labels[["request_id", "verdict"]].merge(
            interactions[["request_id", "confidence", "adapter", "arm"]], on="request_id").merge(
            mined[["request_id", "weak_label"]], on="request_id", how="left")
    traffic = traffic_metrics(interactions, feedback, mined)
    judged = judged_metrics(labels)
    out = traffic.merge(judged, on=GROUP, how="outer")
    out["requests"] = out["requests"].fillna(0).astype(int)
    out["judged"] = out["judged"].fillna(0).astype(int)
    return out


def top_error_categories(interactions: pd.DataFrame, mined: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    df = interactions.merge(mined[["request_id", "weak_label"]], on="request_id", how="left")
    df["bad"] = df["weak_label"].isin(["negative", "weak_negative"])
    g = df.groupby("category").agg(requests=("request_id", "size"), errors=("bad", "sum"))
    g["error_rate"] = g["errors"] / g["requests"]
    return g.sort_values(["errors", "error_rate"], ascending=False).head(k).reset_index()


# -- answer quality: error types, edit length, deleted phrases -------------------------------------

@dataclass
class AnswerQualityConfig:
    top_types: int = 5  # error types shown per day and per arm
    trend_days: int = 7  # the edit-length baseline: the mean over this many previous days
    # A category's mean edit length "rose well above" its baseline when all of these hold:
    rise_ratio: float = 1.5  # today's mean is at least this multiple of the baseline ...
    rise_min_chars: float = 3.0  # ... and this many characters more ...
    rise_min_edits: int = 5  # ... on at least this many edits today ...
    rise_min_days: int = 3  # ... against a baseline of at least this many days with edits
    phrase_max_tokens: int = 6  # a deleted run longer than this is a rewrite, not a phrase
    phrase_min_count: int = 2  # a phrase deleted fewer times is not listed
    phrases_top: int = 20
    examples: int = 3  # examples per phrase / error type


ERROR_TYPES_TYPES = {"arm": "str", "rank": "int64", "error_type": "str", "errors": "int64", "share": "float64",
                     "example": "str"}
EDIT_LENGTH_TYPES = {"category": "str", "edits": "int64", "mean_edit_chars": "float64", "mean_7d": "float64",
                     "days_7d": "int64", "rose": "bool"}
PHRASE_TYPES = {"phrase": "str", "deleted": "int64", "kept": "int64", "deletion_rate": "float64", "examples": "str"}
ERRORS_TYPES = {"request_id": "str", "source": "str", "model_version": "str", "arm": "str", "category": "str",
                "question": "str", "answer": "str", "correction": "str", "error_types": "str"}
UNCLASSIFIED = "other"  # an erroneous answer no rule recognises (counted, so the rules' blind spot shows)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(None, index=df.index, dtype=object)


def user_edits(interactions: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """The day's edited answers: one row per edited request (its last edit), with the answer, the
    user's text (``correction``; None for an edit event without text), arm and category."""
    cols = ["request_id", "source", "model_version", "arm", "category", "question", "answer", "correction"]
    if not len(feedback) or not len(interactions):
        return pd.DataFrame(columns=cols)
    ed = feedback[feedback["type"] == "edit"].sort_values("ts", kind="stable").groupby("request_id")["edited_text"].last()
    inter = interactions[interactions["request_id"].isin(ed.index)]
    return pd.DataFrame({"request_id": inter["request_id"], "source": "edit",
                         "model_version": model_versions(_col(inter, "adapter")), "arm": inter["arm"],
                         "category": _col(inter, "category"), "question": inter["question"],
                         "answer": inter["answer"], "correction": inter["request_id"].map(ed)}, columns=cols)


def errors_of_the_day(interactions: pd.DataFrame, feedback: pd.DataFrame, labels: pd.DataFrame | None = None,
                      rules=None) -> pd.DataFrame:
    """Every answer a user edited today or an annotator judged wrong, with its error types
    (:func:`vloop.curate.errortypes.error_types`, joined by ``"; "``, or ``"other"``). An answer both
    edited and labelled counts once, with the annotator's correction (the stronger signal).

    ``labels`` (``labeled/`` rows pulled today, about any day's answers) carry their own question,
    model answer, arm and adapter."""
    from vloop.curate.errortypes import classify_frame

    parts = [user_edits(interactions, feedback)]
    if labels is not None and len(labels):
        wrong = labels[labels["verdict"] == "wrong"]
        parts.append(pd.DataFrame({"request_id": wrong["request_id"], "source": "label",
                                   "model_version": model_versions(_col(wrong, "adapter")), "arm": _col(wrong, "arm"),
                                   "category": _col(wrong, "category"), "question": wrong["question"],
                                   "answer": wrong["model_answer"], "correction": wrong["corrected_answer"]}))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=list(ERRORS_TYPES)).astype(ERRORS_TYPES)
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values("source", key=lambda s: s.map({"label": 0, "edit": 1}), kind="stable")
    df = df.drop_duplicates("request_id").reset_index(drop=True)
    types = classify_frame(df, rules)
    df["error_types"] = types.map(lambda t: "; ".join(t) if t else UNCLASSIFIED)
    return df[list(ERRORS_TYPES)].astype({k: v for k, v in ERRORS_TYPES.items() if k != "correction"})


def top_error_types(errors: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` most frequent error types over all of the day's errors (``arm`` "all") and per
    arm: how many erroneous answers have the type, their share of the scope's erroneous answers
    (an answer with two types counts for both), and one example."""
    rows = []
    if len(errors):
        exploded = errors.assign(error_type=errors["error_types"].str.split("; ")).explode("error_type")
        scopes = [("all", exploded, len(errors))] + [
            (str(arm), g, int((errors["arm"] == arm).sum())) for arm, g in exploded.groupby("arm", dropna=True)]
        for arm, g, n in scopes:
            # Most frequent first; equal counts in name order, so the table is the same on a re-run.
            counts = g.groupby("error_type").size().sort_index().sort_values(ascending=False, kind="stable").head(k)
            for rank, (etype, c) in enumerate(counts.items(), start=1):
                ex = g[g["error_type"] == etype].iloc[0]
                fix = ex["correction"] if isinstance(ex["correction"], str) and ex["correction"] else "(no text)"
                rows.append({"arm": arm, "rank": rank, "error_type": etype, "errors": int(c), "share": c / n,
                             "example": f"{ex['question']} → {ex['answer']!s:.80} → {fix:.80}"})
    return pd.DataFrame(rows, columns=list(ERROR_TYPES_TYPES)).astype(ERROR_TYPES_TYPES)


def edit_length_by_category(interactions: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    """Per category, the day's edited answers and their mean edit length: the characters the user
    changed (Levenshtein distance between the answer and the edit, from :mod:`vloop.curate.mining`)."""
    df = mined[["request_id", "edit_distance"]].merge(interactions[["request_id", "category"]], on="request_id")
    df = df[df["edit_distance"].notna()]
    if not len(df):
        return pd.DataFrame({"category": pd.Series(dtype="str"), "edits": pd.Series(dtype="int64"),
                             "mean_edit_chars": pd.Series(dtype="float64")})
    df = df.assign(category=df["category"].fillna("(none)").astype("str"),
                   edit_distance=df["edit_distance"].astype("float64"))
    g = df.groupby("category")["edit_distance"].agg(edits="size", mean_edit_chars="mean").reset_index()
    return g.astype({"category": "str", "edits": "int64", "mean_edit_chars": "float64"})


def edit_length_trend(today: pd.DataFrame, history: pd.DataFrame, cfg: AnswerQualityConfig | None = None
                      ) -> pd.DataFrame:
    """Today's edit length per category beside its mean over the previous ``cfg.trend_days``
    days (``history``: earlier outputs of :func:`edit_length_by_category` with a ``dt`` column;
    the mean weights each day by its edits), and ``rose``: well above it (see
    :class:`AnswerQualityConfig`)."""
    cfg = cfg or AnswerQualityConfig()
    out = today.copy()
    if len(history) and len(out):
        h = history.assign(total=history["edits"] * history["mean_edit_chars"])
        base = h.groupby("category").agg(total=("total", "sum"), edits=("edits", "sum"), days_7d=("dt", "nunique"))
        base["mean_7d"] = base["total"] / base["edits"]
        out = out.merge(base[["mean_7d", "days_7d"]], left_on="category", right_index=True, how="left")
    else:
        out["mean_7d"], out["days_7d"] = np.nan, 0
    out["days_7d"] = out["days_7d"].fillna(0)
    out["rose"] = ((out["edits"] >= cfg.rise_min_edits) & (out["days_7d"] >= cfg.rise_min_days)
                   & (out["mean_edit_chars"] >= cfg.rise_ratio * out["mean_7d"])
                   & (out["mean_edit_chars"] - out["mean_7d"] >= cfg.rise_min_chars)).fillna(False)
    return out[list(EDIT_LENGTH_TYPES)].astype(EDIT_LENGTH_TYPES).sort_values(
        ["rose", "mean_edit_chars"], ascending=False).reset_index(drop=True)


_PHRASE_TOKEN = re.compile(r"[\u3400-\u9fff]|[^\W_]+(?:'[^\W_]+)*", re.UNICODE)


def _join(tokens: list[str]) -> str:
    """Tokens back into text: Chinese characters run together, words get spaces."""
    out = ""
    for t in tokens:
        cjk = bool(re.match(r"[\u3400-\u9fff]", t))
        if out and not (cjk and re.match(r"[\u3400-\u9fff]", out[-1])):
            out += " "
        out += t
    return out


def _content_tokens() -> set[str]:
    """Words that carry an answer's content (colours, products, numbers, yes/no): deleting one is
    a correction of what was said, not a phrasing to ban."""
    from vloop.curate.errortypes import CATEGORY_WORDS, COLOUR_WORDS, NUMBER_WORDS

    words = set()
    for vocab in (COLOUR_WORDS, CATEGORY_WORDS):
        for ws in vocab.values():
            words |= set(ws)
    # Chinese yes/no (能, 不能, 可以) are left out: their characters are also in hedges (可能), and a
    # run of one character is never listed anyway.
    words |= set(NUMBER_WORDS) | {"yes", "no", "not", "色"}
    out = set()
    for w in words:  # Chinese words count character by character (the tokens here are characters)
        out |= set(w) if re.search(r"[\u3400-\u9fff]", w) else {w}
    return out


# Function words: deleted alone they are noise, not a phrase to ban.
_STOPWORDS = {"a", "an", "the", "is", "are", "it", "it's", "this", "that", "these", "those", "they", "i", "to",
              "of", "and", "in", "on", "for", "with", "be", "so", "its", "was", "you", "your", "my"}


def deleted_runs(answer: str, edit: str, max_tokens: int = 6) -> list[list[str]]:
    """The token runs of ``answer`` the user deleted: what a word diff (Chinese by character)
    shows removed or replaced, split at content words, at most ``max_tokens`` long."""
    import difflib

    a = _PHRASE_TOKEN.findall((answer or "").lower())
    b = _PHRASE_TOKEN.findall((edit or "").lower())
    content = _content_tokens()
    runs = []
    for op, i1, i2, _, _ in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op not in ("delete", "replace"):
            continue
        run: list[str] = []
        for t in a[i1:i2] + [None]:  # None flushes the last run
            if t is not None and t not in content:
                run.append(t)
                continue
            if run and len(run) <= max_tokens:
                runs.append(run)
            run = []
    return runs


def deleted_candidates(answer: str, edit: str, max_tokens: int = 6) -> set[str]:
    """Every phrase inside the deleted runs (each contiguous part, so "i think it is" and "i think
    these are" both count for "i think") that is absent from the edit; at least two characters, and
    not a lone function word."""
    edit_text = _join(_PHRASE_TOKEN.findall((edit or "").lower()))
    out = set()
    for run in deleted_runs(answer, edit, max_tokens):
        for i in range(len(run)):
            for j in range(i + 1, len(run) + 1):
                p = _join(run[i:j])
                if len(p) >= 2 and not (j - i == 1 and p in _STOPWORDS) and p not in edit_text:
                    out.add(p)
    return out


def deleted_phrases(edits: pd.DataFrame, cfg: AnswerQualityConfig | None = None) -> pd.DataFrame:
    """The phrases users most often delete when they edit an answer (``edits``: ``answer``,
    ``correction``), as candidates for the decoding policy a person approves: per phrase, in how
    many edits it was deleted, in how many edited answers it was kept, the deletion rate and a few
    examples. Content words (colours, products, numbers, yes/no) are corrections, not phrasing,
    and are left out; a phrase is dropped in favour of a longer one deleted just as often ("i" and
    "think" inside "i think")."""
    cfg = cfg or AnswerQualityConfig()
    if len(edits):
        edits = edits[_col(edits, "correction").fillna("").astype("str").str.strip().ne("")]
    pairs = list(zip(_col(edits, "answer").fillna("").astype("str"), _col(edits, "correction").fillna("").astype("str")))
    # The same answer is often edited the same way: each distinct pair is diffed once, counted n times.
    from collections import Counter

    distinct = Counter(pairs)
    deleted: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for (a, c), times in distinct.items():
        for p in deleted_candidates(a, c, cfg.phrase_max_tokens):
            deleted[p] = deleted.get(p, 0) + times
            if len(examples.setdefault(p, [])) < cfg.examples:
                examples[p].append(f"{a:.80} → {c:.80}")
    frequent = {p: n for p, n in deleted.items() if n >= cfg.phrase_min_count}
    # A phrase inside a longer one with the same count adds nothing ("可能" inside "可能是").
    kept_phrases = [p for p, n in frequent.items()
                    if not any(q != p and p in q and m == n for q, m in frequent.items())]
    # Only the most deleted are listed: count where they were kept for those alone (that count
    # scans every edit, which is the costly part on a busy day).
    kept_phrases = sorted(kept_phrases, key=lambda p: (-frequent[p], p))[:2 * cfg.phrases_top]
    texts = [(_join(_PHRASE_TOKEN.findall(a.lower())), _join(_PHRASE_TOKEN.findall(c.lower())), times)
             for (a, c), times in distinct.items()]
    rows = []
    for p in kept_phrases:
        n = frequent[p]
        kept = sum(times for a, c, times in texts if p in a and p in c)
        rows.append({"phrase": p, "deleted": n, "kept": kept, "deletion_rate": n / (n + kept),
                     "examples": " | ".join(examples[p])})
    out = pd.DataFrame(rows, columns=list(PHRASE_TYPES)).astype(PHRASE_TYPES)
    return out.sort_values(["deleted", "deletion_rate", "phrase"], ascending=[False, False, True]).head(
        cfg.phrases_top).reset_index(drop=True)


SIGNAL_TYPES = {"arm": "str", "judged": "int64", "grounding_auroc": "float64", "confidence_auroc": "float64",
                "edits": "int64", "bleu_vs_edits": "float64", "rouge_l_vs_edits": "float64"}


def signal_quality(labels: pd.DataFrame | None, grounding: dict, edits: pd.DataFrame) -> pd.DataFrame:
    """How well the automatic signals agree with people, overall (``arm`` "all") and per arm:

    * on the answers annotators judged correct or wrong, the AUROC of the grounding score
      (:mod:`vloop.curate.grounding`, ``grounding``: request_id -> score) and, beside it, of confidence,
      for telling right from wrong (0.5 is chance);
    * on the answers users edited, BLEU and ROUGE-L of the answer against the user's edit
      (as :func:`vloop.learn.evaluation.scores` computes them): how far the model's wording was from
      what users wanted."""
    from vloop.learn.evaluation import sentence_bleu_rouge
    from vloop.vlm.model import auroc

    judged = labels[labels["verdict"].isin(["correct", "wrong"])] if labels is not None and len(labels) else None
    if judged is None:
        judged = pd.DataFrame({"arm": pd.Series(dtype="str"), "request_id": pd.Series(dtype="str"),
                               "verdict": pd.Series(dtype="str"), "confidence": pd.Series(dtype="float64")})
    judged = judged.assign(grounding=judged["request_id"].map(grounding).astype("float64"),
                           right=judged["verdict"] == "correct")
    edits = edits[edits["correction"].fillna("").astype("str").str.strip().ne("")] if len(edits) else edits
    if len(edits):  # each edit scored once, then averaged per arm
        bleu, rouge = sentence_bleu_rouge(edits["answer"].fillna("").astype("str").tolist(),
                                          edits["correction"].astype("str").tolist())
        edits = edits.assign(bleu=bleu, rouge_l=rouge)
    arms = sorted(set(judged["arm"].dropna()) | set(edits["arm"].dropna() if len(edits) else []))
    rows = []
    for arm in ["all"] + arms:
        j = judged if arm == "all" else judged[judged["arm"] == arm]
        e = edits if arm == "all" or not len(edits) else edits[edits["arm"] == arm]
        g, c = j.dropna(subset=["grounding"]), j.dropna(subset=["confidence"])
        rows.append({"arm": arm, "judged": len(j), "grounding_auroc": auroc(g["grounding"], g["right"]),
                     "confidence_auroc": auroc(pd.to_numeric(c["confidence"]), c["right"]), "edits": len(e),
                     "bleu_vs_edits": e["bleu"].mean() if len(e) else float("nan"),
                     "rouge_l_vs_edits": e["rouge_l"].mean() if len(e) else float("nan")})
    if not len(judged) and not len(edits):
        rows = []
    return pd.DataFrame(rows, columns=list(SIGNAL_TYPES)).astype(SIGNAL_TYPES)


def answer_quality(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame,
                   labels: pd.DataFrame | None, edit_length_history: pd.DataFrame,
                   cfg: AnswerQualityConfig | None = None, grounding: dict | None = None) -> dict[str, pd.DataFrame]:
    """The report's answer-quality tables for a day: ``errors`` (every erroneous answer and its
    types), ``error_types`` (top types, overall and per arm), ``edit_length`` (per category, with
    the 7-day trend), ``deleted_phrases`` and ``signals`` (grounding AUROC on judged answers, BLEU
    and ROUGE-L against users' edits; ``grounding``: request_id -> score of the judged answers).
    Each has its columns even on a day without traffic."""
    cfg = cfg or AnswerQualityConfig()
    errors = errors_of_the_day(interactions, feedback, labels)
    edits = user_edits(interactions, feedback)
    return {"errors": errors, "error_types": top_error_types(errors, cfg.top_types),
            "edit_length": edit_length_trend(edit_length_by_category(interactions, mined), edit_length_history, cfg),
            "deleted_phrases": deleted_phrases(edits, cfg), "signals": signal_quality(labels, grounding or {}, edits)}


def png_data_url(fig) -> str:
    """A matplotlib figure as a PNG data URL, for an ``<img>`` of a self-contained page."""
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(history: pd.DataFrame, confidence: pd.Series, labels: pd.DataFrame | None) -> dict[str, str]:
    """PNG data URLs: rates per arm over the recent days; today's confidence distribution; the
    reliability diagram of the answers annotators judged today."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    if len(history):
        for arm, g in history.groupby("arm"):
            g = g.groupby("dt")[["acceptance_rate", "edit_rate"]].mean().sort_index()
            axes[0].plot(pd.to_datetime(g.index), g["acceptance_rate"], marker="o", label=arm)
            axes[1].plot(pd.to_datetime(g.index), g["edit_rate"], marker="o", label=arm)
    for ax, title in zip(axes, ["acceptance rate", "edit rate"]):
        ax.set_title(title)
        ax.set_ylim(0, 1)
        if ax.lines:  # no lines without traffic in the window
            ax.legend(loc="best", fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    out["history"] = png_data_url(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].hist(confidence.dropna(), bins=20, range=(0, 1), color="#4a7")
    axes[0].set_title("confidence of today's answers")
    axes[1].plot([0, 1], [0, 1], "--", color="grey")
    judged = labels[labels["verdict"].isin(["correct", "wrong"])].dropna(subset=["confidence"]) \
        if labels is not None and len(labels) else pd.DataFrame()
    if len(judged):
        bins = np.minimum((judged["confidence"].to_numpy() * 10).astype(int), 9)
        acc = judged.assign(b=bins, ok=judged["verdict"] == "correct").groupby("b").agg(
            conf=("confidence", "mean"), acc=("ok", "mean"), n=("ok", "size"))
        axes[1].scatter(acc["conf"], acc["acc"], s=20 + 5 * acc["n"])
    axes[1].set_title(f"reliability: {len(judged)} answers judged today")
    axes[1].set_xlabel("confidence")
    axes[1].set_ylabel("share judged correct")
    out["calibration"] = png_data_url(fig)
    plt.close(fig)
    return out


def experiment_plot(looks: pd.DataFrame) -> str | None:
    """The live and recent canary experiments, look by look (``vloop.release.canary.looks``): per metric,
    each arm's rate, and the canary − champion difference inside its always-valid interval; a
    decision that acted is marked. None without looks."""
    if looks is None or not len(looks):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = looks.assign(at=pd.to_datetime(looks["at"], utc=True)).sort_values("at")
    metrics = sorted(df["metric"].unique())
    fig, axes = plt.subplots(2, len(metrics), figsize=(5.5 * len(metrics), 6), squeeze=False, sharex=True)
    for j, metric in enumerate(metrics):
        g = df[df["metric"] == metric]
        top, bottom = axes[0][j], axes[1][j]
        top.plot(g["at"], g["champion"], marker=".", label="champion")
        top.plot(g["at"], g["canary"], marker=".", label="canary")
        top.set_title(f"{metric} rate per arm")
        top.set_ylim(0, 1)
        top.legend(loc="best", fontsize=8)
        for exp, e in g.groupby("experiment"):
            lo, hi = e["lower"].clip(-1, 1), e["upper"].clip(-1, 1)
            bottom.errorbar(e["at"], e["diff"], yerr=[e["diff"] - lo, hi - e["diff"]], marker=".", capsize=3, label=exp)
        acted = g[g["action"] != "continue"]
        bottom.scatter(acted["at"], acted["diff"], marker="*", s=120, color="black", zorder=3, label="decision")
        bottom.axhline(0, color="grey", lw=0.8)
        bottom.set_title(f"{metric}: canary − champion (always-valid)", fontsize=10)
        bottom.legend(loc="best", fontsize=7)
        bottom.tick_params(axis="x", labelrotation=30, labelsize=8)
    out = png_data_url(fig)
    plt.close(fig)
    return out


def gate_cells(figures: dict | None, reason: str | None = None) -> dict:
    """The offline gate's figures (:func:`vloop.learn.retrain.gate_decision`, as the registry's
    history keeps them) as a table row's cells: the paired items, candidate and champion exact
    match, the difference with its 95% interval, the discordant items (only the candidate right /
    only the champion), McNemar's one-sided p and the verdict ("passed", or the reason's first
    clause). Figures the gate never computed (it stopped early, or never ran) are None."""
    f = figures or {}

    def signed(v):
        return f"{v:+.3f}"

    diff, ci, b, c, p = f.get("difference"), f.get("interval"), f.get("b"), f.get("c"), f.get("p")
    if f.get("passed") is True:
        verdict = "passed"
    elif reason:
        verdict = reason.split(";")[0]
    else:
        verdict = None if f.get("passed") is None else "failed"
    return {
        "gate items": f.get("n") or None,
        "candidate EM": f.get("candidate"),
        "champion EM": f.get("champion"),
        "difference (95% CI)": None if diff is None else signed(diff) + (
            f" ({signed(ci[0])} to {signed(ci[1])})" if ci else ""),
        "only candidate / only champion right": None if b is None or c is None else f"{b} / {c}",
        "p (McNemar)": None if p is None else f"{p:.3g}",
        "gate": verdict,
    }


def source_counts(by_source: dict | None) -> dict[str, int]:
    """A dataset manifest's ``by_source`` (:func:`vloop.learn.dataset.build_dataset`: examples per
    ``(split, source)``, keyed by the pair's text ``"('train', 'user_edit')"``) as examples per
    source, summed over the splits; a key that is not such a pair counts under itself."""
    import ast

    out: dict[str, int] = {}
    for key, n in (by_source or {}).items():
        try:
            pair = ast.literal_eval(key) if isinstance(key, str) else key
        except (ValueError, SyntaxError):
            pair = key
        source = str(pair[-1]) if isinstance(pair, tuple) and pair else str(key)
        out[source] = out.get(source, 0) + int(n)
    return out


def round_rows(rounds: list[dict]) -> pd.DataFrame:
    """The loop's retraining rounds as a table of figures, one row each. A round is a dict of
    plain values (``round``, ``ref``, ``outcome``, ``train_seconds``, ...) with, where the round
    got that far, ``examples`` (the dataset manifest's count per split), ``by_source`` (see
    :func:`source_counts`: one column of examples per source) and the gate's ``gate`` figures,
    ``gate_passed`` and ``gate_reason`` (see :func:`gate_cells`). Any other dict or list is shown
    as ``key=value`` text. A round without a figure shows none (NaN)."""
    rows = []
    for r in rounds:
        row = {k: v for k, v in r.items() if k not in ("examples", "by_source", "gate", "gate_passed", "gate_reason")}
        row.update({f"{split} examples": n for split, n in (r.get("examples") or {}).items()})
        row.update({f"from {src}": n for src, n in source_counts(r.get("by_source")).items()})
        if any(k in r for k in ("gate", "gate_passed", "gate_reason")):
            figures = {**(r.get("gate") or {}), "passed": r.get("gate_passed", (r.get("gate") or {}).get("passed"))}
            row.update(gate_cells(figures, r.get("gate_reason")))
        for k, v in list(row.items()):
            if isinstance(v, dict):
                row[k] = ", ".join(f"{a}={b}" for a, b in v.items())
            elif isinstance(v, (list, tuple)):
                row[k] = ", ".join(map(str, v))
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:  # counts stay whole numbers (not 55.000) where a round has none
        v = [row[col] for row in rows if row.get(col) is not None]
        if v and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v):
            df[col] = pd.Series([np.nan if row.get(col) is None else row[col] for row in rows], index=df.index,
                                dtype=object)
    gate = list(gate_cells(None))

    def place(col: str) -> int:  # the round, its data, its gate, then what came of it
        return (3 if col in ("outcome", "train_seconds") else 2 if col in gate
                else 1 if col.endswith(" examples") or col.startswith("from ") else 0)

    return df[sorted(df.columns, key=place)]  # a stable sort: each group keeps its order


# Headings and notes of the answer-quality tables (see answer_quality), in page order.
def selection_hit_rates(selected: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Per selection day: how many of the priority picks annotators judged wrong (the selection's
    hit rate) beside the random audit picks judged wrong (the day's base rate: what a random pick
    would have found), each with its 95% Wilson interval, and their ratio. Picks from before the
    audit existed (no ``pick`` column) count as priority; "unclear" verdicts count as neither."""
    from vloop.learn.retrain import wilson_interval
    from vloop.curate.selection import AUDIT_PICKS, PRIORITY_PICKS

    cols = ["selected_on", "priority_judged", "hit_rate", "hit_rate_lo", "hit_rate_hi", "audit_judged",
            "base_rate", "base_rate_lo", "base_rate_hi", "hit_over_base"]
    if not len(selected) or not len(labels) or "verdict" not in labels.columns:
        return pd.DataFrame(columns=cols)
    sel = selected[["request_id", "selected_on"] + (["pick"] if "pick" in selected.columns else [])]
    sel = sel.assign(pick=sel["pick"].fillna("priority") if "pick" in sel.columns else "priority")
    judged = labels[labels["verdict"].isin(["correct", "wrong"])][["request_id", "verdict"]]
    df = sel.drop_duplicates("request_id").merge(judged.drop_duplicates("request_id"), on="request_id")
    rows = []
    for day, g in df.groupby("selected_on"):
        row = {"selected_on": day}
        for pick, name, kinds in (("priority", "hit_rate", PRIORITY_PICKS), ("audit", "base_rate", AUDIT_PICKS)):
            h = g[g["pick"].isin(kinds)]
            n, x = len(h), int((h["verdict"] == "wrong").sum())
            lo, hi = wilson_interval(x, n)
            row.update({f"{pick}_judged" if pick == "audit" else "priority_judged": n,
                        name: x / n if n else float("nan"), f"{name}_lo": lo, f"{name}_hi": hi})
        row["hit_over_base"] = row["hit_rate"] / row["base_rate"] if row["base_rate"] else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols).sort_values("selected_on", ascending=False).reset_index(drop=True)


QUALITY_SECTIONS = {
    "selection": ("Is the selection worth the annotators' time?",
                  "Per selection day: the share of priority picks annotators judged wrong (hit rate) beside the "
                  "share of the random audit picks judged wrong (base rate: what a random pick of that day would "
                  "have found), with 95% Wilson intervals. A hit rate near the base rate means the priority "
                  "signals are not finding errors; the audit is <code>audit_share</code> of the budget."),
    "error_types": ("Top error types (per day and per arm)",
                    "Every answer a user edited or an annotator judged wrong, typed by rules over the question's "
                    "intent, the answer and the correction (vloop.curate.errortypes); an answer may have several types."),
    "edit_length": ("Edit length per category",
                    "Mean characters changed per edited answer, beside the mean of the previous 7 days; "
                    "<b>rose</b> marks a category well above it."),
    "signals": ("Grounding and wording",
                "AUROC of image-text grounding (and of confidence) for telling right from wrong on the answers "
                "annotators judged; BLEU and ROUGE-L of answers against the users' edits."),
    "deleted_phrases": ("Phrases users delete (decoding-policy candidates)",
                        "Present in the answer, absent from the user's edit; content words (colours, products, "
                        "numbers, yes/no) left out. A person approves a phrase into the policy with "
                        "<code>vloop decoding ban</code>."),
}


def render_html(day: str, metrics: pd.DataFrame, top_errors: pd.DataFrame, summary: dict,
                images: dict[str, str], quality: dict[str, pd.DataFrame] | None = None) -> str:
    """The daily report as one self-contained HTML page (plots embedded). ``quality``: the
    tables of :func:`answer_quality` (and any of :data:`QUALITY_SECTIONS`) to show."""
    import html

    def table(df: pd.DataFrame) -> str:
        return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–", border=0,
                          classes="t") if len(df) else "<p>none</p>"

    experiment = "" if not images.get("experiment") else (
        "<h2>Canary experiments</h2><p>" + html.escape(summary.get("experiment", "")) + "</p>"
        f'<img alt="per-arm rates and the always-valid interval of their difference, look by look" '
        f'src="{images["experiment"]}">')
    sections = "".join(f"<h2>{title}</h2><p>{note}</p>{table(quality[name])}"
                       for name, (title, note) in QUALITY_SECTIONS.items() if quality and name in quality)
    facts = "".join(f"<li>{html.escape(str(k))}: <b>{html.escape(str(v))}</b></li>" for k, v in summary.items())
    if summary.get("traffic") == NO_TRAFFIC:
        facts += "<li><b>No traffic</b>: no interactions were logged this day, so the tables below are empty.</li>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>vloop daily report {day}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} .t td,.t th{{padding:3px 8px;text-align:right}}
.t tr:nth-child(even){{background:#f4f4f4}} img{{max-width:100%}}</style></head><body>
<h1>vloop daily report — {day}</h1>
<h2>Run</h2><ul>{facts}</ul>
<h2>Per model version and arm</h2>{table(metrics)}
<h2>Trends</h2><img alt="acceptance and edit rate per arm over time" src="{images['history']}">
{experiment}
<h2>Confidence and calibration</h2><img alt="confidence histogram and reliability diagram" src="{images['calibration']}">
<h2>Top error categories</h2>{table(top_errors)}
{sections}
</body></html>"""
