"""The vloop page in the Airflow UI: what the loop is doing, built from the lake.

Plain functions, testable without Airflow: :func:`page_data` gathers the serving state, the live
experiment (the same :func:`vloop.release.canary.status` that ``vloop rollout status`` prints), the rounds
(registry versions with their gate figures) and the last days' daily reports; :func:`render_page`
and :func:`render_run` make HTML of it. ``plugins/vloop_ui.py`` serves them behind Airflow's login.

The page sits in an iframe of the Airflow UI, so links that leave it open in the top window.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import urllib.parse

import pandas as pd

from vloop.store.lake import Lake, LakeKeyNotFound

DAILY_DAG, RETRAIN_DAG, CANARY_DAG = "feedback_daily", "retrain_biweekly", "canary_rollout"


def _num(x, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    # Counts arrive as floats from the frames they are summed in: a whole number shows as one.
    return str(int(x)) if float(x).is_integer() else fmt.format(x)


# -- data --------------------------------------------------------------------------------------------
def live_experiment(lake: Lake, now: dt.datetime | None = None) -> dict:
    """Serving state and, when a canary is live, its per-arm counts, each metric's difference with
    its always-valid interval (clipped to what a rate difference can be) and what a look would
    decide now. Nothing is written."""
    from vloop.release.canary import status

    st = status(lake, now=now)
    out = {k: st[k] for k in ("serving_state", "champion", "canary", "canary_share", "holdout_share", "experiment")}
    if "decision" in st:
        d = st["decision"]
        cols = [c for c in ("arm", "users", "requests", "accepted", "edited", "errors", "hours") if c in st["counts"]]
        out["arms"] = st["counts"][cols].to_dict("records")
        out["metrics"] = [{"metric": name, "champion": m.champion, "canary": m.canary, "diff": m.diff,
                           "lower": max(m.lower, -1.0), "upper": min(m.upper, 1.0)}
                          for name, m in d.metrics.items()]
        out["decision"] = {"action": d.action, "reason": d.reason}
    return out


def _run_of(reason: str) -> str | None:
    """The Airflow run id in a registry reason written by retrain_biweekly ("trained in run X")."""
    marker = "trained in run "
    return reason.split(marker, 1)[1].strip() if marker in (reason or "") else None


def rounds(lake: Lake, limit: int = 20) -> list[dict]:
    """The newest ``limit`` registered versions, newest first: status and why, the gate's figures,
    training time, held-out exact match (candidate and champion) and the run that trained it."""
    from vloop.learn.registry import Registry

    reg = Registry(lake)
    history = reg.history()
    gates, runs = {}, {}
    for e in history:
        if e.get("kind") == "gate":
            gates[e["ref"]] = {**e.get("figures", {}), "reason": e.get("reason", "")}
        elif e.get("kind") == "status" and e.get("status") == "candidate" and _run_of(e.get("reason", "")):
            runs[e["ref"]] = _run_of(e["reason"])
    state = reg.state()
    out = []
    for v in sorted(reg.versions(), key=lambda v: v.created_at, reverse=True)[:limit]:
        try:
            training = lake.get_json(v.path + "training.json")
        except LakeKeyNotFound:
            training = {}
        held = (v.metrics or {}).get("sets", {}).get("heldout", {})
        g = gates.get(v.ref, {})
        out.append({
            "ref": v.ref, "created_at": v.created_at, "dataset": v.dataset_id,
            "status": state.statuses.get(v.ref, "?"), "why": state.reasons.get(v.ref, ""),
            "gate_passed": g.get("passed"), "gate_reason": g.get("reason", ""),
            "gate_candidate": g.get("candidate"), "gate_champion": g.get("champion"),
            "gate_difference": g.get("difference"), "gate_interval": g.get("interval"), "gate_p": g.get("p"),
            "training_s": training.get("seconds"), "examples": training.get("examples"),
            "heldout_candidate": held.get("candidate", {}).get("overall", {}).get("exact_match"),
            "heldout_champion": held.get("champion", {}).get("overall", {}).get("exact_match"),
            "run_id": runs.get(v.ref),
        })
    return out


def report_days(lake: Lake, days: int = 7) -> list[str]:
    """The newest ``days`` days that have a daily report, newest first."""
    found = {k.split("dt=")[1].split("/")[0] for k in lake.list("reports/dt=") if k.endswith("/index.html")}
    return sorted(found, reverse=True)[:days]


def _frame(lake: Lake, key: str) -> pd.DataFrame:
    try:
        return lake.read_parquet(key).to_pandas()
    except LakeKeyNotFound:
        return pd.DataFrame()


def day_summary(lake: Lake, day: str) -> dict:
    """One day's report in brief: per-arm metrics, the top-5 error types over all arms, edit
    length per category, and the selection's hit rate against its audit (base) rate."""
    from vloop.curate.daily import REPORTS, key

    metrics = _frame(lake, key(REPORTS, day, "metrics.parquet"))
    types = _frame(lake, key(REPORTS, day, "error_types.parquet"))
    if len(types) and "arm" in types:
        types = types[types["arm"] == "all"].head(5)
    edits = _frame(lake, key(REPORTS, day, "edit_length.parquet"))
    sel = _frame(lake, key(REPORTS, day, "selection.parquet"))
    return {"day": day, "metrics": metrics, "error_types": types, "edit_length": edits, "selection": sel}


def report_url(lake: Lake, day: str) -> str | None:
    """A link a browser can open to the day's HTML report (presigned on S3); None on a local lake,
    whose file:// URL a page served over http cannot open (the run view shows it instead)."""
    url = lake.browser_url(f"reports/dt={day}/index.html")
    return url if url.startswith(("http://", "https://")) else None


def page_data(lake: Lake, *, days: int = 7, now: dt.datetime | None = None) -> dict:
    report = report_days(lake, days)
    loops = sorted({k for k in lake.list("reports/loop/") if k.endswith("/index.html")}, reverse=True)
    return {"live": live_experiment(lake, now), "rounds": rounds(lake),
            "days": [{**day_summary(lake, d), "url": report_url(lake, d)} for d in report],
            "loop_reports": [{"key": k, "url": lake.browser_url(k)} for k in loops[:5]]}


# -- HTML --------------------------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;margin:1rem;color:#222}
table{border-collapse:collapse;margin:.4rem 0 1rem}td,th{border:1px solid #ccc;padding:.2rem .5rem;
font-size:.85rem;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
h2{margin-top:1.5rem;border-bottom:1px solid #ddd}.promote{color:#070}.rollback{color:#a00}
.muted{color:#777}"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(rows: list[dict], cols: list[str] | None = None, left: tuple[str, ...] = ()) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    cols = cols or list(rows[0])
    head = "".join(f'<th class="{"l" if c in left else ""}">{_e(c)}</th>' for c in cols)
    body = "".join("<tr>" + "".join(
        f'<td class="{"l" if c in left else ""}">{r.get(c) if c.endswith("_html") else _e(_num(r.get(c)))}</td>'
        for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _frame_table(df: pd.DataFrame, cols: list[str] | None = None) -> str:
    if df is None or not len(df):
        return '<p class="muted">none</p>'
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]
    return _table(df[cols].to_dict("records"), cols, left=tuple(c for c in cols if df[c].dtype == object))


def run_link(base: str, dag_id: str, run_id: str | None, text: str | None = None) -> str:
    if not run_id:
        return ""
    href = f"{base.rstrip('/')}/dags/{urllib.parse.quote(dag_id)}/runs/{urllib.parse.quote(run_id, safe='')}"
    return f'<a target="_top" href="{_e(href)}">{_e(text or run_id)}</a>'


def _live_html(live: dict) -> str:
    exp = live.get("experiment") or {}
    parts = [f"<p>serving state #{_e(live['serving_state'])}: champion <b>{_e(live['champion'])}</b>, canary "
             f"<b>{_e(live['canary'] or '–')}</b> at {live['canary_share']:.0%}, holdout {live['holdout_share']:.0%}"]
    if exp:
        parts.append(f"; experiment {_e(exp.get('id'))}, stage {exp.get('stage', 0) + 1}/{len(exp.get('stages', []))} "
                     f"(shares {', '.join(f'{s:.0%}' for s in exp.get('stages', []))}), "
                     f"stage began {_e(exp.get('stage_started_at', '?'))}")
    parts.append("</p>")
    if "decision" not in live:
        parts.append('<p class="muted">no live experiment</p>')
        return "".join(parts)
    parts.append(_table(live["arms"], left=("arm",)))
    if not live["metrics"]:
        parts.append('<p class="muted">no traffic in this stage yet: no always-valid interval to show</p>')
    rows = [{**m, "interval (always-valid)": f"[{m['lower']:+.3f}, {m['upper']:+.3f}]"} for m in live["metrics"]]
    parts.append(_table(rows, ["metric", "champion", "canary", "diff", "interval (always-valid)"], left=("metric",)))
    d = live["decision"]
    parts.append(f'<p>a look now would decide: <b class="{_e(d["action"])}">{_e(d["action"])}</b> — {_e(d["reason"])}</p>')
    return "".join(parts)


def _rounds_html(rows: list[dict], base: str) -> str:
    out = []
    for r in rows:
        interval = r["gate_interval"]
        out.append({**r, "gate": ("passed" if r["gate_passed"] else "failed") if r["gate_passed"] is not None else "–",
                    "gate interval": f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "–",
                    "run_html": run_link(base, RETRAIN_DAG, r["run_id"], "run") if r["run_id"] else ""})
    cols = ["ref", "created_at", "status", "why", "gate", "gate_candidate", "gate_champion", "gate_difference",
            "gate interval", "gate_p", "training_s", "examples", "heldout_candidate", "heldout_champion", "run_html"]
    return _table(out, cols, left=("ref", "created_at", "status", "why", "gate"))


def _day_html(d: dict, base: str, report_href: str | None) -> str:
    links = [f'<a href="{_e(report_href)}">report</a>'] if report_href else []
    if d.get("url"):
        links.append(f'<a target="_blank" href="{_e(d["url"])}">report in the lake (presigned)</a>')
    sel = d["selection"]
    hit = ""
    if len(sel) and "hit_rate" in sel:
        last = sel.iloc[-1]
        hit = (f"<p>selection on {_e(last['selected_on'])}: hit rate {_num(last['hit_rate'])} vs audit base rate "
               f"{_num(last.get('base_rate'))} ({_num(last.get('priority_judged'), '{}')} judged)</p>")
    return (f"<h3>{_e(d['day'])} {' · '.join(links)}</h3>"
            + _frame_table(d["metrics"], ["model_version", "arm", "requests", "acceptance_rate", "edit_rate",
                                          "mean_edit_ratio", "latency_p95_ms", "judged", "human_accuracy", "ece"])
            + "<p>top error types (all arms)</p>" + _frame_table(d["error_types"], ["rank", "error_type", "errors", "share"])
            + "<p>edit length per category</p>" + _frame_table(d["edit_length"]) + hit)


def render_page(data: dict, *, airflow_base: str = "/", self_base: str = "/vloop") -> str:
    """The whole page. ``airflow_base``: the UI's root (links to runs); ``self_base``: where the
    plugin app is mounted (links to its report route)."""
    days = "".join(_day_html(d, airflow_base, f"{self_base}/reports/{d['day']}") for d in data["days"])
    loops = "".join(f'<li><a target="_blank" href="{_e(x["url"])}">{_e(x["key"])}</a></li>'
                    for x in data["loop_reports"] if x["url"].startswith(("http://", "https://")))
    dags = " · ".join(f'<a target="_top" href="{_e(airflow_base.rstrip("/"))}/dags/{d}">{d}</a>'
                      for d in (DAILY_DAG, RETRAIN_DAG, CANARY_DAG))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vloop</title><style>{STYLE}</style></head>"
            f"<body><h1>vloop</h1><p>DAGs: {dags}</p>"
            f"<h2>Serving and the live experiment</h2>{_live_html(data['live'])}"
            f"<h2>Rounds</h2>{_rounds_html(data['rounds'], airflow_base)}"
            f"<h2>Daily reports</h2>{days or '<p class=muted>no daily report yet</p>'}"
            + (f"<h2>Loop reports</h2><ul>{loops}</ul>" if loops else "") + "</body></html>")


def render_run(lake: Lake, dag_id: str, run_id: str, day: str | None, *, airflow_base: str = "/") -> str:
    """A run's view: feedback_daily's daily report for the run's ``day``; retrain_biweekly's rounds
    that this run trained (with the gate's verdict), or why there is none."""
    if dag_id == DAILY_DAG and day:
        try:
            return lake.get_bytes(f"reports/dt={day}/index.html").decode()
        except LakeKeyNotFound:
            body = f"<p>no report for {_e(day)} yet: the run's report task has not written it</p>"
    elif dag_id == RETRAIN_DAG:
        mine = [r for r in rounds(lake, limit=10_000) if r["run_id"] == run_id]
        body = (_rounds_html(mine, airflow_base) if mine else
                "<p>this run registered no adapter (skipped before training, or failed; see its note and logs)</p>")
    else:
        body = f"<p>vloop has no view for {_e(dag_id)} runs</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>"
            f"<h2>{_e(dag_id)} · {_e(run_id)}</h2>{body}</body></html>")


def run_day(conf: dict | None, data_interval_start: dt.datetime | None) -> str | None:
    """The day a feedback_daily run processes, as the DAG decides it: its ``day`` param, else its
    data interval's start (UTC)."""
    if conf and conf.get("day"):
        return dt.date.fromisoformat(str(conf["day"])).isoformat()
    if data_interval_start is None:
        return None
    return data_interval_start.astimezone(dt.timezone.utc).date().isoformat()
