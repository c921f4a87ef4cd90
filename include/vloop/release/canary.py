"""The release of a new adapter: start a canary, look at it every hour, widen it stage by stage,
promote it to champion or roll it back; and the manual rollback.

The decision itself is :func:`vloop.release.rollout.decide` (always-valid statistics, sample-ratio check,
guardrails). This module feeds it and carries out what it says, on the registry's serving state
(:class:`vloop.learn.registry.ServingState`), which every serving replica reconciles from:

* :func:`start` — a candidate becomes the canary at the first stage's share, in a new experiment
  with its own salt (so each experiment draws other users);
* :func:`arm_counts` — per-arm users, requests, accepts, edits, errors, p95 latency and per-user
  moments since the current stage began, from the lake's raw interactions and feedback (the same
  outcome definition as the daily report: :func:`vloop.curate.report.outcome_flags`);
* :func:`step` — one look: counts → decide → act. Promote widens to the next stage (restarting the
  sequence: only the steady period of a stage is analysed); past the last stage the champion alias
  moves and the old champion is retired, still loadable (in manual approval mode a person answers
  first: :mod:`vloop.release.approval`). Rollback takes the canary off (rejected).
  Halt (a sample-ratio mismatch, or counts that cannot be right) takes the canary off too (retired,
  not rejected: the figures could not judge it) and the DAG task fails as the alert; a halted
  canary that kept serving would keep a likely broken model in front of its users indefinitely.
  Every look is stored under ``rollout/<experiment>/looks/`` and every action is a registry event
  carrying the figures that decided it;
* the queue — a candidate that passes the gate while another experiment runs waits in the registry
  as ``approved``; when an experiment ends (promote, rollback, retire, halt, or a look that finds
  none running) the newest approved version is started (:func:`start_next`); older approved ones
  are superseded (retired) by it, since it was trained on everything they were and more;
* :func:`rollback` — the manual one: end the canary, or restore an earlier champion.

Counts are kept as hourly snapshots under ``rollout/<experiment>/counts/``: per request of the
stage (arm, a salted digest of the user key — no user key is stored —, error, latency, outcome
flags) through the last finished hour, so a look reads the raw logs of the new hours only. They
are deleted when the experiment ends.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from vloop.store.lake import FEEDBACK_DATASET, Lake, LakeKeyNotFound, partition_prefix
from vloop.store.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.learn.registry import Registry, RegistryError, ServingState
from vloop.release.rollout import Decision, RolloutPolicy, decide
from vloop.store.schema import FEEDBACK, INTERACTION

log = logging.getLogger(__name__)

ROLLOUT = "rollout"
ARMS_COMPARED = ("champion", "canary")
COUNTS = "counts"  # rollout/<experiment>/counts/: the hourly count snapshots (arm_counts)
# Feedback stamped before its own request (clocks of two replicas apart) is carried across a
# snapshot boundary for this long; skew beyond it would be lost.
ORPHAN_WINDOW = dt.timedelta(hours=1)


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
    from vloop.store.config import load_settings

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
    new = registry.update_serving(changes, actor=actor, reason=f"canary at {cfg.stages[0]:.0%}: {reason}",
                                  expected_seq=head.seq)
    # Approved versions older than this one will not be served: it was trained on more labels.
    created = registry.get(ref).created_at
    for other in queued(registry):
        if other != ref and registry.get(other).created_at < created:
            registry.set_status(other, "retired", actor=actor, reason=f"superseded by {ref}, approved later")
    return new


def queued(registry: Registry) -> list[str]:
    """Versions that passed the gate and wait to be served as a canary (``approved``), oldest first."""
    refs = [ref for ref, status in registry.state().statuses.items() if status == "approved"]
    return sorted(refs, key=lambda ref: registry.get(ref).created_at)


def start_next(registry: Registry, *, actor: str, cfg: ReleaseConfig | None = None,
               now: dt.datetime | None = None) -> ServingState | None:
    """Start the newest approved version as the canary when no experiment runs; None when one runs
    or none waits. Older approved versions are superseded by it (see :func:`start`)."""
    waiting = queued(registry)
    if registry.serving_state().canary or not waiting:
        return None
    ref = waiting[-1]
    why = registry.state().reasons.get(ref) or "approved"
    return start(registry, ref, actor=actor, reason=f"approved, waited for the previous experiment: {why}",
                 cfg=cfg, now=now)


def _window(state: ServingState, now: dt.datetime, settle: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    begun = dt.datetime.fromisoformat(state.experiment["stage_started_at"]) + settle
    return begun, max(now, begun)


def arm_counts(lake: Lake, state: ServingState, now: dt.datetime | None = None,
               settle: dt.timedelta = ReleaseConfig.settle, store: bool = True) -> pd.DataFrame:
    """One row per arm (champion, canary) of the traffic since the current stage settled: the input
    of :func:`vloop.release.rollout.decide`, with the per-user moments its cluster-robust variance uses.
    Only requests answered by the arm's own adapter count (a request routed before a change of
    routes reached a replica belongs to no arm of this stage).

    The stage's requests up to the last finished hour come from the newest snapshot under
    ``rollout/<experiment>/counts/`` (per request, since the per-user moments and the p95 do not add
    up over hours, and feedback keeps arriving for earlier hours); only later hours are read from
    the raw logs. With ``store`` a new snapshot is written through the last finished hour once every
    shipper's watermark has passed it (:func:`vloop.capture.spool.shippers_caught_up`), so no record of it
    can still arrive. The figures are the same as from the raw logs alone."""
    now = now or _now()
    begun, end = _window(state, now, settle)
    hours = (end - begun).total_seconds() / 3600
    salt = str(state.experiment.get("salt") or state.experiment["id"])
    prefix = _counts_prefix(state, begun)
    snapshot, since = _read_snapshot(lake, prefix, end)
    if snapshot is None:  # the whole stage from the raw logs, as before snapshots existed
        since, old = begun, _empty_requests()
        events = _read_feedback(lake, begun, end, lower=None)
    else:
        old = snapshot[snapshot["arm"].notna()].reset_index(drop=True)
        orphans = snapshot.loc[snapshot["arm"].isna(), ["request_id", "ts", "type"]]
        events = pd.concat([orphans, _read_feedback(lake, since, end, lower=since)], ignore_index=True)
    new = _requests(_read_interactions(lake, since, end, hour_pruned=snapshot is not None), state, since, end, salt)
    reqs = pd.concat([old, new], ignore_index=True)
    flags = _flags(reqs, events)
    if store:
        _store_snapshot(lake, prefix, reqs, events, since, begun, end)
    return _aggregate(reqs.assign(accepted=flags["accepted"], edited=flags["edited"]), hours)


REQUEST_COLUMNS = {"request_id": "object", "ts": "datetime64[ns, UTC]", "arm": "object", "user": "object",
                   "error": "bool", "latency_ms": "float64", "accepted": "bool", "edited": "bool"}


def _empty_requests() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in REQUEST_COLUMNS.items()})


def _counts_prefix(state: ServingState, begun: dt.datetime) -> str:
    """Snapshots of one stage: a change of stage, settle time, champion or canary starts afresh."""
    tag = hashlib.sha256(f"{_iso(begun)}|{state.champion}|{state.canary}".encode()).hexdigest()[:12]
    return f"{ROLLOUT}/{state.experiment['id']}/{COUNTS}/s{state.experiment['stage']}-{tag}/"


def _through(key: str) -> dt.datetime:
    return dt.datetime.strptime(key.rsplit("through-", 1)[1][:15], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)


def _read_snapshot(lake: Lake, prefix: str, end: dt.datetime) -> tuple[pd.DataFrame | None, dt.datetime | None]:
    """The newest snapshot through an hour not after ``end`` (a look at an earlier clock cannot use
    a later one), and that hour; (None, None) without one."""
    keys = sorted((k for k in lake.list(prefix) if re.search(r"/through-\d{8}T\d{6}\.parquet$", k)), key=_through)
    keys = [k for k in keys if _through(k) <= end]
    if not keys:
        return None, None
    try:
        table = lake.read_parquet(keys[-1]).to_pandas()
    except LakeKeyNotFound:  # replaced by a newer one meanwhile: read the raw logs this time
        return None, None
    table["ts"] = pd.to_datetime(table["ts"], utc=True)
    return table, _through(keys[-1])


def _read_interactions(lake: Lake, since: dt.datetime, end: dt.datetime, *, hour_pruned: bool) -> pd.DataFrame:
    """Interactions of the days from ``since`` to ``end``. ``hour_pruned``: only the hour
    partitions from ``since``'s hour to ``end``'s (the shipper and ``write_hourly`` put each record
    in the partition of its hour), and day-level files."""
    cols = ["request_id", "ts", "user_key", "adapter", "arm", "status", "latency_ms"]
    if not hour_pruned:
        return lake.read_partitions(INTERACTIONS, since.date(), end.date(), columns=cols,
                                    schema=INTERACTION.arrow).to_pandas()
    target = pa.schema([INTERACTION.arrow.field(c) for c in cols])
    since, end = since.astimezone(dt.timezone.utc), end.astimezone(dt.timezone.utc)  # partitions are UTC
    first, last = partition_prefix(INTERACTIONS, since.date()), partition_prefix(INTERACTIONS, end.date())

    def wanted(key: str) -> bool:
        day = first if key.startswith(first) else last if key.startswith(last) else None
        hour = re.match(r"hour=(\d{2})/", key[len(day):]) if day else None
        if hour is None:
            return True
        h = int(hour.group(1))
        return (key.startswith(first) <= (h >= since.hour)) and (key.startswith(last) <= (h <= end.hour))

    for _ in range(3):
        try:
            tables = [lake.read_parquet(k, cols).select(cols).cast(target)
                      for k in lake.partition_keys(INTERACTIONS, since.date(), end.date()) if wanted(k)]
        except LakeKeyNotFound:  # a day was compacted while being read: list it again
            continue
        return (pa.concat_tables(tables) if tables else target.empty_table()).to_pandas()
    return lake.read_partitions(INTERACTIONS, since.date(), end.date(), columns=cols,
                                schema=INTERACTION.arrow).to_pandas()


def _read_feedback(lake: Lake, since: dt.datetime, end: dt.datetime, *, lower: dt.datetime | None) -> pd.DataFrame:
    """Feedback events of the days from ``since`` to ``end``, stamped up to ``end`` (and from
    ``lower`` on, when given): ``request_id``, ``ts``, ``type``."""
    fb = lake.read_partitions(FEEDBACK_DATASET, since.date(), end.date(), columns=["request_id", "ts", "type"],
                              schema=FEEDBACK.arrow).to_pandas()
    ts = pd.to_datetime(fb["ts"], utc=True)
    keep = ts <= pd.Timestamp(end)
    if lower is not None:
        keep &= ts >= pd.Timestamp(lower)
    return pd.DataFrame({"request_id": fb["request_id"].astype(object)[keep].to_numpy(),
                         "ts": pd.to_datetime(ts[keep].to_numpy(), utc=True),
                         "type": fb["type"].astype(object)[keep].to_numpy()})


def _requests(inter: pd.DataFrame, state: ServingState, since: dt.datetime, end: dt.datetime,
              salt: str) -> pd.DataFrame:
    """The arms' own requests stamped from ``since`` to ``end``, one row each (REQUEST_COLUMNS)."""
    ts = pd.to_datetime(inter["ts"], utc=True)
    inter = inter[(ts >= pd.Timestamp(since)) & (ts <= pd.Timestamp(end)) & inter["arm"].isin(ARMS_COMPARED)]
    want = {"champion": state.champion, "canary": state.canary}
    own = [want[a] == (ad if isinstance(ad, str) else None) for a, ad in zip(inter["arm"], inter["adapter"])]
    inter = inter[np.array(own, dtype=bool)]
    ok = (inter["status"] == "ok").to_numpy(dtype=bool)
    users = inter["user_key"].astype(object)
    # A salted digest instead of the user key: the snapshot keeps who is who within the experiment
    # (the variance is over users) without holding the key itself.
    digests = {u: hashlib.blake2b(u.encode(), digest_size=16, key=salt.encode()[:64]).hexdigest()
               for u in pd.unique(users[users.notna()])}
    out = pd.DataFrame({
        "request_id": inter["request_id"].astype(object).to_numpy(),
        "ts": pd.to_datetime(pd.to_datetime(inter["ts"], utc=True).to_numpy(), utc=True),
        "arm": inter["arm"].astype(object).to_numpy(),
        "user": [digests.get(u) if isinstance(u, str) else None for u in users],
        "error": (inter["status"] == "error").to_numpy(dtype=bool),
        "latency_ms": np.where(ok, inter["latency_ms"].astype(float).to_numpy(), np.nan),
        "accepted": np.zeros(len(inter), dtype=bool), "edited": np.zeros(len(inter), dtype=bool)})
    return out


def _flags(reqs: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Outcome flags of ``reqs``: those already in their rows (from a snapshot) or from ``events``.
    OR is right because an outcome is "at least one such event" (vloop.curate.report.outcome_flags)."""
    from vloop.curate.report import outcome_flags

    fresh = outcome_flags(reqs[["request_id"]], events)
    return pd.DataFrame({"accepted": reqs["accepted"].to_numpy(dtype=bool) | fresh["accepted"].to_numpy(dtype=bool),
                         "edited": reqs["edited"].to_numpy(dtype=bool) | fresh["edited"].to_numpy(dtype=bool)})


def _store_snapshot(lake: Lake, prefix: str, reqs: pd.DataFrame, events: pd.DataFrame, since: dt.datetime,
                    begun: dt.datetime, end: dt.datetime) -> None:
    """Write the snapshot through the last finished hour before ``end`` when it is newer than
    ``since`` and every shipper has shipped through it; then drop the older ones."""
    from vloop.capture.spool import shippers_caught_up

    through = end.astimezone(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    if through <= since or through <= begun or not shippers_caught_up(lake, through)[0]:
        return
    cut = pd.Timestamp(through)
    before = reqs[reqs["ts"] < cut].reset_index(drop=True)
    early = events[events["ts"] < cut]
    flags = _flags(before, early)
    before = before.assign(accepted=flags["accepted"], edited=flags["edited"], type=None)
    # Events whose request is not (yet) among these: kept for a short while (see ORPHAN_WINDOW).
    orphan = early[(early["ts"] >= cut - ORPHAN_WINDOW) & ~early["request_id"].isin(set(before["request_id"]))]
    orphan = pd.DataFrame({"request_id": orphan["request_id"].to_numpy(),
                           "ts": pd.to_datetime(orphan["ts"].to_numpy(), utc=True),
                           "arm": None, "user": None, "error": False, "latency_ms": np.nan, "accepted": False,
                           "edited": False, "type": orphan["type"].to_numpy()})
    frame = pd.concat([before, orphan], ignore_index=True) if len(orphan) else before
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    schema = pa.schema([("request_id", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("arm", pa.string()),
                        ("user", pa.string()), ("error", pa.bool_()), ("latency_ms", pa.float64()),
                        ("accepted", pa.bool_()), ("edited", pa.bool_()), ("type", pa.string())])
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    key = f"{prefix}through-{through:%Y%m%dT%H%M%S}.parquet"
    lake.write_parquet(key, table)
    for old in lake.list(prefix):
        if old != key and "/through-" in old and _through(old) < through:
            lake.delete(old)


def _aggregate(df: pd.DataFrame, hours: float) -> pd.DataFrame:
    rows = []
    for arm in ARMS_COMPARED:
        g = df[df["arm"] == arm]
        per_user = g.groupby("user").agg(n=("request_id", "size"), a=("accepted", "sum"), e=("edited", "sum"))
        n, a, e = (per_user[c].to_numpy(dtype=float) for c in ("n", "a", "e"))
        lat = g["latency_ms"].dropna()
        rows.append({"arm": arm, "users": len(per_user), "requests": len(g), "accepted": int(a.sum()),
                     "edited": int(e.sum()), "errors": int(g["error"].sum()), "hours": hours,
                     "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
                     "requests_sq": float((n * n).sum()), "accepted_sq": float((a * a).sum()),
                     "edited_sq": float((e * e).sum()), "accepted_x_requests": float((a * n).sum()),
                     "edited_x_requests": float((e * n).sum())})
    return pd.DataFrame(rows)


def _drop_counts(lake: Lake, experiment: dict | None) -> None:
    """The experiment's count snapshots (per request, so not kept once it no longer runs)."""
    if experiment:
        lake.delete_prefix(f"{ROLLOUT}/{experiment['id']}/{COUNTS}/")


@dataclass
class StepResult:
    # skipped / started / continue / widened / promoted / rolled_back / retired / halted / awaiting_approval
    action: str
    decision: Decision | None
    state: ServingState
    counts: pd.DataFrame | None = None
    started: str | None = None  # the approved version started from the queue when the experiment ended
    request: str | None = None  # awaiting_approval: the id of the promotion request (vloop.release.approval)

    @property
    def summary(self) -> dict:
        out = {"action": self.action, "seq": self.state.seq, "champion": self.state.champion,
               "canary": self.state.canary, "canary_share": self.state.canary_share}
        if self.decision is not None:
            out["reason"] = self.decision.reason
        if self.started:
            out["started"] = self.started
        if self.request:
            out["request"] = self.request
        return out


NOTE_MAX = 1000  # characters of a run's note shown in Airflow's UI


def look_note(summary: dict | None, *, look_state: str | None = None) -> str:
    """The note a ``canary_rollout`` run carries in Airflow's UI: what the look did and why, so a
    rollback or a held promotion does not hide behind a green run. ``summary`` is the look's
    :attr:`StepResult.summary` (None when the look raised: ``look_state`` says skipped or failed)."""
    if summary is None:
        note = ("skipped: no canary is live and none is approved and waiting" if look_state == "skipped" else
                "halted or failed: see the look's log (a halt takes the canary off and fails the look as the alert)")
    else:
        action, canary, share = summary.get("action"), summary.get("canary"), summary.get("canary_share")
        at = f" at {share:.0%}" if isinstance(share, (int, float)) and canary else ""
        head = {"continue": f"continue: {canary}{at}",
                "widened": f"widened: {canary}{at}",
                "promoted": f"promoted to champion: {summary.get('champion')}",
                "awaiting_approval": f"awaiting a person's approval (request {summary.get('request')}): {canary}{at}",
                "rolled_back": "rolled back: the champion serves everyone",
                "halted": "halted: the canary is taken off, the champion serves everyone (a person should look)",
                "retired": "retired as inconclusive: the champion serves everyone",
                "started": f"started from the queue: {summary.get('started')}{at}",
                "manual rollback": f"manual rollback: champion {summary.get('champion')}"}.get(action, str(action))
        if summary.get("started") and action != "started":
            head += f"; {summary['started']} started from the queue"
        note = head + (f" — {summary['reason']}" if summary.get("reason") else "")
    return note if len(note) <= NOTE_MAX else note[:NOTE_MAX - 1] + "…"


def _figures(decision: Decision, counts: pd.DataFrame) -> dict:
    return {"decision": decision.to_dict(),
            "counts": counts[["arm", "users", "requests", "accepted", "edited", "errors", "hours"]].to_dict("records")}


def step(lake: Lake, cfg: ReleaseConfig | None = None, *, now: dt.datetime | None = None,
         actor: str = "canary_rollout", approval: str = "auto", approval_timeout_hours: float | None = None
         ) -> StepResult:
    """One look at the live experiment, and the action it calls for. When the experiment ends (or
    none runs), the newest approved version waiting in the registry is started as the next canary.

    ``approval`` (Variable ``vloop_promotion_approval``): ``auto`` promotes at the last stage;
    ``manual`` records a pending promotion instead (action ``awaiting_approval``) for a person to
    answer (:mod:`vloop.release.approval`). While one is pending no look promotes, in either mode;
    a rollback or halt still acts. A request still pending an hour past ``approval_timeout_hours``
    (its approval run failed, or nobody could be asked) is settled as no answer — the champion
    kept, the stage restarted — so the next promote decision asks again instead of waiting forever."""
    from vloop.release import approval as approvals

    approval = approvals.parse_mode(approval)
    cfg = cfg or ReleaseConfig()
    now = now or _now()
    registry = Registry(lake)
    state = registry.serving_state()
    if not state.canary or not state.experiment:
        if state.canary is None:
            nxt = start_next(registry, actor=actor, cfg=cfg, now=now)
            if nxt is not None:
                log.info("started %s from the queue: no experiment was running", nxt.canary)
                return StepResult("started", None, nxt, started=nxt.canary)
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
    look_key = f"{ROLLOUT}/{exp['id']}/looks/{now:%Y%m%dT%H%M%S}-s{exp['stage']}.json"
    lake.put_json(look_key, look)
    line = f"{state.canary} at {state.canary_share:.0%} (stage {exp['stage'] + 1}/{len(stages)}): {decision.reason}"
    waiting = approvals.pending(state)
    if waiting and approval_timeout_hours and decision.action in ("continue", "promote") and \
            now - dt.datetime.fromisoformat(waiting["requested_at"]) > dt.timedelta(hours=approval_timeout_hours + 1):
        kept = approvals.settle(lake, approvals.ON_TIMEOUT, by=None, via=actor, request_id=waiting["id"],
                                timeout_hours=approval_timeout_hours, now=now, cfg=cfg)
        log.warning("request %s outlived its timeout unanswered: %s", waiting["id"], kept.message)
        return StepResult("continue", decision, kept.state, counts)
    if waiting and decision.action in ("continue", "promote"):  # the request stands until a person answers
        log.info("promotion awaits approval (request %s): %s", waiting["id"], line)
        return StepResult("awaiting_approval", decision, state, counts, request=waiting["id"])
    if decision.action == "continue":
        log.info("continue: %s", line)
        return StepResult("continue", decision, state, counts)
    off = {"canary": None, "canary_share": 0.0, "experiment": None}
    if decision.action == "halt":
        # No comparison can be trusted, and a mismatch most often means replicas that could not load
        # the canary: take it off (retired, not rejected: it was not judged) and let the task fail.
        new = registry.update_serving(off, actor=actor, reason=f"halted, canary taken off: {decision.reason}",
                                      expected_seq=state.seq, figures=figures, retire_as="retired")
        registry.record("halt", {"ref": state.canary, "experiment": exp["id"], "figures": figures},
                        actor=actor, reason=decision.reason)
        log.error("HALTED, canary taken off (the champion serves everyone; a person must look): %s", line)
        return _ended(lake, registry, StepResult("halted", decision, new, counts), exp, cfg, now, actor)
    if decision.action == "rollback":
        what = "retired as inconclusive" if decision.inconclusive else "rolled back"
        new = registry.update_serving(off, actor=actor, reason=f"{what}: {decision.reason}", expected_seq=state.seq,
                                      figures=figures, retire_as="retired" if decision.inconclusive else "rejected")
        log.warning("%s: %s", what, line)
        result = StepResult("retired" if decision.inconclusive else "rolled_back", decision, new, counts)
        return _ended(lake, registry, result, exp, cfg, now, actor)
    # promote: the next stage, or champion past the last one
    nxt = exp["stage"] + 1
    if nxt < len(stages) and stages[nxt] < 1.0:
        new_exp = {**exp, "stage": nxt, "stage_started_at": _iso(now)}
        new = registry.update_serving({"canary_share": stages[nxt], "experiment": new_exp}, actor=actor,
                                      reason=f"widened to {stages[nxt]:.0%}: {decision.reason}",
                                      expected_seq=state.seq, figures=figures)
        _drop_counts(lake, exp)  # the next stage counts afresh
        log.info("widened: %s", line)
        return StepResult("widened", decision, new, counts)
    if approval == "manual":  # a person answers first (vloop.release.approval.settle)
        new = approvals.request_promotion(registry, state, decision, counts, look_key, figures=figures,
                                          alpha=cfg.policy.alpha, actor=actor, now=now)
        log.info("promotion awaits approval: %s", line)
        return StepResult("awaiting_approval", decision, new, counts, request=approvals.pending(new)["id"])
    new = registry.update_serving({"champion": state.canary, **off}, actor=actor,
                                  reason=f"promoted to champion: {decision.reason}",
                                  expected_seq=state.seq, figures=figures)
    log.info("promoted: %s", line)
    return _ended(lake, registry, StepResult("promoted", decision, new, counts), exp, cfg, now, actor)


def _ended(lake: Lake, registry: Registry, result: StepResult, exp: dict, cfg: ReleaseConfig,
           now: dt.datetime, actor: str) -> StepResult:
    """After an experiment ended: drop its count snapshots and start the next approved version."""
    _drop_counts(lake, exp)
    nxt = start_next(registry, actor=actor, cfg=cfg, now=now)
    if nxt is not None:
        log.info("started %s from the queue after %s ended", nxt.canary, exp["id"])
        result.state, result.started = nxt, nxt.canary
    return result


def _judge(lake: Lake, state: ServingState, cfg: ReleaseConfig, now: dt.datetime | None, store: bool = True):
    """(counts, decision) of the current stage, the policy told the stage's configured share."""
    from dataclasses import replace

    counts = arm_counts(lake, state, now, cfg.settle, store=store)
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
        new = registry.update_serving(off, actor=actor, reason=f"manual rollback: {reason}",
                                      expected_seq=state.seq, retire_as="rejected")
        _drop_counts(lake, state.experiment)
        return new
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
    new = registry.update_serving({"champion": target, **off}, actor=actor,
                                  reason=f"manual rollback to {target or 'the base model'}: {reason}",
                                  expected_seq=state.seq, retire_as="rejected", retire_champion_as="rejected")
    _drop_counts(lake, state.experiment)
    return new


def status(lake: Lake, cfg: ReleaseConfig | None = None, now: dt.datetime | None = None) -> dict:
    """The live experiment and what :func:`step` would do now (nothing is written)."""
    cfg = cfg or ReleaseConfig()
    state = Registry(lake).serving_state()
    out = {"serving_state": state.seq, "champion": state.champion or "base", "canary": state.canary,
           "canary_share": state.canary_share, "holdout_share": state.holdout_share, "experiment": state.experiment}
    if state.canary and state.experiment and 0 < state.canary_share < 1:
        counts, d = _judge(lake, state, cfg, now, store=False)
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
