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


def traffic_counts(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame) -> dict:
    """:func:`traffic_part` without the latencies: per (model_version, arm) the counts and sums."""
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
    out = {}
    for (version, arm), g in df.groupby(GROUP, dropna=False):
        ratio = pd.to_numeric(g["edit_ratio"], errors="coerce")
        out[(version, None if pd.isna(arm) else arm)] = {
            "requests": len(g), "accepted": int(g["accepted"].sum()), "edited": int(g["edited"].sum()),
            "edit_ratio_sum": float(ratio.sum()), "edit_ratio_n": int(ratio.count()),
            "repeated": int(g["repeated"].sum()), "hedged": int(g["hedged"].sum()),
            "answer_chars": int(g["answer_chars"].sum())}
    return out


def latency_part(interactions: pd.DataFrame) -> dict:
    """Per (model_version, arm): the latencies (float32, 4 bytes a request, for exact percentiles)."""
    df = pd.DataFrame({"model_version": model_versions(interactions["adapter"]).to_numpy(),
                       "arm": interactions["arm"].to_numpy(), "latency_ms": interactions["latency_ms"].to_numpy()})
    return {(version, None if pd.isna(arm) else arm): [g["latency_ms"].dropna().to_numpy(np.float32)]
            for (version, arm), g in df.groupby(GROUP, dropna=False)}


def with_latency(counts: dict, latency: dict) -> dict:
    """:func:`traffic_counts` and :func:`latency_part` of the same rows, as :func:`traffic_part`."""
    return {k: {**v, "latency": latency.get(k, [])} for k, v in counts.items()}


def traffic_part(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame) -> dict:
    """What :func:`traffic_metrics` needs of some of a day's rows, additive over parts
    (:func:`merge_traffic`): per (model_version, arm) the counts and sums, and the latencies
    (float32, 4 bytes a request, for the exact percentiles)."""
    return with_latency(traffic_counts(interactions, feedback, mined), latency_part(interactions))


def merge_traffic(total: dict, part: dict) -> dict:
    for k, v in part.items():
        if k not in total:
            total[k] = {**v, "latency": list(v["latency"])}
        else:
            for name, x in v.items():
                total[k][name] = total[k][name] + x  # the latency lists are joined
    return total


def traffic_from(parts: dict) -> pd.DataFrame:
    """:func:`traffic_metrics` from the sums of :func:`traffic_part`."""
    rows = []
    for (version, arm) in sorted(parts, key=lambda k: (k[0], k[1] is None, k[1] or "")):
        t = parts[(version, arm)]
        lat = np.concatenate(t["latency"]).astype(np.float64) if t["latency"] else np.zeros(0)
        n = t["requests"]
        rows.append({
            "model_version": version, "arm": np.nan if arm is None else arm, "requests": n,
            "acceptance_rate": t["accepted"] / n, "edit_rate": t["edited"] / n,
            "mean_edit_ratio": t["edit_ratio_sum"] / t["edit_ratio_n"] if t["edit_ratio_n"] else float("nan"),
            "repeat_rate": t["repeated"] / n,
            "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
            "hedge_rate": t["hedged"] / n, "mean_answer_chars": t["answer_chars"] / n,
        })
    return pd.DataFrame(rows, columns=list(TRAFFIC_TYPES)).astype(TRAFFIC_TYPES)


def traffic_metrics(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    """One row per (model_version, arm): what the users did with the day's answers (no rows for a
    day without traffic)."""
    return traffic_from(traffic_part(interactions, feedback, mined))


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
        labels = labels[["request_id", "verdict"]].merge(labelled_answers(interactions, mined, labels), on="request_id")
    return metrics_from(traffic_metrics(interactions, feedback, mined), labels)


def labelled_answers(interactions: pd.DataFrame, mined: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """What the judged metrics need of the labelled requests among ``interactions``, for labels
    that do not carry it themselves: confidence, adapter, arm, weak label."""
    mine = interactions[member(interactions["request_id"], labels["request_id"])]
    return mine[["request_id", "confidence", "adapter", "arm"]].merge(
        mined[["request_id", "weak_label"]], on="request_id", how="left")


def metrics_from(traffic: pd.DataFrame, labels: pd.DataFrame | None) -> pd.DataFrame:
    """The traffic metrics joined with the judged metrics of ``labels`` per (model_version, arm)."""
    judged = judged_metrics(labels)
    out = traffic.merge(judged, on=GROUP, how="outer")
    out["requests"] = out["requests"].fillna(0).astype(int)
    out["judged"] = out["judged"].fillna(0).astype(int)
    return out


def category_part(interactions: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    """Per category: requests and negative outcomes (additive over parts of a day)."""
    df = interactions.merge(mined[["request_id", "weak_label"]], on="request_id", how="left")
    df["bad"] = df["weak_label"].isin(["negative", "weak_negative"])
    return df.groupby("category").agg(requests=("request_id", "size"), errors=("bad", "sum"))


def top_error_categories(interactions: pd.DataFrame, mined: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    return top_error_categories_from(category_part(interactions, mined), k)


def top_error_categories_from(counts: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    g = counts.sort_index()
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
    inter = interactions[member(interactions["request_id"], ed.index)]
    return pd.DataFrame({"request_id": inter["request_id"], "source": "edit",
                         "model_version": model_versions(_col(inter, "adapter")), "arm": inter["arm"],
                         "category": _col(inter, "category"), "question": inter["question"],
                         "answer": inter["answer"], "correction": inter["request_id"].map(ed)}, columns=cols)


def errors_of_the_day(interactions: pd.DataFrame, feedback: pd.DataFrame, labels: pd.DataFrame | None = None,
                      rules=None, edits: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every answer a user edited today or an annotator judged wrong, with its error types
    (:func:`vloop.curate.errortypes.error_types`, joined by ``"; "``, or ``"other"``). An answer both
    edited and labelled counts once, with the annotator's correction (the stronger signal).

    ``labels`` (``labeled/`` rows pulled today, about any day's answers) carry their own question,
    model answer, arm and adapter. ``edits``: :func:`user_edits` of the two, when the caller has it."""
    from vloop.curate.errortypes import classify_frame

    parts = [user_edits(interactions, feedback) if edits is None else edits]
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


def error_type_part(errors: pd.DataFrame) -> dict:
    """What :func:`top_error_types` needs of some of a day's errors (in order), additive over parts
    (:func:`merge_error_types`): per scope ("all" and each arm) the erroneous answers, per scope and
    type their number and the first one's example."""
    part: dict = {"n": {}, "count": {}, "example": {}}
    if not len(errors):
        return part
    arms = errors["arm"]
    scopes = [("all", errors)] + [(str(arm), errors[(arms == arm).to_numpy()]) for arm in sorted(arms.dropna().unique())]
    for scope, g in scopes:
        part["n"][scope] = len(g)
        # Per distinct combination of types (a day has a handful), its rows and its first row;
        # then per type, added over the combinations that name it.
        codes, combos = pd.factorize(g["error_types"])
        rows, first = np.bincount(codes[codes >= 0], minlength=len(combos)), np.full(len(combos), len(g))
        np.minimum.at(first, codes[codes >= 0], np.flatnonzero(codes >= 0))
        seen: dict[str, int] = {}
        for combo, n, at in zip(combos, rows, first):
            for etype in str(combo).split("; "):
                part["count"][(scope, etype)] = part["count"].get((scope, etype), 0) + int(n)
                seen[etype] = min(seen.get(etype, at), at)
        for etype, at in sorted(seen.items(), key=lambda kv: kv[1]):  # the day's order, as the rows came
            ex = g.iloc[at]
            fix = ex["correction"] if isinstance(ex["correction"], str) and ex["correction"] else "(no text)"
            part["example"][(scope, etype)] = f"{ex['question']} → {ex['answer']!s:.80} → {fix:.80}"
    return part


def merge_error_types(total: dict, part: dict) -> dict:
    for what in ("n", "count"):
        for k, v in part[what].items():
            total.setdefault(what, {})[k] = total.get(what, {}).get(k, 0) + v
    for k, v in part["example"].items():
        total.setdefault("example", {}).setdefault(k, v)  # the first one, in the day's order
    return total


def top_error_types(errors: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` most frequent error types over all of the day's errors (``arm`` "all") and per
    arm: how many erroneous answers have the type, their share of the scope's erroneous answers
    (an answer with two types counts for both), and one example."""
    return top_error_types_from(error_type_part(errors), k)


def top_error_types_from(part: dict, k: int = 5) -> pd.DataFrame:
    """:func:`top_error_types` from :func:`error_type_part` (merged)."""
    rows = []
    scopes = ["all"] * ("all" in part.get("n", {})) + sorted(s for s in part.get("n", {}) if s != "all")
    for scope in scopes:
        n = part["n"][scope]
        counts = pd.Series({t: c for (sc, t), c in part["count"].items() if sc == scope}, dtype="int64")
        # Most frequent first; equal counts in name order, so the table is the same on a re-run.
        counts = counts.sort_index().sort_values(ascending=False, kind="stable").head(k)
        for rank, (etype, c) in enumerate(counts.items(), start=1):
            rows.append({"arm": scope, "rank": rank, "error_type": etype, "errors": int(c), "share": c / n,
                         "example": part["example"][(scope, etype)]})
    return pd.DataFrame(rows, columns=list(ERROR_TYPES_TYPES)).astype(ERROR_TYPES_TYPES)


def edit_length_by_category(interactions: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    """Per category, the day's edited answers and their mean edit length: the characters the user
    changed (Levenshtein distance between the answer and the edit, from :mod:`vloop.curate.mining`)."""
    return edit_length_from(edit_length_part(interactions, mined))


def edit_length_part(interactions: pd.DataFrame, mined: pd.DataFrame) -> dict:
    """Per category: edits and the sum of their edit distances (additive over parts of a day)."""
    df = mined[["request_id", "edit_distance"]].merge(interactions[["request_id", "category"]], on="request_id")
    df = df[df["edit_distance"].notna()]
    df = df.assign(category=df["category"].fillna("(none)").astype("str"),
                   edit_distance=df["edit_distance"].astype("float64"))
    return {c: [len(g), float(g["edit_distance"].sum())] for c, g in df.groupby("category")}


def merge_sums(total: dict, part: dict) -> dict:
    """Add ``part``'s lists of numbers into ``total``'s, key by key."""
    for k, v in part.items():
        total[k] = [a + b for a, b in zip(total[k], v)] if k in total else list(v)
    return total


def edit_length_from(part: dict) -> pd.DataFrame:
    if not part:
        return pd.DataFrame({"category": pd.Series(dtype="str"), "edits": pd.Series(dtype="int64"),
                             "mean_edit_chars": pd.Series(dtype="float64")})
    rows = [{"category": c, "edits": n, "mean_edit_chars": total / n} for c, (n, total) in sorted(part.items())]
    return pd.DataFrame(rows).astype({"category": "str", "edits": "int64", "mean_edit_chars": "float64"})


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
    return deleted_phrases_from(edit_pairs(edits), cfg)


def edit_pairs(edits: pd.DataFrame):
    """The distinct (answer, user's text) pairs of ``edits`` with a text, counted: the same answer is
    often edited the same way, so each pair is diffed once (a Counter: additive over parts of a
    day, in the order first seen)."""
    from collections import Counter

    if not len(edits):
        return Counter()
    pairs = pd.DataFrame({"answer": _col(edits, "answer").fillna("").astype("str"),
                          "correction": _col(edits, "correction").fillna("").astype("str")})
    pairs = pairs[pairs["correction"].str.strip().ne("")]
    return Counter(pairs.groupby(["answer", "correction"], sort=False).size().to_dict())


def deleted_phrases_from(distinct, cfg: AnswerQualityConfig | None = None) -> pd.DataFrame:
    """:func:`deleted_phrases` from :func:`edit_pairs` (merged)."""
    cfg = cfg or AnswerQualityConfig()
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
    return signal_quality_from(labels, grounding, edit_score_part(edits))


def edit_score_part(edits: pd.DataFrame) -> dict:
    """Per arm and over all ("all"): the edits with a text, and the sums of their answers' BLEU and
    ROUGE-L against the text (additive over parts of a day)."""
    from vloop.learn.evaluation import sentence_bleu_rouge

    edits = edits[edits["correction"].fillna("").astype("str").str.strip().ne("")] if len(edits) else edits
    if not len(edits):
        return {}
    bleu, rouge = sentence_bleu_rouge(edits["answer"].fillna("").astype("str").tolist(),
                                      edits["correction"].astype("str").tolist())  # each edit scored once
    edits = edits.assign(bleu=bleu, rouge_l=rouge)
    out = {"all": [len(edits), float(edits["bleu"].sum()), float(edits["rouge_l"].sum())]}
    for arm, e in edits.groupby("arm", dropna=True):
        out[arm] = [len(e), float(e["bleu"].sum()), float(e["rouge_l"].sum())]
    return out


def signal_quality_from(labels: pd.DataFrame | None, grounding: dict, edit_scores: dict) -> pd.DataFrame:
    """:func:`signal_quality` with the edits' part from :func:`edit_score_part` (merged)."""
    from vloop.vlm.model import auroc

    judged = labels[labels["verdict"].isin(["correct", "wrong"])] if labels is not None and len(labels) else None
    if judged is None:
        judged = pd.DataFrame({"arm": pd.Series(dtype="str"), "request_id": pd.Series(dtype="str"),
                               "verdict": pd.Series(dtype="str"), "confidence": pd.Series(dtype="float64")})
    judged = judged.assign(grounding=judged["request_id"].map(grounding).astype("float64"),
                           right=judged["verdict"] == "correct")
    arms = sorted(set(judged["arm"].dropna()) | {a for a in edit_scores if a != "all"})
    rows = []
    for arm in ["all"] + arms:
        j = judged if arm == "all" else judged[judged["arm"] == arm]
        n, bleu, rouge = edit_scores.get(arm, [0, 0.0, 0.0])
        g, c = j.dropna(subset=["grounding"]), j.dropna(subset=["confidence"])
        rows.append({"arm": arm, "judged": len(j), "grounding_auroc": auroc(g["grounding"], g["right"]),
                     "confidence_auroc": auroc(pd.to_numeric(c["confidence"]), c["right"]), "edits": n,
                     "bleu_vs_edits": bleu / n if n else float("nan"),
                     "rouge_l_vs_edits": rouge / n if n else float("nan")})
    if not len(judged) and not edit_scores:
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
    edits = user_edits(interactions, feedback)
    errors = errors_of_the_day(interactions, feedback, labels, edits=edits)
    return {"errors": errors, "error_types": top_error_types(errors, cfg.top_types),
            "edit_length": edit_length_trend(edit_length_by_category(interactions, mined), edit_length_history, cfg),
            "deleted_phrases": deleted_phrases(edits, cfg), "signals": signal_quality(labels, grounding or {}, edits)}


def app_part(apps: pd.DataFrame, mined: pd.DataFrame) -> dict:
    """Per app (the API key's name; ``"(no key)"`` for none): requests, and how many were accepted,
    edited and negative (mined), additive over parts of a day; ``"*named"``: whether any request
    named an app. ``apps``: request_id, app."""
    df = apps.merge(mined[["request_id", "weak_label", "reason"]], on="request_id", how="left")
    out = {"*named": [int(df["app"].notna().any())]}
    for app, g in df.assign(app=df["app"].fillna("(no key)")).groupby("app"):
        out[app] = [len(g), int((g["reason"] == "accepted").sum()), int((g["reason"] == "edited").sum()),
                    int(g["weak_label"].isin(["negative", "weak_negative"]).sum())]
    return out


def apps_from(part: dict) -> pd.DataFrame:
    """Per app: requests and the shares accepted, edited and negative; empty when no request of the
    day named an app."""
    if not part.get("*named", [0])[0]:
        return pd.DataFrame(columns=["app", "requests", "accepted", "edited", "negative"])
    rows = [{"app": a, "requests": n, "accepted": acc / n, "edited": ed / n, "negative": neg / n}
            for a, (n, acc, ed, neg) in sorted((k, v) for k, v in part.items() if k != "*named")]
    return pd.DataFrame(rows)


# -- the report as a reduce over a day's slices ------------------------------------------------------
CONFIDENCE_BINS = 20  # the report's histogram of today's confidences, over [0, 1]


def confidence_counts(confidence: pd.Series) -> np.ndarray:
    """How many of ``confidence`` fall in each of CONFIDENCE_BINS equal bins over [0, 1] (additive)."""
    values = pd.to_numeric(confidence, errors="coerce").dropna().to_numpy(dtype=float)
    return np.histogram(values, bins=CONFIDENCE_BINS, range=(0, 1))[0]


def slice_counts(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame,
                 apps: pd.DataFrame | None = None, edits: pd.DataFrame | None = None) -> dict:
    """The counts of :func:`slice_part` (JSON-able): rows, and per (model_version, arm), category
    and app the counts and sums, the edits' lengths and scores. ``edits``: :func:`user_edits` of
    the slice, when the caller has it."""
    edits = user_edits(interactions, feedback) if edits is None else edits
    return {
        "interactions": len(interactions), "feedback": len(feedback),
        "traffic": [[v, a, c] for (v, a), c in traffic_counts(interactions, feedback, mined).items()],
        "categories": {str(c): [int(r.requests), int(r.errors)] for c, r in category_part(interactions, mined).iterrows()},
        "edit_length": edit_length_part(interactions, mined),
        "edit_scores": edit_score_part(edits),
        "apps": app_part(apps, mined) if apps is not None else None,
    }


def slice_part(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame,
               apps: pd.DataFrame | None = None) -> tuple[dict, pd.DataFrame]:
    """What the day's report needs of one slice that depends neither on the labels pulled on the
    report's day nor on each request's latency and confidence: its counts (:func:`slice_counts`)
    and its user edits with their error types (the ``errors`` rows before annotators' verdicts).
    The costly part of a slice's report (error types, BLEU/ROUGE, hedges), so the slice's own
    mapped task computes it (vloop.curate.daily.mine_slice) and the report adds parts up
    (:meth:`DayReport.add_part`). ``apps``: request_id, app (None: no app names)."""
    edits = user_edits(interactions, feedback)
    return (slice_counts(interactions, feedback, mined, apps, edits),
            errors_of_the_day(interactions, feedback, edits=edits))


class DayReport:
    """The daily report's figures folded in a slice of the day at a time (:meth:`add_part`, from
    each slice's :func:`slice_part`): what it keeps is partial aggregates (counts and sums per
    group, each request's latency as float32 for exact percentiles, the distinct edit pairs, the
    judged requests' answers), never the day's rows, so the report's memory follows a slice.
    :meth:`metrics`, :meth:`top_error_categories` and :meth:`answer_quality` give what
    :func:`daily_metrics`, :func:`top_error_categories` and :func:`answer_quality` give on the
    whole day (tests/test_daily_slices.py). :meth:`add_part` returns the slice's erroneous
    answers, the rows of the day's ``errors`` table (the first slice's led by the annotators'
    wrong verdicts), for the caller to store slice by slice."""

    def __init__(self, labels: pd.DataFrame | None, cfg: AnswerQualityConfig | None = None):
        from collections import Counter

        self.cfg = cfg or AnswerQualityConfig()
        self.labels = labels if labels is not None and len(labels) else None
        # Labels pulled with their own confidence and arm need nothing of the day's rows.
        self.needs_answers = self.labels is not None and "confidence" not in self.labels.columns
        no_edits = pd.DataFrame(columns=["request_id", "type", "ts", "edited_text"])
        self._label_errors = errors_of_the_day(pd.DataFrame(columns=["request_id"]), no_edits, self.labels)
        self._judged_wrong = set(self._label_errors["request_id"])  # their error row is the annotator's
        self.interactions = self.feedback = self.slices = 0
        self._traffic: dict = {}
        self._categories: pd.DataFrame | None = None
        self._types: dict = {}
        self._edit_length: dict = {}
        self._edit_scores: dict = {}
        self._pairs = Counter()
        self._apps: dict = {}
        self._answers: list[pd.DataFrame] = []
        self.confidence = np.zeros(CONFIDENCE_BINS, dtype=np.int64)

    def add_part(self, part: dict, edit_errors: pd.DataFrame, interactions: pd.DataFrame,
                 mined: pd.DataFrame | None = None) -> pd.DataFrame:
        """Fold in one slice from its :func:`slice_part` and, of its rows, what that leaves out:
        ``interactions``' request_id, adapter, arm, latency_ms and confidence, and (only when the
        labels lack their answers' confidence) ``mined``'s request_id and weak_label. Returns the
        slice's rows of the ``errors`` table."""
        first = self.slices == 0
        self.slices += 1
        self.interactions += part["interactions"]
        self.feedback += part["feedback"]
        counts = {(v, a): c for v, a, c in part["traffic"]}
        merge_traffic(self._traffic, with_latency(counts, latency_part(interactions)))
        cats = pd.DataFrame(list(part["categories"].values()), columns=["requests", "errors"], dtype="int64",
                            index=pd.Index(list(part["categories"]), dtype="str", name="category"))
        self._categories = cats if self._categories is None else pd.concat([self._categories, cats]).groupby(level=0).sum()
        merge_sums(self._edit_length, part["edit_length"])
        merge_sums(self._edit_scores, part["edit_scores"])
        self._pairs.update(edit_pairs(edit_errors))  # the edits with a text are among the errors, as they were
        self.confidence += confidence_counts(interactions["confidence"])
        if self.needs_answers:
            self._answers.append(labelled_answers(interactions, mined, self.labels))
        if part["apps"] is not None:
            merge_sums(self._apps, part["apps"])
        errors = edit_errors[~member(edit_errors["request_id"], self._judged_wrong)]
        if first and len(self._label_errors):
            errors = pd.concat([self._label_errors, errors], ignore_index=True) if len(errors) else self._label_errors
        merge_error_types(self._types, error_type_part(errors))
        return errors.reset_index(drop=True)

    def judged(self) -> pd.DataFrame | None:
        """The labels with what the judged metrics need (from the day's rows when they lack it)."""
        if not self.needs_answers:
            return self.labels
        answers = pd.concat(self._answers, ignore_index=True) if self._answers else pd.DataFrame(
            columns=["request_id", "confidence", "adapter", "arm", "weak_label"])
        return self.labels[["request_id", "verdict"]].merge(answers, on="request_id")

    def metrics(self) -> pd.DataFrame:
        return metrics_from(traffic_from(self._traffic), self.judged())

    def top_error_categories(self, k: int = 5) -> pd.DataFrame:
        counts = self._categories if self._categories is not None else pd.DataFrame(
            {"requests": pd.Series(dtype="int64"), "errors": pd.Series(dtype="int64")}).rename_axis("category")
        return top_error_categories_from(counts, k)

    def answer_quality(self, edit_length_history: pd.DataFrame, grounding: dict | None = None) -> dict[str, pd.DataFrame]:
        """:func:`answer_quality` of the day but its ``errors`` (which :meth:`add` returned)."""
        cfg = self.cfg
        return {"error_types": top_error_types_from(self._types, cfg.top_types),
                "edit_length": edit_length_trend(edit_length_from(self._edit_length), edit_length_history, cfg),
                "deleted_phrases": deleted_phrases_from(self._pairs, cfg),
                "signals": signal_quality_from(self.labels, grounding or {}, self._edit_scores)}

    def apps(self) -> pd.DataFrame:
        return apps_from(self._apps)


def png_data_url(fig) -> str:
    """A matplotlib figure as a PNG data URL, for an ``<img>`` of a self-contained page."""
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(history: pd.DataFrame, confidence: np.ndarray | pd.Series, labels: pd.DataFrame | None) -> dict[str, str]:
    """PNG data URLs: rates per arm over the recent days; today's confidence distribution
    (``confidence``: the values, or their :func:`confidence_counts`); the reliability diagram of
    the answers annotators judged today."""
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
    counts = confidence if isinstance(confidence, np.ndarray) else confidence_counts(confidence)
    axes[0].stairs(counts, np.linspace(0, 1, CONFIDENCE_BINS + 1), fill=True, color="#4a7")
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
