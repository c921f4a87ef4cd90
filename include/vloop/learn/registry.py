"""The adapter registry: versions with lineage, a status, aliases, and an append-only history.

Everything lives in the lake under ``registry/`` as objects that are written once and never
rewritten, so two writers at once cannot corrupt the registry or lose each other's update:

* ``registry/versions/<name>/<version>.json`` — one adapter version: where its files are, the
  dataset it was trained on, the base model, the training config, its metrics. Immutable.
* ``registry/events/<time>-<uuid>.json`` — one event: a status change or an alias move, with the
  time, the actor and the reason. The current statuses and aliases are the fold of all events in
  time order; "what served on date X" is the fold of the events up to X.

* ``registry/serving/<seq>.json`` — the desired serving state, one numbered entry per change:
  which version is champion and canary (the aliases), the canary and holdout shares, and the live
  experiment (its id, salt and stage). Entries are created with a conditional write
  (:meth:`Lake.put_bytes_if_absent`), so of two writers that read the same head only one can write
  the next number; the other gets :class:`RegistryConflict` and must re-read. Two concurrent
  promotions therefore never leave two champions. Serving replicas reconcile from the newest
  entry; "what served when" is the entry in force at that time.

A version's status is one of ``candidate``, ``approved`` (passed the gate, waiting for the running
experiment to end before it is served as a canary: :func:`vloop.release.canary.start_next`), ``canary``,
``champion``, ``retired``, ``rejected``;
aliases (``champion``, ``canary``) point at a ``name@version``. Moving the champion alias retires
the previous champion (its files stay, so it can be restored); each fact is also an event.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import asdict, dataclass, field, replace

from vloop.store.lake import Lake

PREFIX = "registry"
STATUSES = ("candidate", "approved", "canary", "champion", "retired", "rejected")
ALIASES = ("champion", "canary")


class RegistryError(ValueError):
    pass


class RegistryConflict(RegistryError):
    """Another writer changed the serving state since it was read; re-read and decide again."""


SERVING = f"{PREFIX}/serving/"


@dataclass(frozen=True)
class ServingState:
    """What every serving replica should serve (one entry of ``registry/serving/``)."""

    seq: int = 0
    champion: str | None = None  # name@version, or None for the bare base model
    canary: str | None = None
    canary_share: float = 0.0  # of the users outside the holdout
    holdout_share: float = 0.0
    # The live experiment: id, salt (fresh per experiment, so the canary gets other users each
    # time), stages (canary shares), stage (index), stage_started_at, started_at.
    experiment: dict | None = None
    at: str = ""
    actor: str = ""
    reason: str = ""

    @property
    def aliases(self) -> dict[str, str | None]:
        return {"champion": self.champion, "canary": self.canary}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_version(when: dt.datetime | None = None) -> str:
    """A version id that sorts by creation time and never collides: ``v20261129T061500-1a2b3c``."""
    return f"v{(when or _now()):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class AdapterVersion:
    name: str
    version: str
    path: str  # lake prefix of the PEFT files (adapters/<name>/<version>/)
    base_model: str
    dataset_id: str | None = None
    dataset_hash: str | None = None
    training_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created_at: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class State:
    statuses: dict[str, str]  # ref -> status
    aliases: dict[str, str | None]  # alias -> ref
    reasons: dict[str, str]  # ref -> reason of its last status change


class Registry:
    def __init__(self, lake: Lake):
        self.lake = lake

    # -- writing ---------------------------------------------------------------------------------
    def register(self, v: AdapterVersion, *, actor: str, reason: str = "trained") -> AdapterVersion:
        """Add ``v`` as a candidate. Safe to retry: registering the same version again (same
        files, dataset and base model; a task retried after its first try timed out, say) is a
        no-op that returns what is stored; a different adapter under a taken version raises."""
        key = f"{PREFIX}/versions/{v.name}/{v.version}.json"
        v.created_at = v.created_at or _now().isoformat()
        body = json.dumps(v.__dict__, indent=2, sort_keys=True, default=str).encode()
        if not self.lake.put_bytes_if_absent(key, body, "application/json"):
            stored = AdapterVersion(**self.lake.get_json(key))
            if (stored.path, stored.base_model, stored.dataset_id, stored.dataset_hash) != \
                    (v.path, v.base_model, v.dataset_id, v.dataset_hash):
                raise RegistryError(f"{v.ref} is already registered for another adapter ({stored.path}, "
                                    f"dataset {stored.dataset_id})")
            v = stored
        # The candidate event has a key made from the version, so a retry (or a first try that
        # died between the two writes) writes it exactly once.
        created = dt.datetime.fromisoformat(v.created_at)
        self._event({"kind": "status", "ref": v.ref, "status": "candidate"}, actor, reason,
                    key=f"{PREFIX}/events/{created:%Y%m%dT%H%M%S%f}-registered-{v.name}-{v.version}.json", at=created)
        return v

    def set_status(self, ref: str, status: str, *, actor: str, reason: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
        self.get(ref)
        self._event({"kind": "status", "ref": ref, "status": status}, actor, reason)

    def set_alias(self, alias: str, ref: str | None, *, actor: str, reason: str,
                  expected_seq: int | None = None) -> ServingState:
        """Point ``alias`` at ``ref`` (None clears it); the version's status follows the alias,
        and a champion that is replaced is retired. Clearing the canary also zeroes its share."""
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}; use one of {', '.join(ALIASES)}")
        changes: dict = {alias: ref}
        if alias == "canary" and ref is None:
            changes.update(canary_share=0.0, experiment=None)
        return self.update_serving(changes, actor=actor, reason=reason, expected_seq=expected_seq)

    def update_serving(self, changes: dict, *, actor: str, reason: str, expected_seq: int | None = None,
                       figures: dict | None = None, retire_as: str = "retired",
                       retire_champion_as: str = "retired") -> ServingState:
        """Write the next serving state (the head with ``changes``), then the events that describe
        it. ``expected_seq``: the head the caller decided on (default: the current one); if another
        writer moved on since, nothing is written and :class:`RegistryConflict` is raised.
        ``retire_as``: the status of a canary taken off without being promoted;
        ``retire_champion_as``: of a champion replaced (``rejected`` when it is rolled back, so it is
        never restored by a later rollback)."""
        head = self.serving_state()
        if expected_seq is not None and head.seq != expected_seq:
            raise RegistryConflict(f"the serving state moved from #{expected_seq} to #{head.seq} "
                                   f"({head.actor}: {head.reason}); re-read it")
        for name in ("champion", "canary"):
            if changes.get(name) is not None:
                self.get(changes[name])
        new = replace(head, **changes, seq=head.seq + 1, at=_now().isoformat(), actor=actor, reason=reason)
        if not 0 <= new.canary_share <= 1 or not 0 <= new.holdout_share < 1:
            raise RegistryError(f"shares out of range: canary {new.canary_share}, holdout {new.holdout_share}")
        if new.canary_share > 0 and not new.canary:
            raise RegistryError("a canary share needs a canary")
        body = json.dumps(asdict(new), indent=2, sort_keys=True).encode()
        if not self.lake.put_bytes_if_absent(f"{SERVING}{new.seq:010d}.json", body, "application/json"):
            raise RegistryConflict(f"another writer wrote serving state #{new.seq} first; re-read it")
        extra = {"figures": figures} if figures else {}
        for alias in ALIASES:
            before, after = getattr(head, alias), getattr(new, alias)
            if before == after:
                continue
            self._event({"kind": "alias", "alias": alias, "ref": after, "previous": before, "seq": new.seq,
                         **extra}, actor, reason)
            if after is not None:
                self._event({"kind": "status", "ref": after, "status": alias}, actor, reason)
            if before and before not in (new.champion, new.canary):
                status = retire_champion_as if alias == "champion" else retire_as
                why = f"replaced by {after}: {reason}" if alias == "champion" and after else reason
                self._event({"kind": "status", "ref": before, "status": status}, actor, why)
        if (head.canary_share, head.holdout_share) != (new.canary_share, new.holdout_share) \
                or head.experiment != new.experiment:
            self._event({"kind": "traffic", "seq": new.seq, "canary": new.canary,
                         "canary_share": new.canary_share, "holdout_share": new.holdout_share,
                         "experiment": new.experiment, **extra}, actor, reason)
        return new

    def record(self, kind: str, body: dict, *, actor: str, reason: str) -> None:
        """An event that changes nothing but belongs in the history (a halted experiment, a
        decision to wait)."""
        self._event({"kind": kind, **body}, actor, reason)

    def _event(self, body: dict, actor: str, reason: str, *, key: str | None = None,
               at: dt.datetime | None = None) -> None:
        """Append an event. With ``key`` it is written only if that key is new (an event that
        must appear once however often its writer retries)."""
        now = at or _now()
        data = json.dumps({**body, "at": now.isoformat(), "actor": actor, "reason": reason},
                          indent=2, sort_keys=True, default=str).encode()
        if key is not None:
            self.lake.put_bytes_if_absent(key, data, "application/json")
            return
        # The key sorts by time; the uuid keeps two writers in the same microsecond apart.
        self.lake.put_bytes(f"{PREFIX}/events/{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex}.json", data,
                            "application/json")

    # -- reading ---------------------------------------------------------------------------------
    def get(self, ref: str) -> AdapterVersion:
        name, _, version = ref.partition("@")
        key = f"{PREFIX}/versions/{name}/{version}.json"
        if not version or not self.lake.exists(key):
            raise RegistryError(f"no adapter version {ref!r} in the registry")
        return AdapterVersion(**self.lake.get_json(key))

    def versions(self, name: str | None = None) -> list[AdapterVersion]:
        keys = sorted(self.lake.list(f"{PREFIX}/versions/" + (f"{name}/" if name else "")))
        return [AdapterVersion(**self.lake.get_json(k)) for k in keys if k.endswith(".json")]

    def history(self, until: dt.datetime | None = None) -> list[dict]:
        """Every event, oldest first (up to ``until`` when given)."""
        events = [self.lake.get_json(k) for k in sorted(self.lake.list(f"{PREFIX}/events/"))]
        if until is not None:
            events = [e for e in events if dt.datetime.fromisoformat(e["at"]) <= until]
        return events

    def state(self, at: dt.datetime | None = None) -> State:
        statuses, reasons = {}, {}
        for e in self.history(at):
            if e["kind"] == "status":
                statuses[e["ref"]], reasons[e["ref"]] = e["status"], e["reason"]
        return State(statuses, self.serving_state(at).aliases, reasons)

    def serving_states(self) -> list[ServingState]:
        """Every serving state ever written, oldest first."""
        return [ServingState(**self.lake.get_json(k)) for k in self.lake.list(SERVING) if k.endswith(".json")]

    def serving_state(self, at: dt.datetime | None = None) -> ServingState:
        """The newest serving state (the one in force at ``at`` when given); seq 0 = nothing yet."""
        keys = [k for k in self.lake.list(SERVING) if k.endswith(".json")]
        if at is None:
            return ServingState(**self.lake.get_json(keys[-1])) if keys else ServingState()
        chosen = ServingState()
        for k in keys:
            s = ServingState(**self.lake.get_json(k))
            if dt.datetime.fromisoformat(s.at) > at:
                break
            chosen = s
        return chosen

    def alias(self, alias: str) -> AdapterVersion | None:
        ref = self.serving_state().aliases.get(alias)
        return self.get(ref) if ref else None

    def served_at(self, when: dt.datetime) -> dict[str, str | None]:
        """Which adapter each alias pointed at, at time ``when``."""
        return self.serving_state(when).aliases
