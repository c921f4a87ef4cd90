"""Daily metrics per model version and arm, from the day's interactions, mined feedback and the
annotators' verdicts.

Per (base_model, adapter, arm): requests, acceptance rate, edit rate, mean edit ratio, repeat
(re-ask/regenerate) rate, p50/p95 latency; where humans judged answers: the expected calibration
error of confidence against their verdicts, and how often the implicit label agreed with them.
Separately, the five categories with the most negative outcomes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


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


def daily_metrics(interactions: pd.DataFrame, feedback: pd.DataFrame, mined: pd.DataFrame,
                  verdicts: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (base_model, adapter, arm). ``verdicts``: request_id, verdict (correct/wrong/unclear)."""
    df = interactions.merge(mined[["request_id", "weak_label", "reason", "edit_ratio"]], on="request_id", how="left")
    types = feedback.groupby("request_id")["type"].agg(set) if len(feedback) else pd.Series(dtype=object)
    df["types"] = df["request_id"].map(types).apply(lambda t: t if isinstance(t, set) else set())
    if verdicts is not None and len(verdicts):
        df = df.merge(verdicts[["request_id", "verdict"]], on="request_id", how="left")
    else:
        df["verdict"] = None
    df["adapter"] = df["adapter"].fillna("(base)")
    rows = []
    for (base, adapter, arm), g in df.groupby(["base_model", "adapter", "arm"], dropna=False):
        judged = g[g["verdict"].isin(["correct", "wrong"])]
        implicit = judged[judged["weak_label"].isin(["positive", "negative", "weak_negative"])]
        agree = ((implicit["weak_label"] == "positive") == (implicit["verdict"] == "correct")).mean() \
            if len(implicit) else float("nan")
        lat = g["latency_ms"].dropna()
        rows.append({
            "base_model": base, "adapter": adapter, "arm": arm, "requests": len(g),
            "acceptance_rate": g["types"].apply(lambda t: "accept" in t).mean(),
            "edit_rate": g["types"].apply(lambda t: "edit" in t).mean(),
            "mean_edit_ratio": g["edit_ratio"].dropna().mean() if g["edit_ratio"].notna().any() else float("nan"),
            "repeat_rate": g["reason"].isin(["regenerated", "question repeated in the session"]).mean(),
            "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
            "judged": len(judged),
            "ece": expected_calibration_error(judged["confidence"], judged["verdict"] == "correct")
            if len(judged) else float("nan"),
            "implicit_agreement": agree,
        })
    return pd.DataFrame(rows)


def top_error_categories(interactions: pd.DataFrame, mined: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    df = interactions.merge(mined[["request_id", "weak_label"]], on="request_id", how="left")
    df["bad"] = df["weak_label"].isin(["negative", "weak_negative"])
    g = df.groupby("category").agg(requests=("request_id", "size"), errors=("bad", "sum"))
    g["error_rate"] = g["errors"] / g["requests"]
    return g.sort_values(["errors", "error_rate"], ascending=False).head(k).reset_index()
