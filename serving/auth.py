"""Who may talk to the gateway: per-app API keys, and feedback tokens that tie an event to an answer.

**Feedback tokens.** Accept and edit rates decide promotion and rollback, and edits become
training data, so ``POST /v1/feedback`` only takes events for an answer its caller was given. Every
answer carries a token (``vloop.feedback_token`` and the ``X-Vloop-Feedback-Token`` header)::

    v1.<request_id>.<expiry, unix s>.<user digest>.<MAC>

The MAC is HMAC-SHA256 over the other fields, truncated to 128 bits (RFC 2104 allows truncation
to half the output; 128 bits leave nothing to guess), with a key every replica shares, so a
token issued by one replica is good on all. The user digest is 16 hex digits of sha256 of the
record's user key: it lets a feedback call that names a user be checked against the token
without putting the (linkable) user key itself into the browser. Nothing in a token is secret;
it is a signature, not a ciphertext.

**API keys.** ``VLOOP_API_KEYS="key:app,..."`` or ``VLOOP_API_KEYS_FILE`` (lines ``key app``, or
``sha256:<hex> app`` so the file holds no usable key). The app name goes into each record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_VERSION = "v1"
FEEDBACK_TOKEN_HEADER = "X-Vloop-Feedback-Token"  # an answer's token, and where feedback may send it back
MAC_BYTES = 16
# Request ids the gateway issues: no dots, so a token splits unambiguously.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DERIVE_LABEL = b"vloop feedback token key v1"


class TokenError(Exception):
    """A refused token: ``status`` 401 (not a valid token) or 403 (valid, but not for this);
    ``reason`` the metric label, ``message`` what the client is told."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def user_digest(user_key: str | None) -> str:
    return hashlib.sha256((user_key or "").encode()).hexdigest()[:16]


def derive_secret(user_key_secret: str) -> bytes:
    """A feedback-token key derived from VLOOP_USER_KEY_SECRET when VLOOP_FEEDBACK_SECRET is not
    set: every replica already shares that secret, and the label separates the two uses, so a
    token MAC never doubles as a user key."""
    return hmac.new(user_key_secret.encode(), _DERIVE_LABEL, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Claims:
    request_id: str
    expires: int
    user: str  # user_digest of the record's user key


class FeedbackTokens:
    """Issues and checks feedback tokens. ``previous`` keys are accepted, never used to sign, so
    a key can be rotated replica by replica without refusing tokens already handed out."""

    def __init__(self, secret: bytes, previous: list[bytes] | tuple = (), ttl_s: int = 7 * 86400):
        if not secret:
            raise ValueError("a feedback-token key is needed")
        self.secret, self.previous, self.ttl_s = secret, tuple(k for k in previous if k), ttl_s

    def _mac(self, key: bytes, payload: str) -> str:
        return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest()[:MAC_BYTES])

    def issue(self, request_id: str, user_key: str | None, now: float | None = None) -> str:
        exp = int((time.time() if now is None else now) + self.ttl_s)
        payload = f"{TOKEN_VERSION}.{request_id}.{exp}.{user_digest(user_key)}"
        return f"{payload}.{self._mac(self.secret, payload)}"

    def verify(self, token: object, request_id: object, user_key: str | None = None,
               now: float | None = None) -> Claims:
        """The token's claims if it is genuine, unexpired, for ``request_id`` and (when the
        caller names a user) for that user; raises :class:`TokenError` otherwise. Real time,
        never a simulated clock: expiry is about the token, not the record."""
        if token is None or token == "":
            raise TokenError(401, "missing", "feedback needs the answer's feedback token: 'feedback_token' in "
                                              "the body or the X-Vloop-Feedback-Token header")
        parts = token.split(".") if isinstance(token, str) and len(token) <= 512 else []
        if len(parts) != 5 or parts[0] != TOKEN_VERSION or not parts[2].isdigit():
            raise TokenError(401, "malformed", "feedback token is malformed")
        payload, mac = token.rsplit(".", 1)
        if not any(hmac.compare_digest(mac, self._mac(k, payload)) for k in (self.secret, *self.previous)):
            raise TokenError(401, "forged", "feedback token signature is not valid")
        claims = Claims(parts[1], int(parts[2]), parts[3])
        if claims.expires < (time.time() if now is None else now):
            raise TokenError(401, "expired", "feedback token has expired")
        if claims.request_id != request_id:
            raise TokenError(403, "other_request", "feedback token was issued for another request")
        if user_key is not None and user_digest(user_key) != claims.user:
            raise TokenError(403, "other_user", "feedback token was issued to another user")
        return claims


class ApiKeys:
    """Known API keys → app names. Keys are kept as sha256 digests in memory too, so a lookup
    is one hash and a dict probe (no per-key loop, no timing difference between keys)."""

    def __init__(self, by_digest: dict[str, str]):
        self.by_digest = by_digest

    def __bool__(self) -> bool:
        return bool(self.by_digest)

    @staticmethod
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def app_for(self, key: str | None) -> str | None:
        return self.by_digest.get(self.digest(key)) if key else None

    @classmethod
    def parse(cls, spec: str | None = None, file: str | Path | None = None) -> "ApiKeys":
        """From ``VLOOP_API_KEYS`` ("key:app,key2:app2") and/or ``VLOOP_API_KEYS_FILE`` (one
        ``KEY APP`` per line, ``#`` comments; ``sha256:<64 hex> APP`` stores a key hashed)."""
        out: dict[str, str] = {}

        def add(key: str, app: str, where: str) -> None:
            key, app = key.strip(), app.strip()
            if not key or not app:
                raise ValueError(f"{where}: need a key and an app name")
            if key.startswith("sha256:"):
                d = key[7:].lower()
                if not re.fullmatch(r"[0-9a-f]{64}", d):
                    raise ValueError(f"{where}: sha256: must be followed by 64 hex digits")
            else:
                if len(key) < 16:  # a guessable key would make the whole check decorative
                    raise ValueError(f"{where}: API key for app {app!r} is shorter than 16 characters")
                d = cls.digest(key)
            out[d] = app

        for i, item in enumerate(x for x in (spec or "").split(",") if x.strip()):
            key, sep, app = item.rpartition(":")
            if not sep:
                raise ValueError(f"VLOOP_API_KEYS entry {i + 1}: expected KEY:APP")
            add(key, app, f"VLOOP_API_KEYS entry {i + 1}")
        if file:
            for n, line in enumerate(Path(file).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                fields = line.split()
                if len(fields) != 2:
                    raise ValueError(f"{file}:{n}: expected 'KEY APP'")
                add(fields[0], fields[1], f"{file}:{n}")
        return cls(out)
