"""The release of a new adapter: start a canary, look at it every hour, widen it stage by stage,
promote it to champion or roll it back; and the manual rollback.

The decision itself is :func:`vloop.rollout.decide` (always-valid statistics, sample-ratio check,
guardrails). This module feeds it and carries out what it says, on the registry's serving state
(:class:`vloop.registry.ServingState`), which every serving replica reconciles from:

* :func:`start` — a candidate becomes the canary at the first stage's share, in a new experiment
  with its own salt (so each experiment draws other users);
* :func:`arm_counts` — per-arm users, requests, accepts, edits, errors, p95 latency and per-user
  moments since the current stage began, from the lake's raw interactions and feedback (the same
  outcome definition as the daily report: :func:`vloop.report.outcome_flags`);
* :func:`step` — one look: counts → decide → act. Promote widens to the next stage (restarting the
  sequence: only the steady period of a stage is analysed); past the last stage the champion alias
  moves and the old champion is retired, still loadable. Rollback takes the canary off (rejected).
  Halt changes nothing and is recorded. Every look is stored under ``rollout/<experiment>/looks/``
  and every action is a registry event carrying the figures that decided it;
* :func:`rollback` — the manual one: end the canary, or restore an earlier champion.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vloop.lake import FEEDBACK_DATASET, Lake
from vloop.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.registry import Registry, RegistryError, ServingState
from vloop.rollout import Decision, RolloutPolicy, decide
from vloop.schema import FEEDBACK, INTERACTION

log = logging.getLogger(__name__)

ROLLOUT = "rollout"
ARMS_COMPARED = ("champion", "canary")


@dataclass
class ReleaseConfig:
    stages: tuple[float, ...] = (0.10, 0.50, 1.0)  # canary shares; reaching 1.0 = champion
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)
    # Only the steady period of a stage is analysed: replicas apply a new split within their
    # reconcile interval, and requests answered meanwhile still carry the old one.
    settle: dt.timedelta = dt.timedelta(minutes=5)


def parse_stages(text: str | None) -> tuple[float, ...]:
    """Stages written as "0.1,0.5,1.0": increasing canary shares, the last one 1.0 (champion)."""
    try:
        stages = tuple(float(x) for x in str(text or "0.1,0.5,1.0").split(","))
    except ValueError:
        raise ValueError(f"stages must be numbers like 0.1,0.5,1.0, got {text!r}") from None
    if any(not 0 < x <= 1 for x in stages) or list(stages) != sorted(set(stages)) or stages[-1] != 1.0:
        raise ValueError(f"stages must be increasing shares in (0, 1] ending at 1.0, got {text!r}")
    return stages


def config_from_params(p: dict) -> ReleaseConfig:
    """The canary_rollout DAG's params (alpha, min_hours, min_requests, max_hours, mixture_sd). The
    stages belong to each experiment, fixed when it starts (Variable ``vloop_rollout_stages``)."""
    known = {k: p[k] for k in ("alpha", "min_hours", "min_requests", "max_hours", "mixture_sd") if p.get(k) is not None}
    return ReleaseConfig(policy=RolloutPolicy(**known))


def simulated_now(value: str | None) -> dt.datetime | None:
    """A simulated clock for a look (the demo's simulated days); refused outside simulation mode,
    so production always decides on the real time."""
    from vloop.config import load_settings

    if not value:
        return None
    if not load_settings().simulation:
        raise ValueError("a simulated clock ('now') is honoured only in simulation mode (VLOOP_SIMULATION=1)")
    t = dt.datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat()


def start(registry: Registry, ref: str, *, actor: str, reason: str, cfg: ReleaseConfig | None = None,
          now: dt.datetime | None = None, holdout_share: float | None = None, replace: bool = False) -> ServingState:
    """Make ``ref`` the canary at the first stage, in a new experiment. Refused while another
    canary's experiment runs (unless ``replace``), and for the champion or a rejected version."""
    cfg = cfg or ReleaseConfig()
    now = now or _now()
    head = registry.serving_state()
    if head.canary and not replace:
        raise RegistryError(f"{head.canary} is still the live canary ({head.canary_share:.0%}); its experiment "
                            "must end first (canary_rollout decides, or `vloop rollout rollback`)")
    if ref == head.champion:
        raise RegistryError(f"{ref} is already the champion")
    known = registry.state()
    if known.statuses.get(ref) == "rejected":
        raise RegistryError(f"{ref} was rejected ({known.reasons.get(ref)}); train a new version")
    experiment = {"id": f"exp-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", "salt": secrets.token_hex(8),
                  "canary": ref, "stages": list(cfg.stages), "stage": 0, "started_at": _iso(now),
                  "stage_started_at": _iso(now)}
    changes = {"canary": ref, "canary_share": cfg.stages[0], "experiment": experiment}
    if holdout_share is not None:
        changes["holdout_share"] = holdout_share
    return registry.update_serving(changes, actor=actor, reason=f"canary at {cfg.stages[0]:.0%}: {reason}",
                                   expected_seq=head.seq)


def _window(state: ServingState, now: dt.datetime, settle: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    begun = dt.datetime.fromisoformat(state.experiment["stage_started_at"]) + settle
    return begun, max(now, begun)


def arm_counts(lake: Lake, state: ServingState, now: dt.datetime | None = None,
               settle: dt.timedelta = ReleaseConfig.settle) -> pd.DataFrame:
    """One row per arm (champion, canary) of the traffic since the current stage settled: the input
    of :func:`vloop.rollout.decide`, with the per-user moments its cluster-robust variance uses.
    Only requests answered by the arm's own adapter count (a request routed before a change of
    routes reached a replica belongs to no arm of this stage)."""
    from vloop.report import outcome_flags

    now = now or _now()
    begun, end = _window(state, now, settle)
    hours = (end - begun).total_seconds() / 3600
    cols = ["request_id", "ts", "user_key", "adapter", "arm", "status", "latency_ms"]
    inter = lake.read_partitions(INTERACTIONS, begun.date(), end.date(), columns=cols,
                                 schema=INTERACTION.arrow).to_pandas()
    ts = pd.to_datetime(inter["ts"], utc=True)
    inter = inter[(ts >= pd.Timestamp(begun)) & (ts <= pd.Timestamp(end)) & inter["arm"].isin(ARMS_COMPARED)]
    want = {"champion": state.champion, "canary": state.canary}
    own = [want[a] == (ad if isinstance(ad, str) else None) for a, ad in zip(inter["arm"], inter["adapter"])]
    inter = inter[np.array(own, dtype=bool)]
    fb = lake.read_partitions(FEEDBACK_DATASET, begun.date(), end.date(), columns=["request_id", "ts", "type"],
                              schema=FEEDBACK.arrow).to_pandas()
    fb = fb[pd.to_datetime(fb["ts"], utc=True) <= pd.Timestamp(end)]
    flags = outcome_flags(inter[["request_id"]], fb)
    df = inter.merge(flags, on="request_id", how="left")
    df[["accepted", "edited"]] = df[["accepted", "edited"]].fillna(False).astype(int)
    df["error"] = (df["status"] == "error").astype(int)
    rows = []
    for arm in ARMS_COMPARED:
        g = df[df["arm"] == arm]
        per_user = g.groupby("user_key", observed=True).agg(n=("request_id", "size"), a=("accepted", "sum"),
                                                            e=("edited", "sum"))
        n, a, e = (per_user[c].to_numpy(dtype=float) for c in ("n", "a", "e"))
        lat = g.loc[g["status"] == "ok", "latency_ms"].dropna()
        rows.append({"arm": arm, "users": len(per_user), "requests": len(g), "accepted": int(a.sum()),
                     "edited": int(e.sum()), "errors": int(g["error"].sum()), "hours": hours,
                     "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
                     "requests_sq": float((n * n).sum()), "accepted_sq": float((a * a).sum()),
                     "edited_sq": float((e * e).sum()), "accepted_x_requests": float((a * n).sum()),
                     "edited_x_requests": float((e * n).sum())})
    return pd.DataFrame(rows)


@dataclass
class StepResult:
    action: str  # skipped / continue / widened / promoted / rolled_back / retired / halted
    decision: Decision | None
    state: ServingState
    counts: pd.DataFrame | None = None

    @property
    def summary(self) -> dict:
        out = {"action": self.action, "seq": self.state.seq, "champion": self.state.champion,
               "canary": self.state.canary, "canary_share": self.state.canary_share}
        if self.decision is not None:
            out["reason"] = self.decision.reason
        return out


def _figures(decision: Decision, counts: pd.DataFrame) -> dict:
    return {"decision": decision.to_dict(),
            "counts": counts[["arm", "users", "requests", "accepted", "edited", "errors", "hours"]].to_dict("records")}


def step(lake: Lake, cfg: ReleaseConfig | None = None, *, now: dt.datetime | None = None,
         actor: str = "canary_rollout") -> StepResult:
    """One look at the live experiment, and the action it calls for."""
    cfg = cfg or ReleaseConfig()
    now = now or _now()
    registry = Registry(lake)
    state = registry.serving_state()
    if not state.canary or not state.experiment:
        return StepResult("skipped", None, state)
    if not 0 < state.canary_share < 1:  # a hand-set split (e.g. 100%): nothing left to compare
        log.warning("canary %s at %.0f%%: no comparison possible; set the routes or roll back",
                    state.canary, state.canary_share * 100)
        return StepResult("skipped", None, state)
    exp = state.experiment
    stages = exp.get("stages") or list(cfg.stages)
    counts, decision = _judge(lake, state, cfg, now)
    figures = _figures(decision, counts)
    look = {"at": _iso(now), "experiment": exp["id"], "stage": exp["stage"], "canary_share": state.canary_share,
            "seq": state.seq, **figures}
    lake.put_json(f"{ROLLOUT}/{exp['id']}/looks/{now:%Y%m%dT%H%M%S}-s{exp['stage']}.json", look)
    line = f"{state.canary} at {state.canary_share:.0%} (stage {exp['stage'] + 1}/{len(stages)}): {decision.reason}"
    if decision.action == "continue":
        log.info("continue: %s", line)
        return StepResult("continue", decision, state, counts)
    if decision.action == "halt":
        log.error("HALTED (no traffic change; a person must look): %s", line)
        registry.record("halt", {"ref": state.canary, "experiment": exp["id"], "figures": figures},
                        actor=actor, reason=decision.reason)
        return StepResult("halted", decision, state, counts)
    if decision.action == "rollback":
        what = "retired as inconclusive" if decision.inconclusive else "rolled back"
        new = registry.update_serving({"canary": None, "canary_share": 0.0, "experiment": None}, actor=actor,
                                      reason=f"{what}: {decision.reason}", expected_seq=state.seq, figures=figures,
                                      retire_as="retired" if decision.inconclusive else "rejected")
        log.warning("%s: %s", what, line)
        return StepResult("retired" if decision.inconclusive else "rolled_back", decision, new, counts)
    # promote: the next stage, or champion past the last one
    nxt = exp["stage"] + 1
    if nxt < len(stages) and stages[nxt] < 1.0:
        new_exp = {**exp, "stage": nxt, "stage_started_at": _iso(now)}
        new = registry.update_serving({"canary_share": stages[nxt], "experiment": new_exp}, actor=actor,
                                      reason=f"widened to {stages[nxt]:.0%}: {decision.reason}",
                                      expected_seq=state.seq, figures=figures)
        log.info("widened: %s", line)
        return StepResult("widened", decision, new, counts)
    new = registry.update_serving({"champion": state.canary, "canary": None, "canary_share": 0.0, "experiment": None},
                                  actor=actor, reason=f"promoted to champion: {decision.reason}",
                                  expected_seq=state.seq, figures=figures)
    log.info("promoted: %s", line)
    return StepResult("promoted", decision, new, counts)


def _judge(lake: Lake, state: ServingState, cfg: ReleaseConfig, now: dt.datetime | None):
    """(counts, decision) of the current stage, the policy told the stage's configured share."""
    from dataclasses import replace

    counts = arm_counts(lake, state, now, cfg.settle)
    return counts, decide(counts, replace(cfg.policy, expected_canary_share=state.canary_share))


def rollback(lake: Lake, *, reason: str, to: str | None = None, actor: str = "cli") -> ServingState:
    """The manual rollback. Without ``to``: a live canary is taken off (rejected); with no canary,
    the champion before the current one is restored (or the bare base when there was none).
    With ``to`` (a ``name@version``, or ``base``): that becomes the champion and any canary is taken
    off. Takes effect on every replica at its next reconciliation, without a restart."""
    if not reason or not reason.strip():
        raise ValueError("a rollback needs a reason (it goes into the registry's history)")
    registry = Registry(lake)
    state = registry.serving_state()
    off = {"canary": None, "canary_share": 0.0, "experiment": None}
    if to is None and state.canary:
        return registry.update_serving(off, actor=actor, reason=f"manual rollback: {reason}",
                                       expected_seq=state.seq, retire_as="rejected")
    if to is None:
        statuses = registry.state().statuses
        earlier = [s.champion for s in registry.serving_states()
                   if s.champion != state.champion and statuses.get(s.champion) != "rejected"]
        if not state.champion:
            raise RegistryError("nothing to roll back: no canary and the base model is the champion")
        target = earlier[-1] if earlier else None
    else:
        target = None if to == "base" else to
        if target is not None:
            registry.get(target)  # a clear error for a ref that does not exist
    return registry.update_serving({"champion": target, **off}, actor=actor,
                                   reason=f"manual rollback to {target or 'the base model'}: {reason}",
                                   expected_seq=state.seq, retire_as="rejected", retire_champion_as="rejected")


def status(lake: Lake, cfg: ReleaseConfig | None = None, now: dt.datetime | None = None) -> dict:
    """The live experiment and what :func:`step` would do now (nothing is written)."""
    cfg = cfg or ReleaseConfig()
    state = Registry(lake).serving_state()
    out = {"serving_state": state.seq, "champion": state.champion or "base", "canary": state.canary,
           "canary_share": state.canary_share, "holdout_share": state.holdout_share, "experiment": state.experiment}
    if state.canary and state.experiment and 0 < state.canary_share < 1:
        counts, d = _judge(lake, state, cfg, now)
        out.update(counts=counts, decision=d)
    return out


def looks(lake: Lake, experiment_id: str | None = None) -> pd.DataFrame:
    """Every stored look (all experiments, or one), one row per look and metric, for plots."""
    rows = []
    for k in lake.list(f"{ROLLOUT}/" + (f"{experiment_id}/" if experiment_id else "")):
        if "/looks/" not in k:
            continue
        look = lake.get_json(k)
        d = look["decision"]
        for metric, m in (d.get("metrics") or {}).items():
            rows.append({"at": look["at"], "experiment": look["experiment"], "stage": look["stage"],
                         "canary_share": look["canary_share"], "action": d["action"], "metric": metric, **m})
    return pd.DataFrame(rows)
