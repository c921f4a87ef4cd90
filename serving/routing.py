"""Which arm answers a user: champion, canary, holdout or unassigned, sticky per user.

Two independent hashes of the user key decide, so that the two shares never move users between
each other's arms:

* the **holdout** hash (a fixed salt, long-lived): below ``holdout_share`` a user gets the bare
  base model. Changing the holdout share only moves users between the holdout and the rest; it
  never moves anyone between canary and champion.
* the **experiment** hash (``salt``, fresh for every experiment, so the canary gets other users
  each time): among the rest, below ``canary_share`` a user gets the canary adapter, otherwise
  the champion (an adapter, or the base when there is none yet). Raising the canary share (the
  staged rollout) only moves champion users into the canary, never the other way.

A request without a user id cannot be randomised: it is served by the champion and counted as
``unassigned``; one that names its model (base or adapter) is ``direct``; both stay outside the
comparison.

A request picks its model with ``model``: the routed alias (:data:`ROUTED_ALIAS`, ``vloop``)
lets the gateway choose the arm as above; the base model's id or an adapter's name asks for it
directly (:func:`choose_arm`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

HOLDOUT_SALT = "vloop-holdout"
ROUTED_ALIAS = "vloop"  # the model name that lets the gateway choose the arm


def _unit_hash(salt: str, user_key: str) -> float:
    h = hashlib.sha256(f"{salt}|{user_key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass(frozen=True)
class Routes:
    champion: str | None = None  # adapter name; None = the base model
    canary: str | None = None
    canary_share: float = 0.0  # of the users outside the holdout
    holdout_share: float = 0.0
    salt: str = "vloop-route"  # the experiment's; a new experiment draws a new one

    def validate(self, loaded: set[str] | None = None) -> "Routes":
        for name in ("canary_share", "holdout_share"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v!r}")
        if self.holdout_share >= 1.0:
            raise ValueError("holdout_share must be below 1: someone has to get the champion or canary")
        if self.canary_share > 0 and not self.canary:
            raise ValueError("a canary share needs a canary adapter")
        if not isinstance(self.salt, str) or not self.salt:
            raise ValueError("salt must be a non-empty string")
        if loaded is not None:
            for name in (self.champion, self.canary):
                if name is not None and name not in loaded:
                    raise ValueError(f"adapter {name!r} is not loaded; load it first")
        return self

    def arm_for(self, user_key: str | None) -> tuple[str, str | None]:
        """(arm, adapter name or None for the base model); ``user_key`` None: no user id."""
        if user_key is None:
            return "unassigned", self.champion
        if self.holdout_share and _unit_hash(HOLDOUT_SALT, user_key) < self.holdout_share:
            return "holdout", None
        if self.canary_share and _unit_hash(self.salt, user_key) < self.canary_share:
            return "canary", self.canary
        return "champion", self.champion

    @staticmethod
    def arm_of_model(adapter: str | None) -> str:
        """A request that named its model itself was not randomised: it is logged as ``direct``,
        outside the comparison, whichever adapter it asked for."""
        return "direct"


class RouteStore:
    """Routes persisted as JSON (atomic replace), so they survive restarts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.routes = self._load()

    def _load(self) -> Routes:
        if self.path.is_file():
            return Routes(**json.loads(self.path.read_text())).validate()
        return Routes()

    def set(self, routes: Routes) -> Routes:
        routes.validate()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(asdict(routes), indent=2))
        os.replace(tmp, self.path)
        self.routes = routes
        return routes


def choose_arm(routes: Routes, model: str, user_key: str | None,
               is_base: Callable[[str], bool]) -> tuple[str, str | None]:
    """(arm, adapter name or None for the base model) of a request for ``model``: the routed
    alias gets the user's sticky arm; an explicit model (the base, or an adapter by name) is
    ``direct``, or ``unassigned`` without a user id."""
    if model == ROUTED_ALIAS:  # the gateway picks the arm by the user's sticky bucket
        return routes.arm_for(user_key)
    adapter = None if is_base(model) else model
    return (routes.arm_of_model(adapter) if user_key is not None else "unassigned"), adapter
