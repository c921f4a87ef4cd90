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

from dataclasses import dataclass

import pandas as pd


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
    """Levenshtein distance (characters), O(len(a) * len(b)) with two rows."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def mine(interactions: pd.DataFrame, feedback: pd.DataFrame, rules: MiningRules | None = None) -> pd.DataFrame:
    """One row per interaction: request_id, weak_label, weight, reason, edit_distance, edit_ratio."""
    rules = rules or MiningRules()
    by_req = {rid: g.sort_values("ts") for rid, g in feedback.groupby("request_id")} if len(feedback) else {}
    # Repeats: the same question again in the same session shortly after.
    repeated = set()
    if len(interactions):
        srt = interactions.dropna(subset=["session_id"]).sort_values("ts")
        for _, g in srt.groupby(["session_id", "question"]):
            ts = g["ts"].tolist()
            ids = g["request_id"].tolist()
            for k in range(len(ts) - 1):
                if (ts[k + 1] - ts[k]).total_seconds() <= rules.repeat_window_s:
                    repeated.add(ids[k])
    rows = []
    for r in interactions.itertuples(index=False):
        ev = by_req.get(r.request_id)
        types = set(ev["type"]) if ev is not None else set()
        label, weight, reason, dist, ratio = "unknown", 0.0, "no reaction", None, None
        if "edit" in types:
            edited = ev[ev["type"] == "edit"].iloc[-1]["edited_text"] or ""
            answer = r.answer or ""
            dist = edit_distance(answer, edited)
            ratio = dist / max(1, len(answer), len(edited))
            label, weight, reason = "negative", rules.edit_weight, "edited"
        elif "regenerate" in types or r.request_id in repeated:
            label, weight = "negative", rules.regenerate_weight
            reason = "regenerated" if "regenerate" in types else "question repeated in the session"
        elif "rating" in types and ev[ev["type"] == "rating"]["rating"].notna().any():
            rating = int(ev[ev["type"] == "rating"]["rating"].dropna().iloc[-1])
            if rating <= rules.bad_rating:
                label, weight, reason = "negative", rules.rating_weight, f"rated {rating}"
            elif rating >= rules.good_rating:
                label, weight, reason = "positive", rules.rating_weight, f"rated {rating}"
        elif "accept" in types:
            label, weight, reason = "positive", rules.accept_weight, "accepted"
        elif "close" in types:
            first_close = ev[ev["type"] == "close"]["ts"].iloc[0]
            if (first_close - r.ts).total_seconds() <= rules.quick_close_s:
                label, weight, reason = "weak_negative", rules.quick_close_weight, "closed quickly"
        elif "dwell" in types:
            dwell = ev[ev["type"] == "dwell"]["dwell_ms"].max()
            if dwell >= rules.long_dwell_ms:
                reason = "long dwell, no action"
        rows.append({"request_id": r.request_id, "weak_label": label, "weight": weight, "reason": reason,
                     "edit_distance": dist, "edit_ratio": ratio})
    return pd.DataFrame(rows, columns=["request_id", "weak_label", "weight", "reason", "edit_distance", "edit_ratio"])
