"""A person's approval before a canary becomes champion.

Airflow Variable ``vloop_promotion_approval``: ``auto`` (the default) — ``canary_rollout`` promotes
at the last stage on its own, as it always did; ``manual`` — a look that decides *promote* at the
last stage does not move the champion alias. It records a **pending promotion** in the serving
state's experiment (``experiment["pending_promotion"]``: the request id, the look that asked, its
reason), and the look starts the ``promotion_approval`` DAG, whose human-in-the-loop task asks a
person, with :func:`promotion_body` as the request's text (one run per request: :func:`run_id_of`);
``canary_rollout`` goes on looking every hour meanwhile. The answer is carried out by :func:`settle`:

* **Approve** — the canary becomes champion (the old champion retired, still loadable);
* **Reject** — the canary is rolled back (rejected), the person's name and comment the reason;
* **Keep at current share** — the champion stays, the canary keeps its share and its stage starts
  again (a fresh always-valid sequence; a new request comes after ``min_hours`` at the earliest);
* **no answer** within ``vloop_promotion_approval_timeout_hours`` (default 24) — the same as Keep:
  a canary is never promoted without a person (:data:`ON_TIMEOUT`).

Every answer is a registry event of kind :data:`EVENT` naming the person (``responded_by``), also
an answer that came after the request was settled (``applied: false``). While a promotion is
pending, no look promotes, whatever the mode; a look that calls for a rollback or a halt still
acts (it ends the experiment and with it the request). ``vloop rollout approve|reject`` settles
the request from a terminal (:func:`settle` with ``via="terminal"``); the ``promotion_approval``
run then still waits, and its answer, or Keep at its timeout, changes nothing (``applied: false``).

Storing the request in the serving state makes its answer race-free: settling writes the next
serving state conditionally on the one that holds the request, so of two answers at once (the
UI and a terminal) one applies and the other finds nothing pending.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the promotion_approval DAG reads OPTIONS when it is parsed
    import pandas as pd

    from vloop.learn.registry import Registry, ServingState
    from vloop.store.lake import Lake

MODES = ("auto", "manual")
APPROVE, REJECT, KEEP = "Approve", "Reject", "Keep at current share"
OPTIONS = (APPROVE, REJECT, KEEP)
ON_TIMEOUT = KEEP  # the HITL task's defaults: never promote without a person
DEFAULT_TIMEOUT_HOURS = 24.0
PENDING = "pending_promotion"  # key of the request in the serving state's experiment
EVENT = "promotion_approval"  # registry event of every answer
REQUESTED = "promotion_requested"  # registry event of every request
_CHOICES = {"approve": APPROVE, "reject": REJECT, "keep": KEEP, APPROVE.lower(): APPROVE, REJECT.lower(): REJECT,
            KEEP.lower(): KEEP}


class NothingPending(ValueError):
    """No promotion awaits a person's answer (or not the one the answer was for)."""


def run_id_of(request_id: str) -> str:
    """The ``promotion_approval`` DAG run that asks for the request ``request_id``: derived from
    the id, so a request is asked once (a second trigger for it conflicts), in the characters
    Airflow allows in a run id."""
    return "promotion__" + re.sub(r"[^A-Za-z0-9_.~:+-]", "_", request_id).replace("..", "_")


def parse_mode(text: str | None) -> str:
    """Variable ``vloop_promotion_approval``: ``auto`` (default) or ``manual``."""
    mode = (text or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"vloop_promotion_approval must be one of {', '.join(MODES)}, got {text!r}")
    return mode


def parse_timeout_hours(text) -> float:
    """Variable ``vloop_promotion_approval_timeout_hours``: hours (> 0) a request waits; default 24."""
    if text is None or str(text).strip() == "":
        return DEFAULT_TIMEOUT_HOURS
    try:
        hours = float(text)
    except ValueError:
        raise ValueError(f"vloop_promotion_approval_timeout_hours must be a number of hours, got {text!r}") from None
    if not hours > 0 or not math.isfinite(hours):
        raise ValueError(f"vloop_promotion_approval_timeout_hours must be > 0, got {text!r}")
    return hours


def parse_users(text: str | None) -> list[dict[str, str]] | None:
    """Variable ``vloop_promotion_approvers``: comma-separated Airflow user ids that may answer (as
    ``assigned_users`` of the HITL task); empty = anyone allowed to act on the DAG's runs."""
    users = [u.strip() for u in (text or "").split(",") if u.strip()]
    return [{"id": u, "name": u} for u in users] or None


def choice_of(text: str) -> str:
    """``approve`` / ``reject`` / ``keep`` (or an option's label) → the option."""
    try:
        return _CHOICES[str(text).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown answer {text!r}; use one of {', '.join(OPTIONS)}") from None


def pending(state: ServingState) -> dict | None:
    """The promotion request awaiting an answer in ``state``, or None."""
    if state.canary and state.experiment:
        return state.experiment.get(PENDING)
    return None


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat()


def request_promotion(registry: Registry, state: ServingState, decision, counts: pd.DataFrame, look_key: str, *,
                      figures: dict, alpha: float, actor: str, now: dt.datetime) -> ServingState:
    """Record that the look ``look_key`` decided to promote the canary at the last stage and a
    person must answer first (called by :func:`vloop.release.canary.step` in manual mode)."""
    exp = state.experiment
    latency = {}
    if counts is not None and "latency_p95_ms" in counts:
        for arm, v in zip(counts["arm"], counts["latency_p95_ms"]):
            latency[str(arm)] = float(v) if v is not None and math.isfinite(float(v)) else None
    req = {"id": f"{exp['id']}@{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%S}", "requested_at": _iso(now),
           "requested_by": actor, "look": look_key, "reason": decision.reason, "alpha": alpha,
           "latency_p95_ms": latency}
    why = f"promotion of {state.canary} to champion awaits a person's approval: {decision.reason}"
    new = registry.update_serving({"experiment": {**exp, PENDING: req}}, actor=actor, reason=why,
                                  expected_seq=state.seq, figures=figures)
    registry.record(REQUESTED, {"ref": state.canary, "experiment": exp["id"], "request": req["id"], "seq": new.seq},
                    actor=actor, reason=why)
    return new


@dataclass
class Settled:
    choice: str  # Approve / Reject / Keep at current share
    applied: bool  # False: nothing (or another request) was pending when the answer came
    responded_by: str | None  # None: no answer within the timeout
    state: ServingState
    message: str
    started: str | None = None  # the approved version started from the queue after the experiment ended

    @property
    def action(self) -> str:
        if not self.applied:
            return "nothing pending"
        return {APPROVE: "promoted", REJECT: "rolled_back"}.get(self.choice, "kept")

    @property
    def summary(self) -> dict:
        out = {"action": self.action, "choice": self.choice, "responded_by": self.responded_by, "seq": self.state.seq,
               "champion": self.state.champion, "canary": self.state.canary,
               "canary_share": self.state.canary_share, "message": self.message}
        if self.started:
            out["started"] = self.started
        return out


def settle(lake: Lake, choice: str, *, by: str | None, comment: str | None = None, via: str = "airflow",
           request_id: str | None = None, timeout_hours: float | None = None, now: dt.datetime | None = None,
           cfg=None) -> Settled:
    """Carry out a person's answer to the pending promotion (``by``: their user name; None = no
    answer within ``timeout_hours``, which can only keep). ``request_id``: the request the answer
    was given to; another one pending is refused. Raises :class:`NothingPending` when none is."""
    from vloop.learn.registry import Registry
    from vloop.release import canary
    from vloop.store.lake import LakeKeyNotFound

    choice = choice_of(choice)
    comment = (comment or "").strip() or None
    by = (by or "").strip() or None
    if by is None and choice == APPROVE:
        raise ValueError("a promotion needs a person: an approval without a name is refused")
    now = now or dt.datetime.now(dt.timezone.utc)
    registry = Registry(lake)
    state = registry.serving_state()
    req = pending(state)
    if req is None:
        raise NothingPending(f"no promotion is pending (serving state #{state.seq}: champion "
                             f"{state.champion or 'base'}, canary {state.canary or '-'})")
    if request_id is not None and req["id"] != request_id:
        raise NothingPending(f"the request {request_id} was settled; {req['id']} is pending now")
    exp, ref = state.experiment, state.canary
    said = f": {comment}" if comment else ""
    actor = by or "canary_rollout (no answer)"
    off = {"canary": None, "canary_share": 0.0, "experiment": None}
    if choice == APPROVE:
        try:
            figures = {k: v for k, v in lake.get_json(req["look"]).items() if k in ("decision", "counts")}
        except LakeKeyNotFound:
            figures = None
        reason = f"promoted to champion, approved by {by}{said} (the look: {req['reason']})"
        new = registry.update_serving({"champion": ref, **off}, actor=actor, reason=reason, expected_seq=state.seq,
                                      figures=figures)
    elif choice == REJECT:
        reason = f"rolled back: promotion rejected by {by or 'nobody (no answer)'}{said or ' (no comment given)'}"
        new = registry.update_serving(off, actor=actor, reason=reason, expected_seq=state.seq, retire_as="rejected")
    else:
        rest = {k: v for k, v in exp.items() if k != PENDING}
        again = f"{ref} stays at {state.canary_share:.0%} and its stage starts again"
        if by is None:
            hours = f" within {timeout_hours:g} h" if timeout_hours else ""
            reason = f"no answer{hours}: the champion {state.champion or 'base'} is kept, {again}"
        else:
            reason = f"kept at the current share by {by}{said}: the champion {state.champion or 'base'} is kept, " \
                     f"{again}"
        new = registry.update_serving({"experiment": {**rest, "stage_started_at": _iso(now)}}, actor=actor,
                                      reason=reason, expected_seq=state.seq)
    registry.record(EVENT, {"ref": ref, "experiment": exp["id"], "request": req["id"], "choice": choice,
                            "responded_by": by, "comment": comment, "via": via, "applied": True, "seq": new.seq},
                    actor=actor, reason=reason)
    canary._drop_counts(lake, exp)  # ended, or its stage starts afresh
    started = None
    if choice in (APPROVE, REJECT):
        nxt = canary.start_next(registry, actor=actor, cfg=cfg, now=now)
        if nxt is not None:
            new, started = nxt, nxt.canary
    return Settled(choice, True, by, new, reason, started)


def settle_answer(lake: Lake, answer: dict | None, *, request_id: str | None, timeout_hours: float | None = None,
                  now: dt.datetime | None = None, cfg=None) -> Settled:
    """The HITL task's result (``chosen_options``, ``params_input``, ``responded_by_user``; the user
    None when the defaults were applied on timeout) → :func:`settle`. An answer to a request that
    was meanwhile settled (from a terminal, say) changes nothing and is recorded as such."""
    from vloop.learn.registry import Registry

    answer = answer or {}
    chosen = list(answer.get("chosen_options") or [ON_TIMEOUT])
    user = answer.get("responded_by_user") or None
    by = (user.get("name") or user.get("id")) if user else None
    comment = (answer.get("params_input") or {}).get("comment")
    choice = choice_of(chosen[0])
    if by is None and choice == APPROVE:  # defaults never approve, but fail safe whatever the DAG says
        choice = ON_TIMEOUT
    from vloop.learn.registry import RegistryConflict

    try:
        try:
            return settle(lake, choice, by=by, comment=comment, via="airflow", request_id=request_id,
                          timeout_hours=timeout_hours, now=now, cfg=cfg)
        except RegistryConflict:  # another writer (a terminal answer, a look) moved the state: read it again
            return settle(lake, choice, by=by, comment=comment, via="airflow", request_id=request_id,
                          timeout_hours=timeout_hours, now=now, cfg=cfg)
    except NothingPending as e:
        registry = Registry(lake)
        why = f"answer not applied: {e}"
        registry.record(EVENT, {"ref": None, "request": request_id, "choice": choice, "responded_by": by,
                                "comment": (comment or "").strip() or None, "via": "airflow", "applied": False},
                        actor=by or "canary_rollout (no answer)", reason=why)
        return Settled(choice, False, by, registry.serving_state(), why)


# -- the request's text ------------------------------------------------------------------------------

def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value, fmt: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def gate_figures(registry: Registry, ref: str) -> dict | None:
    """The offline gate of ``ref``'s round (the newest ``gate`` event): its figures and reason."""
    found = None
    for e in registry.history():
        if e.get("kind") == "gate" and e.get("ref") == ref:
            found = {**(e.get("figures") or {}), "reason": e.get("reason", "")}
    return found


def error_types_by_arm(lake: Lake, state: ServingState, now: dt.datetime | None = None, k: int = 3,
                       max_days: int = 14) -> dict[str, pd.DataFrame]:
    """Per arm, the ``k`` most frequent error types of the answers its model gave during the
    experiment: from the daily reports' ``errors.parquet`` (edited or labelled-wrong answers) of
    the experiment's days, only rows of that arm answered by that arm's model. Empty when no
    report covers the experiment yet."""
    import pandas as pd

    from vloop.curate.daily import REPORTS, read_days
    from vloop.curate.report import BASE_VERSION

    exp = state.experiment or {}
    now = now or dt.datetime.now(dt.timezone.utc)
    first = dt.datetime.fromisoformat(exp.get("started_at") or _iso(now)).date()
    last = now.astimezone(dt.timezone.utc).date()
    days = [last - dt.timedelta(days=i) for i in range(max(0, min((last - first).days, max_days - 1)) + 1)]
    errors = read_days(lake, REPORTS, "errors.parquet", days=sorted(days))
    out = {}
    for arm, ref in (("champion", state.champion or BASE_VERSION), ("canary", state.canary)):
        if not len(errors) or not {"arm", "model_version", "error_types"} <= set(errors.columns):
            out[arm] = pd.DataFrame(columns=["error_type", "errors", "share"])
            continue
        g = errors[(errors["arm"] == arm) & (errors["model_version"] == ref)]
        types = g["error_types"].fillna("other").str.split("; ").explode()
        counts = types.value_counts().sort_index().sort_values(ascending=False, kind="stable").head(k)
        out[arm] = pd.DataFrame({"error_type": counts.index.astype(str), "errors": counts.to_numpy(dtype=int),
                                 "share": counts.to_numpy(dtype=float) / max(len(g), 1)})
    return out


def promotion_body(lake: Lake, state: ServingState | None = None, *, timeout_hours: float = DEFAULT_TIMEOUT_HOURS,
                   now: dt.datetime | None = None) -> str:
    """The request's text (Markdown) for the person who answers: the experiment's figures per arm,
    each metric's difference with its always-valid interval, the gate's figures of the candidate's
    round, the top error types of each arm when a daily report has them, and what each answer does."""
    from vloop.learn.registry import Registry
    from vloop.store.lake import LakeKeyNotFound

    registry = Registry(lake)
    state = state or registry.serving_state()
    req = pending(state)
    if req is None:
        raise NothingPending("no promotion is pending")
    exp = state.experiment
    try:
        look = lake.get_json(req["look"])
    except LakeKeyNotFound:
        look = {"at": req["requested_at"], "decision": {"reason": req["reason"], "metrics": {}}, "counts": []}
    d = look["decision"]
    stages = exp.get("stages") or []
    champ = state.champion or "base"
    lines = [
        f"### Promote `{state.canary}` to champion?",
        "",
        f"The look of {look['at']} decided **promote** at the last stage: {d.get('reason', req['reason'])}",
        "",
        f"* champion now: `{champ}`; canary `{state.canary}` at {state.canary_share:.0%} of the users",
        f"* experiment `{exp['id']}`, started {exp.get('started_at')}; stage {exp.get('stage', 0) + 1}/{len(stages)} "
        f"(shares {', '.join(f'{x:.0%}' for x in stages)}) began {exp.get('stage_started_at')}, "
        f"{_num(d.get('hours'), '.1f')} h analysed",
        f"* request `{req['id']}`",
        "",
        "#### Arms (the current stage)",
        "",
        "| arm | users | requests | accepted | edited | errors | p95 latency (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    latency = req.get("latency_p95_ms") or {}
    for c in look.get("counts") or []:
        lines.append(f"| {c['arm']} | {c['users']} | {c['requests']} | {c['accepted']} | {c['edited']} | "
                     f"{c.get('errors', '–')} | {_num(latency.get(c['arm']), '.0f')} |")
    alpha = req.get("alpha")
    lines += ["", "#### Metrics: canary − champion, always-valid interval"
              + (f" (α = {alpha:g} over both metrics, valid at every look)" if alpha else ""), "",
              "| metric | champion | canary | difference | interval | verdict |", "|---|---:|---:|---:|---|---|"]
    for name, m in (d.get("metrics") or {}).items():
        verdict = "better" if m.get("better") else "worse" if m.get("worse") else "no significant difference"
        lo, hi = m.get("lower"), m.get("upper")
        # A difference of two rates lies in [-1, 1]; the interval's far side can overshoot.
        interval = "–" if lo is None or hi is None else f"[{max(lo, -1.0):+.3f}, {min(hi, 1.0):+.3f}]"
        lines.append(f"| {name} | {_num(m.get('champion'))} | {_num(m.get('canary'))} | "
                     f"{_num(m.get('diff'), '+.3f')} | {interval} | {verdict} |")
    if d.get("srm_p") is not None:
        lines += ["", f"Sample-ratio check: p = {d['srm_p']:.3g} (the split of users matches the configured share)."]
    gate = gate_figures(registry, state.canary)
    lines += ["", "#### The offline gate of the candidate's round", ""]
    if gate is None:
        lines.append("No gate record for this version in the registry.")
    else:
        iv = gate.get("interval")
        cells = [_cell(gate.get("set", "–")), _cell(gate.get("metric", "–")), _num(gate.get("candidate")),
                 _num(gate.get("champion")), _num(gate.get("difference"), "+.3f"),
                 f"[{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "–", _num(gate.get("p"), ".3g"),
                 f"{gate.get('n', '–')} ({gate.get('b', '–')}, {gate.get('c', '–')})",
                 "yes" if gate.get("passed") else "no"]
        lines += ["| set | metric | candidate | champion | difference | 95% interval | p | n (b, c) | passed |",
                  "|---|---|---:|---:|---:|---|---:|---|---|", "| " + " | ".join(cells) + " |",
                  "", f"_{_cell(gate.get('reason', ''))}_"]
    lines += ["", "#### Top error types per arm (the daily reports of the experiment's days)", ""]
    try:
        by_arm = error_types_by_arm(lake, state, now)
    except Exception as e:  # the request must not fail for want of a report
        by_arm, lines = {}, lines + [f"Not available: {_cell(e)}"]
    if by_arm and not any(len(t) for t in by_arm.values()):
        lines.append("No daily report covers the experiment's days yet.")
    elif by_arm:
        lines += ["| arm | model | error type | erroneous answers | share of the arm's |", "|---|---|---|---:|---:|"]
        for arm, t in by_arm.items():
            model = champ if arm == "champion" else state.canary
            if not len(t):
                lines.append(f"| {arm} | `{model}` | none recorded | 0 | – |")
            for r in t.itertuples():
                lines.append(f"| {arm} | `{model}` | {_cell(r.error_type)} | {r.errors} | {r.share:.0%} |")
    lines += ["", "#### Your answer", "",
              f"* **{APPROVE}** — `{state.canary}` becomes the champion (`{champ}` is retired, still loadable);",
              f"* **{REJECT}** — the canary is rolled back (rejected); your name and comment are the reason;",
              f"* **{KEEP}** — `{champ}` stays champion, the canary stays at {state.canary_share:.0%} and its stage "
              "starts again (a new request once it has enough evidence again);",
              f"* no answer within {timeout_hours:g} h — the same as *{KEEP}*: nothing is promoted without a person.",
              "", "Every answer is kept in the registry's history with your name."]
    return "\n".join(lines)
