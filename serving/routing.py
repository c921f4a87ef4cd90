"""Which arm answers a user: champion, canary or holdout, sticky per user, persisted.

A user's bucket is a hash of their user key in [0, 1): below ``holdout_share`` they get the bare
base model (holdout), below ``holdout_share + canary_share`` the canary adapter, otherwise the
champion (an adapter, or the base when there is none yet). Raising the canary share only moves
champion users into the canary, never the other way, and a user keeps their arm across requests
and restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Routes:
    champion: str | None = None  # adapter name; None = the base model
    canary: str | None = None
    canary_share: float = 0.0
    holdout_share: float = 0.0

    def validate(self, loaded: set[str] | None = None) -> "Routes":
        for name in ("canary_share", "holdout_share"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v!r}")
        if self.canary_share + self.holdout_share > 1.0:
            raise ValueError("canary_share + holdout_share must not exceed 1")
        if self.canary_share > 0 and not self.canary:
            raise ValueError("a canary share needs a canary adapter")
        if loaded is not None:
            for name in (self.champion, self.canary):
                if name is not None and name not in loaded:
                    raise ValueError(f"adapter {name!r} is not loaded; load it first")
        return self

    def bucket(self, user_key: str) -> float:
        h = hashlib.sha256(f"vloop-route|{user_key}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    def arm_for(self, user_key: str) -> tuple[str, str | None]:
        """(arm, adapter name or None for the base model)."""
        b = self.bucket(user_key)
        if b < self.holdout_share:
            return "holdout", None
        if b < self.holdout_share + self.canary_share:
            return "canary", self.canary
        return "champion", self.champion

    def arm_of_model(self, adapter: str | None) -> str:
        """The arm a request that named its model explicitly is counted in."""
        if adapter is not None and adapter == self.canary:
            return "canary"
        if adapter is None and self.champion is not None:
            return "holdout"
        return "champion"


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
