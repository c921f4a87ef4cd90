"""The decisions of the biweekly retraining: whether there is enough to learn from, whether the
candidate is good enough to serve, and putting it in front of users as a canary.

The training itself runs as ``python -m training`` (its own process or container, see
:mod:`training.job`); these functions are what the ``retrain_biweekly`` DAG calls around it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from vloop.curate import daily
from vloop.store.lake import Lake
from vloop.learn.registry import Registry


@dataclass
class GateConfig:
    set_name: str = "golden"  # the set the decision is made on
    metric: str = "exact_match"
    margin: float = 0.02  # the candidate must beat the champion by at least this much overall
    category_tolerance: float = 0.05  # and lose no category by more than this
    alpha: float = 0.05  # and be better on the same items at this significance (McNemar, one-sided)


def labels_since_last_training(lake: Lake, registry: Registry) -> tuple[int, str | None]:
    """Labels (correct/wrong verdicts) pulled after the newest registered adapter was created."""
    versions = registry.versions()
    since = max((v.created_at for v in versions), default=None)
    lab = daily.read_days(lake, daily.LABELED, daily.LABELED_FILE)
    if not len(lab):
        return 0, since
    lab = lab[lab["verdict"].isin(["correct", "wrong"])]
    if since:
        lab = lab[lab["dt"] > since[:10]]
    return len(lab), since


def mcnemar_exact_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the candidate is better: P(X >= b) for
    X ~ Binomial(b + c, 1/2), where ``b`` items only the candidate got right and ``c`` only the
    champion. 1.0 without discordant items."""
    m = b + c
    if m == 0:
        return 1.0
    return min(1.0, sum(math.comb(m, k) for k in range(b, m + 1)) / 2 ** m)


def wilson_interval(x: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion ``x / n`` (95% by default); NaNs when ``n`` is 0."""
    if not n:
        return float("nan"), float("nan")
    p = x / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(a: int, b: int, c: int, d: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (by default) interval for p_candidate - p_champion on paired items: Newcombe's hybrid
    score interval for paired proportions (Newcombe 1998, method 10). ``a`` both right, ``b`` only
    the candidate, ``c`` only the champion, ``d`` neither."""
    n = a + b + c + d
    if n == 0:
        return float("nan"), float("nan")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c  # the correlation of the two proportions, continuity-adjusted as Newcombe's
    cross = cross - n / 2 if cross > n / 2 else (0 if cross >= 0 else cross)
    phi = cross / math.sqrt(den) if den else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, p1 - p2 - delta), min(1.0, p1 - p2 + eps)


def _paired(metrics: dict, set_name: str) -> dict | None:
    """The per-item results of ``set_name`` (``metrics["paired"][set_name]``, or
    ``metrics["sets"][set_name]["paired"]``), or None."""
    p = (metrics.get("paired") or {}).get(set_name) or metrics.get("sets", {}).get(set_name, {}).get("paired")
    return p if isinstance(p, dict) and "candidate_correct" in p and "champion_correct" in p else None


def gate_decision(metrics: dict, cfg: GateConfig | None = None) -> dict:
    """The offline gate on a candidate's ``metrics.json`` (see :func:`training.job.evaluate`), as a
    JSON-able dict: ``passed``, ``reason``, and the figures behind them — ``n`` paired items,
    ``b`` (only the candidate right), ``c`` (only the champion right), ``candidate`` and
    ``champion`` exact match, ``difference`` and its 95% ``interval``, ``p``, ``alpha``,
    ``margin``, ``regressions`` (categories that dropped beyond the tolerance).

    The candidate passes when, on the same items of ``cfg.set_name``, all three hold:

    1. it beats the champion's ``cfg.metric`` by at least ``cfg.margin`` (point estimate);
    2. McNemar's exact test, one-sided (H0: both are right equally often; H1: the candidate more
       often), rejects at ``cfg.alpha``: conditional on the ``b + c`` discordant items, ``b`` is
       Binomial(b + c, 1/2) under H0, and p = P(X >= b). The test is exact and conservative, so a
       candidate no better than the champion passes this step with probability at most
       ``cfg.alpha`` (5% by default), whatever the accuracy of the two models and the correlation
       of their errors; requiring the margin as well only lowers that rate;
    3. no category (``by_category``) loses more than ``cfg.category_tolerance``.

    The interval reported is Newcombe's score interval for a paired difference (95%); it is
    information, the decision is the test. Metrics without per-item results (a ``metrics.json``
    written before they were kept) fail: there is nothing to test.
    """
    cfg = cfg or GateConfig()
    out = {"passed": False, "reason": "", "set": cfg.set_name, "metric": cfg.metric, "test": "mcnemar-exact-one-sided",
           "alpha": cfg.alpha, "margin": cfg.margin, "n": 0, "b": None, "c": None, "candidate": None,
           "champion": None, "difference": None, "interval": None, "p": None, "regressions": []}
    sets = metrics.get("sets", {})
    if cfg.set_name not in sets:
        return {**out, "reason": f"no {cfg.set_name} evaluation in the metrics"}
    paired = _paired(metrics, cfg.set_name)
    if paired is None:
        return {**out, "reason": f"no per-item results for {cfg.set_name} in the metrics (evaluated before they "
                                 f"were kept?): the paired test cannot run; re-run the evaluate stage"}
    cand_ok = [bool(x) for x in paired["candidate_correct"]]
    champ_ok = [bool(x) for x in paired["champion_correct"]]
    ids = paired.get("example_id")
    if len(cand_ok) != len(champ_ok) or (ids is not None and len(ids) != len(cand_ok)):
        return {**out, "reason": f"per-item results for {cfg.set_name} do not line up "
                                 f"({len(cand_ok)} candidate, {len(champ_ok)} champion items)"}
    n = len(cand_ok)
    if n == 0:
        return {**out, "reason": f"no paired items in {cfg.set_name}: nothing to decide on"}
    a = sum(x and y for x, y in zip(cand_ok, champ_ok))
    b = sum(x and not y for x, y in zip(cand_ok, champ_ok))
    c = sum(y and not x for x, y in zip(cand_ok, champ_ok))
    d = n - a - b - c
    em_c, em_h = (a + b) / n, (a + c) / n
    lo, hi = paired_difference_interval(a, b, c, d)
    p = mcnemar_exact_p(b, c)
    out.update(n=n, b=b, c=c, candidate=round(em_c, 6), champion=round(em_h, 6), difference=round(em_c - em_h, 6),
               interval=[round(lo, 6), round(hi, 6)], p=p)
    stats = (f"{cfg.set_name} exact match {em_c:.3f} vs champion {em_h:.3f} on n={n} paired items: "
             f"difference {em_c - em_h:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}); discordant b={b} only the candidate "
             f"right, c={c} only the champion; McNemar exact one-sided p={p:.3g} (alpha {cfg.alpha:.3f})")

    cand, champ = sets[cfg.set_name]["candidate"], sets[cfg.set_name]["champion"]
    if cfg.metric == "exact_match":
        mc, mh = em_c, em_h
    else:
        mc, mh = cand["overall"][cfg.metric], champ["overall"][cfg.metric]
    if mc < mh + cfg.margin:
        return {**out, "reason": f"{cfg.set_name} {cfg.metric} {mc:.3f} does not beat the champion's {mh:.3f} by the "
                                 f"margin {cfg.margin:.3f}; {stats}"}
    if p > cfg.alpha:
        return {**out, "reason": f"not significant: the difference may be noise of the {n} items; {stats}"}
    worse = []
    for cat, m in champ.get("by_category", {}).items():
        cm = cand.get("by_category", {}).get(cat, {}).get(cfg.metric)
        if cm is not None and cm < m[cfg.metric] - cfg.category_tolerance:
            worse.append(f"{cat} {cm:.3f} < {m[cfg.metric]:.3f}")
    if worse:
        return {**out, "regressions": worse,
                "reason": f"regresses beyond {cfg.category_tolerance:.3f} in: " + ", ".join(worse) + f"; {stats}"}
    return {**out, "passed": True,
            "reason": f"passed: {stats}; margin {cfg.margin:.3f} met; no category regressed beyond "
                      f"{cfg.category_tolerance:.3f}"}


def gate(metrics: dict, cfg: GateConfig | None = None) -> tuple[bool, str]:
    """(passed, reason) of :func:`gate_decision`: the candidate beats the champion by the margin,
    significantly on the same items (McNemar's exact test, one-sided, false-pass rate at most
    ``cfg.alpha``), and regresses no category."""
    d = gate_decision(metrics, cfg)
    return d["passed"], d["reason"]


def deploy_canary(lake: Lake, ref: str, *, actor: str, reason: str, serving_url: str | None = None,
                  token: str | None = None, cfg=None, timeout: float = 120, now: dt.datetime | None = None) -> dict:
    """Put ``ref`` in front of users as the canary of a new experiment (:func:`vloop.release.canary.start`:
    the registry's serving state, which every replica follows). With ``serving_url``, that replica
    applies it at once (``POST /admin/reconcile``) so a version it cannot load fails the deploy
    here, and the canary is taken off again with the reason; the champion is untouched either way.

    While another canary's experiment runs, ``ref`` is queued instead of dropped: it waits in the
    registry as ``approved`` and ``canary_rollout`` starts it when that experiment ends; the answer
    is then ``{"queued": True, "ref": ..., "live": <the running canary>}``."""
    import httpx

    from vloop.release import canary

    registry = Registry(lake)
    head = registry.serving_state()
    if head.canary and head.canary != ref:
        if registry.state().statuses.get(ref) != "approved":
            registry.set_status(ref, "approved", actor=actor, reason=reason)
        return {"queued": True, "ref": ref, "live": head.canary, "seq": head.seq}
    # Already the canary: canary_rollout started it from the queue (or a retry): check it loads.
    state = head if head.canary == ref else canary.start(registry, ref, actor=actor, reason=reason, cfg=cfg, now=now)
    if not serving_url:
        return {"seq": state.seq, "canary": ref, "canary_share": state.canary_share}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=serving_url.rstrip("/"), headers=headers, timeout=timeout) as http:
            r = http.post("/admin/reconcile")
    except httpx.HTTPError as e:  # serving is down: the state stands, replicas apply it when they are back
        raise RuntimeError(f"canary {ref} is in the registry, but serving at {serving_url} is unreachable "
                           f"({e}); replicas load it at their next reconciliation") from e
    if 400 <= r.status_code < 500:  # serving refused the adapter: take it off again
        failure = f"{r.status_code} {r.text[:300]}"
        registry.update_serving({"canary": None, "canary_share": 0.0, "experiment": None}, actor=actor,
                                reason=f"deploy failed, canary taken off: {failure}", retire_as="rejected",
                                expected_seq=state.seq)
        raise RuntimeError(f"serving could not load canary {ref}: {failure}; the champion is untouched")
    r.raise_for_status()
    return r.json()


NOTE_MAX = 1000  # Airflow keeps a run's note in a 1000-character column


def _figures(decision: dict) -> str:
    """The gate's figures in one line: exact match of both, the difference and its interval, p, n."""
    if any(decision.get(k) is None for k in ("candidate", "champion", "difference", "p", "n")):
        return decision.get("reason") or "no figures"
    lo, hi = decision.get("interval") or (float("nan"), float("nan"))
    out = (f"{decision.get('set', 'golden')} exact match {decision['candidate']:.3f} vs champion "
           f"{decision['champion']:.3f} ({decision['difference']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}; "
           f"McNemar p={decision['p']:.3g}, n={decision['n']})")
    if decision.get("golden_version") is not None:
        out += f", golden v{decision['golden_version']}"
    return out


def _why_rejected(decision: dict) -> str:
    if decision.get("candidate") is None or decision.get("p") is None:
        return decision.get("reason", "")
    if decision.get("regressions"):
        return "regresses " + ", ".join(decision["regressions"])
    if decision["difference"] < decision.get("margin", 0):
        return f"below the {decision.get('margin', 0):.3f} margin"
    if decision["p"] > decision.get("alpha", 0.05):
        return f"not significant at {decision.get('alpha', 0.05):.3f}"
    return decision.get("reason", "")


def run_note(*, labels: dict | None = None, registered: dict | None = None, deployed: dict | None = None,
             failed: list[str] | None = None) -> str:
    """The note a ``retrain_biweekly`` run carries in Airflow's UI (its DAG run ``note``), so a
    rejected candidate does not hide behind a green run:

    * ``skipped: only N new labels (needs M)`` — ``labels`` is check_labels' ``{"new_labels",
      "needed"}`` and there were too few;
    * ``rejected: <figures> — <why>; <ref>`` — ``registered`` (the register task's result: the gate's
      decision plus ``ref``) did not pass;
    * ``promoted to canary: <ref> at <share>: <figures>`` — it passed and ``deployed`` (deploy_canary's
      result) put it in front of users; ``approved, queued behind <live>: ...`` when another canary
      ran; ``approved: ...`` when it passed but was not deployed;
    * ``failed at <task ids>`` — ``failed`` names tasks that failed first.
    At most :data:`NOTE_MAX` characters."""
    if labels and labels.get("needed") is not None and labels["new_labels"] < labels["needed"]:
        note = f"skipped: only {labels['new_labels']} new labels (needs {labels['needed']})"
    elif registered is not None and not registered.get("passed"):
        why = _why_rejected(registered)
        note = f"rejected: {_figures(registered)}" + (f" — {why}" if why else "") + f"; {registered.get('ref', '')}"
    elif registered is not None:
        if deployed and deployed.get("queued"):
            note = f"approved, queued behind canary {deployed['live']}: {registered['ref']}; {_figures(registered)}"
        elif deployed:
            share = deployed.get("canary_share")
            note = (f"promoted to canary: {registered['ref']}" + (f" at {share:.0%}" if share is not None else "")
                    + f"; {_figures(registered)}")
        else:
            note = f"approved (not deployed): {registered['ref']}; {_figures(registered)}"
        if failed:
            note += f"; failed at {', '.join(failed)}"
    elif failed:
        note = f"failed at {', '.join(failed)}: see the task log; the champion is untouched"
    else:
        note = "no decision: the run ended before the gate"
    return note if len(note) <= NOTE_MAX else note[:NOTE_MAX - 1] + "…"


def patch_run_note(api_url: str, dag_id: str, run_id: str, note: str, *, username: str | None = None,
                   password: str | None = None, token: str | None = None, timeout: float = 30) -> dict:
    """Set a DAG run's note through Airflow's public REST API (``PATCH
    /api/v2/dags/{dag_id}/dagRuns/{run_id}``, ``update_mask=note``): Airflow 3's Task SDK lets a
    task read its run's note but not write it, and the public API is the supported writer. The
    bearer token is ``token``, or one from ``POST /auth/token`` with ``username`` and ``password``
    (the auth manager's user; it needs edit access to the DAG's runs). Returns the run as the API
    answers it."""
    import urllib.parse

    import httpx

    with httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout) as http:
        if token is None:
            r = http.post("/auth/token", json={"username": username, "password": password})
            if r.status_code >= 400:
                raise RuntimeError(f"Airflow API at {api_url} refused the login of {username!r}: {r.status_code}")
            token = r.json()["access_token"]
        quote = lambda x: urllib.parse.quote(x, safe="")  # noqa: E731
        r = http.patch(f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}", params={"update_mask": "note"},
                       json={"note": note}, headers={"Authorization": f"Bearer {token}"})
        if r.status_code >= 400:
            raise RuntimeError(f"Airflow API at {api_url} did not set the note of {dag_id}/{run_id}: "
                               f"{r.status_code} {r.text[:300]}")
        return r.json()


def today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


def run_streaming(cmd: list[str], env: dict | None = None, echo=print) -> tuple[int, str]:
    """Run ``cmd``; return (exit code, its stdout). Its stderr (progress, library warnings) is
    echoed line by line as it comes through ``echo`` — in an Airflow task, ``print`` lands in the
    task log at info level, where a child's raw stderr would be logged as errors. Third-party
    FutureWarnings are shown once per place rather than at every call (``PYTHONWARNINGS``)."""
    import os

    from vloop import services

    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONWARNINGS", "once::FutureWarning")
    return services.run_streaming(cmd, env=env, echo=echo)
