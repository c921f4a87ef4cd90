"""Privacy at the edge: pseudonymous user keys and PII redaction before anything is written, and
the lake's privacy records (opt-outs, tombstones of erased users, the audit log).

* :func:`user_key` — HMAC-SHA256 of the raw user id with ``VLOOP_USER_KEY_SECRET``; the raw id is
  never stored, and without the secret the key cannot be linked back to it.
* :func:`redact` — replaces e-mail addresses, phone numbers (Chinese mobile numbers in every
  common spelling, landlines with area codes, 400/800 service numbers, international numbers),
  Chinese resident ID numbers and bank card numbers with typed placeholders such as ``[PHONE]``,
  returning the clean text and how many spans it replaced.

How matching works: the text is NFKC-normalised first (full-width digits and letters such as
``１３８`` become ``138``; ideographic spaces become spaces), character by character so every match
maps back to a span of the original text, which is what gets replaced (the rest of the text keeps
its full-width punctuation). Numbers may carry single spaces, dashes or dots between digits.

What counts as what (and why):
* ID numbers: 18 characters (17 digits + digit/X) or 15 digits whose region starts 1-9 and whose
  birth date is a real date. The checksum is *not* required: a mistyped ID is still personal data.
* Bank cards: 13-19 digits that pass the Luhn check, or that follow a card word (卡号, card, …)
  whatever their checksum.
* Near an order word (订单, order, 物流, tracking, …) a long number is read as an order or parcel
  number and left alone unless it is a phone number: order numbers are what support chats are
  full of, and they identify an order, not a person.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import unicodedata

PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "bank_card": "[BANK_CARD]", "phone": "[PHONE]"}

_SEP = r"[ \-.\u2010\u2011\u2012\u2013\u2014]"  # what people put between digit groups (after NFKC)
_L = r"(?<![0-9A-Za-z])(?<!\d[ \-.])"  # not inside a longer number or word, grouped or not
_R = r"(?![0-9A-Za-z])"


def _digits(n: int) -> str:
    """``n`` digits with at most one separator between any two of them."""
    return rf"\d(?:{_SEP}?\d){{{n - 1}}}"


_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+\s?(?:@|\(at\)|\[at\])\s?[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_ID18 = re.compile(_L + rf"\d(?:{_SEP}?\d){{16}}{_SEP}?[\dXx]" + _R)
_ID15 = re.compile(_L + _digits(15) + _R)
_CARD = re.compile(_L + rf"\d(?:{_SEP}?\d){{12,18}}" + _R)
# +86 / 0086 / (+86), then 1[3-9] and nine more digits.
_CC86 = rf"(?:\(?(?:\+|00)\s?86\)?{_SEP}?\s?)"
_CN_MOBILE = re.compile(_L.replace("(?<![0-9A-Za-z])", "(?<![0-9A-Za-z+])") + rf"{_CC86}?1[3-9]\d(?:{_SEP}?\d){{8}}" + _R)
# Landlines: area code 0 + 2-3 digits (or without the 0 after +86), then a 7-8 digit number,
# optionally an extension (转 / ext / -).
_EXT = r"(?:\s?(?:转|分机|ext\.?|x|-)\s?\d{1,5})?"
_LANDLINE = re.compile(
    rf"(?:{_CC86}\(?[1-9]\d{{1,2}}\)?|{_L}\(?0[1-9]\d{{1,2}}\)?)\s?{_SEP}?\s?\d{{3,4}}{_SEP}?\d{{4}}{_EXT}" + _R)
_HOTLINE = re.compile(_L + rf"[48]00{_SEP}?\d{{3}}{_SEP}?\d{{4}}" + _R)
_INTL = re.compile(r"(?<![\w+])(?:"
                   r"\+\d{1,3}[ \-.]?\(?\d{1,4}\)?(?:[ \-.]?\d{2,4}){2,4}"  # +country ...
                   r"|\(\d{2,4}\)[ \-.]?\d{3,4}[ \-.]?\d{3,4}"  # (area) 555-0132
                   r"|\d{3}[ \-.]\d{3,4}[ \-.]\d{4}"  # 415-555-0132
                   r")(?!\d)")

_ORDER_WORDS = ("订单", "单号", "运单", "快递", "物流", "发票", "order", "tracking", "parcel", "invoice", "sku")
_CARD_WORDS = ("卡号", "银行卡", "信用卡", "储蓄卡", "借记卡", "卡", "card", "account", "acct")
_CONTEXT = 14  # characters before a number that decide what it is


def _normalise(text: str) -> tuple[str, list[int]]:
    """NFKC per character, and for each character of the result the index it came from."""
    out, origin = [], []
    for i, ch in enumerate(text):
        n = unicodedata.normalize("NFKC", ch)
        out.append(n)
        origin.extend([i] * len(n))
    return "".join(out), origin


def _real_date(y: int, m: int, d: int) -> bool:
    try:
        dt.date(y, m, d)
    except ValueError:
        return False
    return 1900 <= y <= dt.date.today().year


def _id_like(digits: str) -> bool:
    """A resident ID's shape: region starting 1-9 and a real birth date (checksum not required)."""
    if digits[0] == "0":
        return False
    if len(digits) == 18:
        return _real_date(int(digits[6:10]), int(digits[10:12]), int(digits[12:14]))
    if len(digits) == 15 and digits.isdigit():
        return _real_date(1900 + int(digits[6:8]), int(digits[8:10]), int(digits[10:12]))
    return False


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


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def _valid_cn_id(s: str) -> bool:
    """The ISO 7064 checksum of an 18-character ID (kept for callers that want a strict check)."""
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == s[17].upper()


def user_key(user_id: str, secret: str | bytes) -> str:
    """The pseudonymous key stored instead of ``user_id``."""
    if not secret:
        raise ValueError("VLOOP_USER_KEY_SECRET is not set: refusing to derive user keys without a secret")
    if isinstance(secret, str):
        secret = secret.encode()
    return hmac.new(secret, str(user_id).encode(), hashlib.sha256).hexdigest()


def redact(text: str | None) -> tuple[str | None, int]:
    """``text`` with PII replaced by placeholders, and the number of replacements."""
    if not text:
        return text, 0
    norm, origin = _normalise(text)
    lower = norm.lower()
    spans: list[tuple[int, int, str]] = []  # (start, end, kind) in ``norm``, never overlapping

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e, _ in spans)

    def before(a: int) -> str:
        return lower[max(0, a - _CONTEXT):a]

    def order_context(a: int) -> bool:
        ctx = before(a)
        return any(w in ctx for w in _ORDER_WORDS) and not any(w in ctx for w in _CARD_WORDS[:2])

    def claim(pattern, kind, check=lambda m, digits: True):
        for m in pattern.finditer(norm):
            a, b = m.span()
            digits = re.sub(r"[^0-9Xx]", "", m.group(0))
            if free(a, b) and check(m, digits):
                spans.append((a, b, kind))

    claim(_EMAIL, "email")
    # Mobile and service numbers before cards (a +86 mobile number can pass the Luhn check); the
    # boundaries keep them from starting or ending inside a longer number, grouped or not.
    claim(_CN_MOBILE, "phone")
    claim(_HOTLINE, "phone")
    claim(_CARD, "bank_card", lambda m, d: not order_context(m.start()) and not _id_like(d) and (
        _luhn(d) or any(w in before(m.start()) for w in _CARD_WORDS)))
    claim(_ID18, "cn_id", lambda m, d: _id_like(d) and not order_context(m.start()))
    claim(_ID15, "cn_id", lambda m, d: _id_like(d) and not order_context(m.start()))
    claim(_LANDLINE, "phone")
    claim(_INTL, "phone", lambda m, d: not order_context(m.start()))
    if not spans:
        return text, 0
    out, pos = [], 0
    for a, b, kind in sorted(spans):
        start, end = origin[a], origin[b - 1] + 1
        out.append(text[pos:start])
        out.append(PLACEHOLDERS[kind])
        pos = end
    out.append(text[pos:])
    return "".join(out), len(spans)


# -- the lake's privacy records ---------------------------------------------------------------------
# One object per user key, so concurrent opt-outs, removals and erasures never overwrite each other
# (a single JSON list would be a read-modify-write race).
OPT_OUTS = "privacy/opt_outs/"  # user keys whose records are never logged, labelled or trained on
LEGACY_OPT_OUTS_KEY = "privacy/opt_outs.json"  # the list earlier versions wrote; still honoured
TOMBSTONES = "privacy/tombstones/"  # user keys erased on request: nothing of theirs may come back
AUDIT = "privacy/audit/"  # append-only: one object per privacy action
# What a stored user key may look like: an HMAC in hex in production; any short token in tests. It
# becomes part of an object key, so nothing that could leave the prefix.
_USER_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def is_user_key(value) -> bool:
    """Whether ``value`` can be a stored user key. A missing or malformed key cannot be checked
    against opt-outs and erasures, so its records are excluded (fail closed)."""
    return isinstance(value, str) and bool(_USER_KEY.match(value))


def _check_key(key: str) -> str:
    if not is_user_key(key):
        raise ValueError(f"not a user key (the HMAC of a user id, letters and digits): {key!r}")
    return key


def _keys_under(lake, prefix: str) -> set[str]:
    return {k[len(prefix):].removesuffix(".json") for k in lake.list(prefix) if k.endswith(".json")}


def read_opt_outs(lake) -> set[str]:
    """The user keys that opted out (empty when none did)."""
    legacy = set(lake.get_json(LEGACY_OPT_OUTS_KEY)) if lake.exists(LEGACY_OPT_OUTS_KEY) else set()
    return _keys_under(lake, OPT_OUTS) | legacy


def record_opt_out(lake, key: str, *, actor: str = "gateway", at: dt.datetime | None = None) -> bool:
    """Opt ``key`` out. True when it was not opted out before."""
    new = lake.put_bytes_if_absent(f"{OPT_OUTS}{_check_key(key)}.json",
                                   _json({"user_key": key, "at": _iso(at), "actor": actor}), "application/json")
    if new:
        audit(lake, "opt-out add", actor=actor, user_key=key, at=at)
    return new


def remove_opt_out(lake, key: str, *, actor: str, at: dt.datetime | None = None) -> bool:
    """Take ``key`` off the opt-out list (the user opted back in). True when it was on it."""
    k = f"{OPT_OUTS}{_check_key(key)}.json"
    was = lake.exists(k)
    if was:
        lake.delete(k)
    if lake.exists(LEGACY_OPT_OUTS_KEY):  # the old list, rewritten without the key
        legacy = lake.get_json(LEGACY_OPT_OUTS_KEY)
        if key in legacy:
            lake.put_json(LEGACY_OPT_OUTS_KEY, sorted(set(legacy) - {key}))
            was = True
    if was:
        audit(lake, "opt-out remove", actor=actor, user_key=key, at=at)
    return was


def read_tombstones(lake) -> set[str]:
    """The user keys erased on request."""
    return _keys_under(lake, TOMBSTONES)


def record_tombstone(lake, key: str, *, at: dt.datetime | None = None) -> bool:
    """Remember that ``key`` was erased (the key only). True when it is new."""
    return lake.put_bytes_if_absent(f"{TOMBSTONES}{_check_key(key)}.json",
                                    _json({"user_key": key, "erased_at": _iso(at)}), "application/json")


def excluded_users(lake) -> set[str]:
    """Users none of whose records may be labelled or trained on: opted out or erased."""
    return read_opt_outs(lake) | read_tombstones(lake)


def audit(lake, action: str, *, actor: str, at: dt.datetime | None = None, **details) -> str:
    """Append one privacy action to the audit log (who, when, what, counts; user keys, never raw
    ids). Returns its key."""
    import uuid

    when = at or dt.datetime.now(dt.timezone.utc)
    key = f"{AUDIT}{when:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.json"
    lake.put_bytes(key, _json({"action": action, "actor": actor, "at": when.isoformat(), **details}),
                   "application/json")
    return key


def audit_log(lake) -> list[dict]:
    """Every audited privacy action, oldest first."""
    return [lake.get_json(k) for k in sorted(lake.list(AUDIT)) if k.endswith(".json")]


def _iso(at: dt.datetime | None) -> str:
    return (at or dt.datetime.now(dt.timezone.utc)).isoformat()


def _json(obj) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True).encode()
