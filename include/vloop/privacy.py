"""Privacy at the edge: pseudonymous user keys and PII redaction before anything is written.

* :func:`user_key` — HMAC-SHA256 of the raw user id with ``VLOOP_USER_KEY_SECRET``; the raw id is
  never stored, and without the secret the key cannot be linked back to it.
* :func:`redact` — replaces e-mail addresses, phone numbers (Chinese mobile numbers included),
  Chinese resident ID numbers and bank card numbers with typed placeholders such as ``[EMAIL]``,
  returning the clean text and how many spans it replaced. ID numbers must pass their checksum
  and card numbers the Luhn check, so order numbers and prices survive.
"""

from __future__ import annotations

import hashlib
import hmac
import re

PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "bank_card": "[BANK_CARD]", "phone": "[PHONE]"}

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
# 18-character resident ID: 6-digit region, birth date, 3-digit sequence, checksum digit or X.
_CN_ID = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])")
# Card numbers: 13-19 digits, optionally grouped by spaces or dashes.
_CARD = re.compile(r"(?<!\d)(?:\d[ \-]?){12,18}\d(?!\d)")
# Chinese mobile numbers (optionally +86), then other international/local phone formats.
_CN_MOBILE = re.compile(r"(?<!\d)(?:\+?86[ \-]?)?1[3-9]\d[ \-]?\d{4}[ \-]?\d{4}(?!\d)")
_PHONE = re.compile(r"(?<![\w+])(?:"
                    r"\+\d{1,3}[ \-.]?\(?\d{1,4}\)?(?:[ \-.]?\d{2,4}){2,4}"  # +country ...
                    r"|\(\d{2,4}\)[ \-.]?\d{3,4}[ \-.]?\d{3,4}"  # (area) 555-0132
                    r"|\d{3}[ \-.]\d{3,4}[ \-.]\d{4}"  # 415-555-0132
                    r")(?!\d)")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def user_key(user_id: str, secret: str | bytes) -> str:
    """The pseudonymous key stored instead of ``user_id``."""
    if not secret:
        raise ValueError("VLOOP_USER_KEY_SECRET is not set: refusing to derive user keys without a secret")
    if isinstance(secret, str):
        secret = secret.encode()
    return hmac.new(secret, str(user_id).encode(), hashlib.sha256).hexdigest()


def _valid_cn_id(s: str) -> bool:
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17].upper()


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def redact(text: str | None) -> tuple[str | None, int]:
    """``text`` with PII replaced by placeholders, and the number of replacements."""
    if not text:
        return text, 0
    count = 0

    def sub(pattern, placeholder, check=None):
        nonlocal text, count

        def repl(m):
            nonlocal count
            if check is not None and not check(m.group(0)):
                return m.group(0)
            count += 1
            return placeholder

        text = pattern.sub(repl, text)

    sub(_EMAIL, PLACEHOLDERS["email"])
    sub(_CN_ID, PLACEHOLDERS["cn_id"], _valid_cn_id)
    # Phones before cards: a +86 mobile number can pass the Luhn check by chance.
    sub(_CN_MOBILE, PLACEHOLDERS["phone"])
    sub(_PHONE, PLACEHOLDERS["phone"])
    sub(_CARD, PLACEHOLDERS["bank_card"], lambda s: _luhn(re.sub(r"\D", "", s)))
    return text, count


OPT_OUTS_KEY = "privacy/opt_outs.json"  # lake key: user_keys whose records must never be labelled or trained on


def read_opt_outs(lake) -> set[str]:
    """The user keys that opted out, as recorded in the lake (empty when none did)."""
    return set(lake.get_json(OPT_OUTS_KEY)) if lake.exists(OPT_OUTS_KEY) else set()


def record_opt_out(lake, user_key: str) -> set[str]:
    """Add ``user_key`` to the lake's opt-out list (read-modify-write of one small JSON object)."""
    keys = read_opt_outs(lake) | {user_key}
    lake.put_json(OPT_OUTS_KEY, sorted(keys))
    return keys
