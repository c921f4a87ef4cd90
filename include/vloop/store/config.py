"""One settings object, read from ``VLOOP_*`` environment variables.

Every setting is a field of :class:`Settings` with its variable name, default and meaning in the
field's metadata; ``vloop config`` prints the effective values (secrets masked) and README.md
lists them. Code asks :func:`load_settings` instead of reading the environment itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping


class ConfigError(ValueError):
    """A setting has a value vloop cannot use."""


def _setting(env: str, doc: str, default=None, secret: bool = False):
    return field(default=default, metadata={"env": env, "doc": doc, "secret": secret})


def default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "vloop"


@dataclass(frozen=True)
class Settings:
    home: Path = _setting("VLOOP_HOME", "working directory for vloop's local state "
                          "(default lake, spool, models)", default_home())
    lake_url: str = _setting("VLOOP_LAKE_URL", "the lake: file:///abs/dir or s3://bucket/prefix "
                             "(default: file://$VLOOP_HOME/lake)")
    s3_endpoint: str | None = _setting("VLOOP_S3_ENDPOINT", "S3/MinIO endpoint, host:port or "
                                       "http(s)://host:port (http:// means no TLS)")
    s3_access_key: str | None = _setting("VLOOP_S3_ACCESS_KEY", "S3/MinIO access key", secret=True)
    s3_secret_key: str | None = _setting("VLOOP_S3_SECRET_KEY", "S3/MinIO secret key", secret=True)
    s3_region: str = _setting("VLOOP_S3_REGION", "S3 region (MinIO ignores it)", "us-east-1")
    label_studio_s3_access_key: str | None = _setting(
        "VLOOP_LABEL_STUDIO_S3_ACCESS_KEY", "read-only S3 access key Label Studio's storage connection "
        "gets (it only reads and presigns photos); never the lake's read-write keys", secret=True)
    label_studio_s3_secret_key: str | None = _setting("VLOOP_LABEL_STUDIO_S3_SECRET_KEY", "its secret key",
                                                      secret=True)
    lake_public_url: str | None = _setting("VLOOP_LAKE_PUBLIC_URL", "for a local lake: base URL under "
                                           "which a browser can fetch lake keys (e.g. Label Studio "
                                           "local-files serving); unset gives file:// URLs")
    spool_dir: Path | None = _setting("VLOOP_SPOOL_DIR", "serving's durable spool "
                                      "(default: $VLOOP_HOME/spool)")
    base_model: str | None = _setting("VLOOP_BASE_MODEL", "base model directory or hub id")
    scoring_url: str | None = _setting("VLOOP_SCORING_URL", "a vLLM server (http://host:port) serving the "
                                       "base and its adapters: the daily confidence re-scoring and grounding "
                                       "ask it instead of loading VLOOP_BASE_MODEL into the worker")
    admin_token: str | None = _setting("VLOOP_ADMIN_TOKEN", "bearer token for serving's admin routes",
                                       secret=True)
    user_key_secret: str | None = _setting("VLOOP_USER_KEY_SECRET", "HMAC key that turns user ids "
                                           "into user_key", secret=True)
    upstream_api_key: str | None = _setting("VLOOP_UPSTREAM_API_KEY", "bearer token for the upstream "
                                            "OpenAI-compatible server (vLLM --api-key)", secret=True)
    fetch_allowlist: str | None = _setting("VLOOP_FETCH_ALLOWLIST", "comma-separated hosts or CIDRs that "
                                           "image URLs may reach although private/loopback")
    max_image_bytes: int = _setting("VLOOP_MAX_IMAGE_BYTES", "largest accepted image file", 10 * 2**20)
    max_image_pixels: int = _setting("VLOOP_MAX_IMAGE_PIXELS", "largest accepted image, width x height",
                                     4096 * 4096)
    rollout_schedule: str = _setting("VLOOP_ROLLOUT_SCHEDULE", "how often canary_rollout looks at a live "
                                     "canary (a cron expression or preset)", "@hourly")
    retain_raw_days: int = _setting("VLOOP_RETAIN_RAW_DAYS", "days raw interactions, feedback and "
                                    "unreferenced images are kept (privacy_maintenance deletes older)", 90)
    retain_curated_days: int = _setting("VLOOP_RETAIN_CURATED_DAYS", "days curated, quarantine, labeling "
                                        "and report partitions are kept", 180)
    retain_labeled_days: int = _setting("VLOOP_RETAIN_LABELED_DAYS", "days finished annotations are kept", 730)
    retain_datasets_days: int = _setting("VLOOP_RETAIN_DATASETS_DAYS", "days a dataset snapshot is kept "
                                         "(one a serving adapter was trained on stays)", 365)
    simulation: bool = _setting("VLOOP_SIMULATION", "simulation mode (1/0): the demo's synthetic world may "
                                "stand in for production data (a generated golden set, a simulated "
                                "clock); never set it in production", False)
    feedback_secret: str | None = _setting("VLOOP_FEEDBACK_SECRET", "HMAC key of feedback tokens, the same on "
                                           "every replica (default: derived from VLOOP_USER_KEY_SECRET)",
                                           secret=True)
    feedback_secret_previous: str | None = _setting("VLOOP_FEEDBACK_SECRET_PREVIOUS", "the key before a "
                                                    "rotation: its tokens are still accepted", secret=True)
    feedback_token_ttl_s: int = _setting("VLOOP_FEEDBACK_TOKEN_TTL_S", "seconds a feedback token stays valid",
                                         7 * 86400)
    feedback_max_events: int = _setting("VLOOP_FEEDBACK_MAX_EVENTS", "feedback events one answer takes (per "
                                        "replica); more are refused with 429", 20)
    api_keys: str | None = _setting("VLOOP_API_KEYS", "per-app API keys, \"key:app,key2:app2\"; when set (or "
                                    "the file is), chat and feedback need one", secret=True)
    api_keys_file: Path | None = _setting("VLOOP_API_KEYS_FILE", "file of 'KEY APP' lines (a key may be "
                                          "stored as sha256:<hex>)")
    cors_origins: str | None = _setting("VLOOP_CORS_ORIGINS", "comma-separated browser origins allowed to "
                                        "call chat and feedback (CORS); none by default")
    playground: bool = _setting("VLOOP_PLAYGROUND", "serve the /playground page (1/0)", False)

    def __post_init__(self):
        # Derived defaults: one home, everything else under it unless set explicitly.
        if self.lake_url is None:
            object.__setattr__(self, "lake_url", (Path(self.home) / "lake").resolve().as_uri())
        if self.spool_dir is None:
            object.__setattr__(self, "spool_dir", Path(self.home) / "spool")

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, effective value with secrets masked, meaning) for every setting."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = "(unset)" if value is None else ("****" if f.metadata["secret"] else str(value))
            out.append((f.metadata["env"], shown, f.metadata["doc"]))
        return out

    def __repr__(self) -> str:  # never print secrets by accident
        return "Settings(" + ", ".join(f"{k}={v}" for k, v, _ in self.describe()) + ")"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``); empty variables count as unset."""
    environ = os.environ if environ is None else environ
    kwargs = {}
    for f in fields(Settings):
        raw = environ.get(f.metadata["env"], "").strip()
        if not raw:
            continue
        kwargs[f.name] = _parse(f.metadata["env"], f.type, raw)
    return Settings(**kwargs)


def _parse(env: str, type_name: str, raw: str):
    if type_name == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{env}={raw!r} is not a boolean (1/0, true/false)")
    if type_name.startswith("int"):
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{env}={raw!r} is not an integer") from None
        if value <= 0:
            raise ConfigError(f"{env}={raw!r} must be positive")
        return value
    if type_name.startswith("Path"):
        return Path(raw).expanduser()
    return raw
