"""The serving process's configuration: :class:`ServeConfig`, filled by ``vloop serve`` /
``python -m serving`` (serving.cli) from its arguments and vloop's settings, and read by every
part of the gateway. Defaults are the production ones; tests build their own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.auth import ApiKeys
from vloop.capture.netguard import FetchPolicy
from vloop.store.config import Settings


@dataclass
class ServeConfig:
    model: str | None
    lake_url: str | None
    state_dir: Path
    spool_dir: Path
    upstream: str | None = None
    upstream_api_key: str | None = None
    admin_token: str | None = None
    user_key_secret: str | None = None
    max_request_bytes: int = 20 * 2**20
    max_image_bytes: int = Settings.max_image_bytes
    max_image_pixels: int = Settings.max_image_pixels
    max_tokens_limit: int = 512
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    ship_interval_s: float = 1.0
    max_batch: int = 16
    # Seconds between reads of the registry's desired serving state (0: never; routes and
    # adapters then change only through the admin routes).
    reconcile_interval_s: float = 5.0
    # Seconds a replica keeps the lake's decoding policy (banned phrases) before reading it again:
    # a `vloop decoding ban` takes effect within this, without a restart.
    decoding_ttl_s: float = 10.0
    # Simulation mode (the demo): requests may carry X-Vloop-Sim-Time to log a simulated clock.
    # Off in production, so no client can ever set a record's timestamp.
    simulation: bool = False
    # Feedback tokens (serving.auth): the key every replica shares (default: derived from
    # user_key_secret), the one before a rotation, their lifetime, and events per answer.
    feedback_secret: str | None = None
    feedback_secret_previous: str | None = None
    feedback_token_ttl_s: int = 7 * 86400
    feedback_max_events: int = 20
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys({}))  # empty: no client authentication
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call chat and feedback
    playground: bool = False  # serve /playground
