"""The adapter registry: versions with lineage, a status, aliases, and an append-only history.

Everything lives in the lake under ``registry/`` as objects that are written once and never
rewritten, so two writers at once cannot corrupt the registry or lose each other's update:

* ``registry/versions/<name>/<version>.json`` — one adapter version: where its files are, the
  dataset it was trained on, the base model, the training config, its metrics. Immutable.
* ``registry/events/<time>-<uuid>.json`` — one event: a status change or an alias move, with the
  time, the actor and the reason. The current statuses and aliases are the fold of all events in
  time order; "what served on date X" is the fold of the events up to X.

A version's status is one of ``candidate``, ``canary``, ``champion``, ``retired``, ``rejected``;
aliases (``champion``, ``canary``) point at a ``name@version``. Moving the champion alias retires
the previous champion; both facts are events.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from vloop.lake import Lake

PREFIX = "registry"
STATUSES = ("candidate", "canary", "champion", "retired", "rejected")
ALIASES = ("champion", "canary")


class RegistryError(ValueError):
    pass


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
        key = f"{PREFIX}/versions/{v.name}/{v.version}.json"
        if self.lake.exists(key):
            raise RegistryError(f"{v.ref} is already registered")
        v.created_at = v.created_at or _now().isoformat()
        self.lake.put_json(key, v.__dict__)
        self._event({"kind": "status", "ref": v.ref, "status": "candidate"}, actor, reason)
        return v

    def set_status(self, ref: str, status: str, *, actor: str, reason: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
        self.get(ref)
        self._event({"kind": "status", "ref": ref, "status": status}, actor, reason)

    def set_alias(self, alias: str, ref: str | None, *, actor: str, reason: str) -> None:
        """Point ``alias`` at ``ref`` (None clears it); the version's status follows the alias,
        and a champion that is replaced is retired."""
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}; use one of {', '.join(ALIASES)}")
        if ref is not None:
            self.get(ref)
        previous = self.state().aliases.get(alias)
        self._event({"kind": "alias", "alias": alias, "ref": ref, "previous": previous}, actor, reason)
        if ref is not None:
            self._event({"kind": "status", "ref": ref, "status": alias}, actor, reason)
        if alias == "champion" and previous and previous != ref:
            self._event({"kind": "status", "ref": previous, "status": "retired"}, actor,
                        f"replaced by {ref}: {reason}")

    def _event(self, body: dict, actor: str, reason: str) -> None:
        now = _now()
        # The key sorts by time; the uuid keeps two writers in the same microsecond apart.
        key = f"{PREFIX}/events/{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex}.json"
        self.lake.put_json(key, {**body, "at": now.isoformat(), "actor": actor, "reason": reason})

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
        statuses, aliases, reasons = {}, {a: None for a in ALIASES}, {}
        for e in self.history(at):
            if e["kind"] == "status":
                statuses[e["ref"]], reasons[e["ref"]] = e["status"], e["reason"]
            else:
                aliases[e["alias"]] = e["ref"]
        return State(statuses, aliases, reasons)

    def alias(self, alias: str) -> AdapterVersion | None:
        ref = self.state().aliases.get(alias)
        return self.get(ref) if ref else None

    def served_at(self, when: dt.datetime) -> dict[str, str | None]:
        """Which adapter each alias pointed at, at time ``when``."""
        return self.state(when).aliases
