"""Implicit feedback: a weak label and a weight per interaction, from what the user did next.

Rules (configurable in :class:`MiningRules`; the first that applies wins):

| reaction | label | weight |
|---|---|---|
| edit (with corrected text) | ``negative`` (+ edit distance and edit ratio) | ``edit_weight`` |
| regenerate, or the same question again in the session within ``repeat_window_s`` | ``negative`` | ``regenerate_weight`` |
| rating ≤ ``bad_rating`` / ≥ ``good_rating`` | ``negative`` / ``positive`` | ``rating_weight`` |
| accept | ``positive`` | ``accept_weight`` |
| close within ``quick_close_s`` of the answer | ``weak_negative`` | ``quick_close_weight`` |
| dwell ≥ ``long_dwell_ms`` and nothing else | ``unknown`` | 0 |
| nothing | ``unknown`` | 0 |
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from vloop.store.frames import member


@dataclass
class MiningRules:
    repeat_window_s: float = 300.0
    quick_close_s: float = 5.0
    long_dwell_ms: int = 15_000
    bad_rating: int = 2
    good_rating: int = 4
    edit_weight: float = 1.0
    regenerate_weight: float = 0.7
    rating_weight: float = 0.8
    accept_weight: float = 0.6
    quick_close_weight: float = 0.3


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


MINED_COLUMNS = ["request_id", "weak_label", "weight", "reason", "edit_distance", "edit_ratio"]
WEAK_LABELS = ("positive", "negative", "weak_negative", "unknown")


def empty_mined() -> pd.DataFrame:
    """What :func:`mine` returns for a day without interactions: no rows, typed columns."""
    return pd.DataFrame({"request_id": pd.Series(dtype="str"), "weak_label": pd.Series(dtype="str"),
                         "weight": pd.Series(dtype="float64"), "reason": pd.Series(dtype="str"),
                         "edit_distance": pd.Series(dtype="Int64"), "edit_ratio": pd.Series(dtype="float64")},
                        columns=MINED_COLUMNS)


def repeated_requests(interactions: pd.DataFrame, window_s: float) -> pd.Series:
    """True for a request whose question the same session asked again within ``window_s``."""
    df = interactions[["session_id", "question", "ts"]].copy()
    df["ts"] = pd.to_datetime(df["ts"], utc=True)
    df = df.dropna(subset=["session_id"]).sort_values(["session_id", "question", "ts"])
    nxt = df.shift(-1)
    rep = ((nxt["session_id"] == df["session_id"]) & (nxt["question"] == df["question"])
           & ((nxt["ts"] - df["ts"]).dt.total_seconds() <= window_s))
    return rep.reindex(interactions.index, fill_value=False)


def mine(interactions: pd.DataFrame, feedback: pd.DataFrame, rules: MiningRules | None = None,
         later: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per interaction: request_id, weak_label, weight, reason, edit_distance, edit_ratio.

    Vectorised (a million interactions take seconds): per-request facts from the events first,
    then the rules applied in order with the first match winning. ``later`` (``session_id``,
    ``question``, ``ts``) are requests just after these (the next slices' first minutes, when a
    day is mined a slice at a time): they are not mined, but a question asked again among them
    counts as repeated, as it would over the whole day."""
    rules = rules or MiningRules()
    inter = interactions.reset_index(drop=True)
    if not len(inter):  # a day without traffic: no rows, the same columns
        return empty_mined()
    n, rid = len(inter), inter["request_id"]
    # Each event's row in ``inter`` (one hash lookup), then per-request facts by position. A day
    # with interactions but no feedback (or none about them) still has the ``_pos`` column.
    if len(feedback):
        fb = feedback.sort_values("ts", kind="stable")
        pos = pd.Index(rid.astype(object)).get_indexer(fb["request_id"].astype(object))
        fb = fb.assign(_pos=pos)[pos >= 0]
    else:
        fb = pd.DataFrame({"_pos": np.array([], dtype=np.int64), "type": np.array([], dtype=object)})
    types = fb["type"].to_numpy(dtype=object)

    def present(kind: str) -> pd.Series:
        out = np.zeros(n, dtype=bool)
        out[fb["_pos"].to_numpy()[types == kind]] = True
        return pd.Series(out)

    def per_request(kind: str, column: str, how: str) -> pd.Series:
        ev = fb[types == kind] if len(fb) else fb
        if kind == "rating" and len(ev):
            ev = ev[ev["rating"].notna()]
        if not len(ev):
            return pd.Series([None] * n, dtype=object)
        return getattr(ev.groupby("_pos")[column], how)().reindex(range(n))

    edited = per_request("edit", "edited_text", "last")
    has = {k: present(k) for k in ("edit", "regenerate", "accept", "close", "dwell")}
    rating = pd.to_numeric(per_request("rating", "rating", "last"), errors="coerce")
    first_close = pd.to_datetime(per_request("close", "ts", "min"), utc=True)
    dwell = pd.to_numeric(per_request("dwell", "dwell_ms", "max"), errors="coerce")
    cols = ["session_id", "question", "ts"]
    asked = inter[cols] if later is None or not len(later) else \
        pd.concat([inter[cols], later[cols]], ignore_index=True)
    repeated = repeated_requests(asked, rules.repeat_window_s).iloc[:n]
    quick_close = (first_close - pd.to_datetime(inter["ts"], utc=True)).dt.total_seconds() <= rules.quick_close_s

    conditions = [
        (has["edit"], "negative", rules.edit_weight, "edited"),
        (has["regenerate"], "negative", rules.regenerate_weight, "regenerated"),
        (repeated, "negative", rules.regenerate_weight, "question repeated in the session"),
        (rating <= rules.bad_rating, "negative", rules.rating_weight, None),
        (rating >= rules.good_rating, "positive", rules.rating_weight, None),
        (has["accept"], "positive", rules.accept_weight, "accepted"),
        (has["close"] & quick_close, "weak_negative", rules.quick_close_weight, "closed quickly"),
        (has["close"], "unknown", 0.0, "no reaction"),  # a slow close says nothing
        (has["dwell"] & (dwell >= rules.long_dwell_ms), "unknown", 0.0, "long dwell, no action"),
    ]
    label = np.full(len(inter), "unknown", dtype=object)
    weight = np.zeros(len(inter))
    reason = np.full(len(inter), "no reaction", dtype=object)
    decided = np.zeros(len(inter), dtype=bool)
    rating_text = "rated " + rating.fillna(0).astype(int).astype(str)
    for cond, lab, w, why in conditions:
        m = cond.fillna(False).to_numpy(dtype=bool) & ~decided
        label[m], weight[m] = lab, w
        reason[m] = rating_text[m] if why is None else why
        decided |= m
    dist = np.full(len(inter), np.nan)
    ratio = np.full(len(inter), np.nan)
    e = has["edit"].to_numpy()
    if e.any():
        from rapidfuzz.distance import Levenshtein

        answers = inter.loc[e, "answer"].fillna("").tolist()
        fixes = edited[e].fillna("").tolist()
        d = np.array([Levenshtein.distance(a, b) for a, b in zip(answers, fixes)], dtype=float)
        dist[e] = d
        ratio[e] = d / np.maximum.reduce([np.ones(len(d)), [len(a) for a in answers], [len(b) for b in fixes]])
    return pd.DataFrame({"request_id": rid, "weak_label": label, "weight": weight, "reason": reason,
                         "edit_distance": pd.array(np.where(np.isnan(dist), None, dist), dtype="Int64"),
                         "edit_ratio": ratio}, columns=MINED_COLUMNS)


# -- users' phrasings, for the paraphrase template library ----------------------------------------

@dataclass
class PhrasingRules:
    """Which questions become candidate templates (see :func:`mine_phrasings`)."""
    reasons: tuple = ("edited", "regenerated", "question repeated in the session")
    max_chars: int = 80  # a template is a short question, not a story
    similarity: float = 90.0  # rapidfuzz ratio (0-100) above which two phrasings are one cluster
    max_phrasings: int = 2000  # most frequent normalised phrasings clustered per day (bounded cost)
    intents: tuple = ("colour", "category", "count")  # intents whose questions carry no specifics


PHRASING_COLUMNS = {"intent": "str", "lang": "str", "phrasing": "str", "asked": "int64", "users": "int64",
                    "variants": "str", "request_ids": "object"}
# The day's phrasings as stored: request_ids (the requests each cluster's wordings came from) is a
# list, so an erasure can find the clusters a user's wording is in and rebuild them without it.
PHRASING_ARROW = pa.schema([("intent", pa.string()), ("lang", pa.string()), ("phrasing", pa.string()),
                            ("asked", pa.int64()), ("users", pa.int64()), ("variants", pa.string()),
                            ("request_ids", pa.list_(pa.string()))])


def language_of(text: str) -> str:
    """The language of a phrasing, as the paraphrase library keys it: zh with Chinese characters, else en."""
    import re

    return "zh" if re.search(r"[\u3400-\u9fff]", text) else "en"


PHRASING_CANDIDATE_COLUMNS = {"intent": "str", "key": "str", "question": "str", "user_key": "str",
                              "request_id": "str", "asked": "int64"}


def phrasing_candidates(interactions: pd.DataFrame, mined: pd.DataFrame, rules: PhrasingRules | None = None
                        ) -> pd.DataFrame:
    """The questions :func:`mine_phrasings` clusters, counted per (intent, normalised key,
    wording, user): small, and additive, so the hours of a day can each count theirs and
    :func:`cluster_phrasings` of their concatenation is the day's result."""
    from vloop.learn.evaluation import intent_of
    from vloop.curate.selection import normalise_question

    rules = rules or PhrasingRules()
    empty = pd.DataFrame(columns=list(PHRASING_CANDIDATE_COLUMNS)).astype(PHRASING_CANDIDATE_COLUMNS)
    if not len(interactions) or not len(mined):
        return empty
    bad = mined.loc[mined["reason"].isin(rules.reasons), "request_id"]
    df = interactions.loc[member(interactions["request_id"], bad), ["question", "user_key", "request_id"]] \
        .dropna(subset=["question"])
    q = df["question"].astype("str").str.strip()
    df = df[(q.str.len() <= rules.max_chars) & ~q.str.contains(r"[\d\[\]]", regex=True)].assign(question=q)
    if not len(df):
        return empty
    # Each distinct wording classified and normalised once: a day asks the same questions a great many times.
    wordings = df["question"].unique()
    df["intent"] = df["question"].map(dict(zip(wordings, map(intent_of, wordings))))
    df = df[df["intent"].isin(rules.intents)]
    wordings = df["question"].unique()
    df["key"] = df["question"].map(dict(zip(wordings, map(normalise_question, wordings))))
    df["user_key"] = df["user_key"].fillna("")
    out = df.groupby(["intent", "key", "question", "user_key", "request_id"]).size().rename("asked").reset_index()
    return out[list(PHRASING_CANDIDATE_COLUMNS)].astype(PHRASING_CANDIDATE_COLUMNS)


def cluster_phrasings(candidates: pd.DataFrame, rules: PhrasingRules | None = None) -> pd.DataFrame:
    """Cluster :func:`phrasing_candidates` (of a day, or of its slices concatenated) into the table
    :func:`mine_phrasings` describes."""
    return cluster_phrasing_parts(lambda: [candidates], rules)


def cluster_phrasing_parts(parts: Callable[[], Iterable[pd.DataFrame]], rules: PhrasingRules | None = None
                           ) -> pd.DataFrame:
    """:func:`cluster_phrasings` of the concatenation of what ``parts()`` yields (a day's slices'
    candidates), in two passes over the parts without holding them: the first counts each wording
    (distinct (key, question) pairs), which decides the clusters; the second collects the clusters'
    users, wordings and request ids."""
    from rapidfuzz import fuzz

    rules = rules or PhrasingRules()
    wordings = None
    for c in parts():  # pass 1: how often each wording was asked
        if len(c):
            w = c.groupby(["key", "question"]).agg(n=("asked", "sum"), intent=("intent", "first"))
            wordings = w if wordings is None else pd.concat([wordings, w]).groupby(level=[0, 1]).agg(
                n=("n", "sum"), intent=("intent", "first"))
    if wordings is None:
        return pd.DataFrame(columns=list(PHRASING_COLUMNS)).astype(PHRASING_COLUMNS)
    wordings = wordings.reset_index()
    # A key's name is its commonest wording (ties: the first in sort order, so every split agrees).
    top = wordings.sort_values(["key", "n", "question"], ascending=[True, False, True]).drop_duplicates("key")
    per_key = top.set_index("key")[["question", "intent"]].rename(columns={"question": "phrasing"})
    per_key["asked"] = wordings.groupby("key")["n"].sum()
    per_key = per_key.sort_values(["asked"], ascending=False, kind="stable").head(rules.max_phrasings)
    clusters: list[dict] = []
    for key, r in per_key.iterrows():  # most frequent first: a cluster is named by its commonest wording
        home = next((c for c in clusters if c["intent"] == r["intent"]
                     and fuzz.ratio(key, c["key"]) >= rules.similarity), None)
        if home is None:
            clusters.append({"key": key, "intent": r["intent"], "phrasing": r["phrasing"], "keys": [key],
                             "questions": set()})
        else:
            home["keys"].append(key)
    home_of = {k: i for i, c in enumerate(clusters) for k in c["keys"]}
    # Pass 2: the clusters' counts, wordings, users and requests. A day's candidates can be a
    # million rows (4M requests): each request id is kept once, in its cluster's list (the output),
    # and users as 64-bit hashes, not in Python sets (~250 bytes a request more).
    asked = np.zeros(len(clusters), dtype=np.int64)
    users = []
    ids_of: list[list[str]] = [[] for _ in clusters]
    for c in parts():
        if not len(c):
            continue
        if "request_id" not in c:  # slices mined before candidates kept their request ids
            c = c.assign(request_id="")
        where = c["key"].map(home_of)
        mine = where.notna().to_numpy()
        g, at = c[mine], where[mine].to_numpy(dtype=np.int64)
        np.add.at(asked, at, g["asked"].to_numpy(dtype=np.int64))
        pairs = pd.DataFrame({"c": at, "q": g["question"].to_numpy(dtype=object)}).drop_duplicates()
        for i, q in pairs.itertuples(index=False):
            clusters[i]["questions"].add(q)
        named = (g["user_key"] != "").fillna(False).to_numpy(dtype=bool)
        # Two of a million users share a hash with probability ~3e-8.
        users.append(pd.DataFrame({"c": at[named],
                                   "user": pd.util.hash_array(g["user_key"].to_numpy(dtype=object)[named])}))
        rid = g["request_id"]
        real = (rid.notna() & (rid.astype(str) != "")).fillna(False).to_numpy(dtype=bool)
        pairs = pd.DataFrame({"c": at[real], "r": rid[real].astype(str).to_numpy(dtype=object)}).drop_duplicates()
        for i, part in pairs.groupby("c")["r"]:
            ids_of[i].extend(part.tolist())
    n_users = np.zeros(len(clusters), dtype=np.int64)
    if users:
        u = pd.concat(users, ignore_index=True).drop_duplicates()
        n_users = np.bincount(u["c"].to_numpy(dtype=np.int64), minlength=len(clusters))
    for ids in ids_of:  # distinct and sorted, as a set made them (a request is in one slice)
        ids.sort()
        if any(a == b for a, b in zip(ids, ids[1:])):
            ids[:] = sorted(set(ids))
    rows = [{"intent": c["intent"], "lang": language_of(c["phrasing"]), "phrasing": c["phrasing"],
             "asked": int(asked[i]), "users": int(n_users[i]),
             "variants": " | ".join(sorted(c["questions"] - {c["phrasing"]})[:5]),
             "request_ids": ids_of[i]} for i, c in enumerate(clusters)]
    return pd.DataFrame(rows, columns=list(PHRASING_COLUMNS)).astype(PHRASING_COLUMNS)


def mine_phrasings(interactions: pd.DataFrame, mined: pd.DataFrame, rules: PhrasingRules | None = None
                   ) -> pd.DataFrame:
    """Users' own phrasings of the questions the model handled badly (edited, regenerated or
    asked again), clustered: one row per cluster with its intent, language, most common wording,
    how often it was asked and by how many users, and the variants merged into it.

    Clustering is simple on purpose: questions are normalised (case, punctuation, spacing), then
    a phrasing joins the first more frequent cluster it is at least ``similarity`` similar to.
    Only short questions of template intents are kept, and none with digits or a redaction
    placeholder (``[PHONE]``): a template must not carry anything of a user's."""
    return cluster_phrasings(phrasing_candidates(interactions, mined, rules), rules)
