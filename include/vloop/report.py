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

import numpy as np
import pandas as pd

from vloop.frames import member


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
                 "latency_p50_ms": "float64", "latency_p95_ms": "float64"}
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


def _png(fig) -> str:
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
    out["history"] = _png(fig)
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
    out["calibration"] = _png(fig)
    plt.close(fig)
    return out


def experiment_plot(looks: pd.DataFrame) -> str | None:
    """The live and recent canary experiments, look by look (``vloop.canary.looks``): per metric,
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
    out = _png(fig)
    plt.close(fig)
    return out


def render_html(day: str, metrics: pd.DataFrame, top_errors: pd.DataFrame, summary: dict,
                images: dict[str, str]) -> str:
    """The daily report as one self-contained HTML page (plots embedded)."""
    import html

    def table(df: pd.DataFrame) -> str:
        return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–", border=0,
                          classes="t") if len(df) else "<p>none</p>"

    experiment = "" if not images.get("experiment") else (
        "<h2>Canary experiments</h2><p>" + html.escape(summary.get("experiment", "")) + "</p>"
        f'<img alt="per-arm rates and the always-valid interval of their difference, look by look" '
        f'src="{images["experiment"]}">')
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
</body></html>"""
