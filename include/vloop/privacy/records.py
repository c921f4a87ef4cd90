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
* Bank cards: 14-19 digits starting 3-6 (the card networks' prefixes) that pass the Luhn check,
  or 13-19 digits next to a card word (卡号, card, …, before or after) whatever their checksum;
  barcodes (13 digits) and big round quantities are not cards.
* After an order word (订单, 编号, 发票号, order, tracking, invoice, …) a long number is read as an
  order, invoice or parcel number and left alone — order numbers are what support chats are full
  of, and identify an order, not a person — unless it is a mobile number or a +country / (area)
  phone number, an ID or card word stands before or after it (订单收件人身份证…, "… 是我的身份证号"),
  or it *proves* what it is: an 18-digit ID whose ISO 7064 check digit is right, or a card number
  (network prefix, 14-19 digits) that passes the Luhn check. About 1 random order number in 25
  passes as a card (1 in 10 pass Luhn, 4 in 10 start 3-6): a small price so that the word before
  a number never hides a real ID or card. An order word *after* a number does not count ("call
  +1 415 555 0132 re order 5531").
* Context words are whole words for Latin script ("id" in "did" or "video" is no ID word) and plain
  substrings for Chinese; the window after a number stops at the next digit, so the next number's
  word does not decide this one.
* Numbers may follow letters ("tel13800138000") and spaces; digit groups may be split by one or two
  spaces, dashes, dots, tildes or middle dots, and digits typed one by one with a separator after
  each ("1 3 8 0 0 1 3 8 0 0 0", "1-3-8-…") are read as one number.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import unicodedata

PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "bank_card": "[BANK_CARD]", "phone": "[PHONE]"}

# Between digit groups people type spaces (one or two), dashes of every kind, dots, tildes and
# middle dots (after NFKC: full-width forms are already ASCII here).
_SEP = r"(?:\s{0,2}[\-.~·・\u2010-\u2015\u2212]\s{0,2}|\s{1,2})"
# A number starts where no digit (nor a digit and a dash or dot) comes before it: letters may
# ("tel13800138000", "ID11010519...") and so may a space ("房间1203 13800138000").
_NUM_L = r"(?<!\d)(?<!\d[\-.~·・\u2010-\u2015\u2212])"
_NUM_R = r"(?!\d)"
# Cards are stricter: not glued to letters (parcel codes such as SF1234567890123).
_CARD_L = r"(?<![0-9A-Za-z])(?<!\d[ \-.])"
_CARD_R = r"(?![0-9A-Za-z])"


def _digits(n: int) -> str:
    """``n`` digits with at most one separator between any two of them."""
    return rf"\d(?:{_SEP}?\d){{{n - 1}}}"


# Bounded parts keep matching linear in the text's length (an unbounded local part made a long
# run of letters quadratic).
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]{1,64}\s?(?:@|\(at\)|\[at\])\s?[A-Za-z0-9\-]{1,63}"
                    r"(?:\s?[.。]\s?[A-Za-z0-9\-]{1,63}){0,4}\s?[.。]\s?[A-Za-z]{2,24}(?![A-Za-z])")
_ID18 = re.compile(_NUM_L + rf"\d(?:{_SEP}?\d){{16}}{_SEP}?[\dXx]" + r"(?![\dXx])")
_ID15 = re.compile(_NUM_L + _digits(15) + _NUM_R)
_CARD = re.compile(_CARD_L + rf"\d(?:{_SEP}?\d){{12,18}}" + _CARD_R)
# +86 / 0086 / (+86) / a bare 86, then 1[3-9] and nine more digits.
_CC86 = rf"(?:\(?(?:\+|00)?\s?86\)?{_SEP}?)"
_CN_MOBILE = re.compile(_NUM_L + rf"{_CC86}?1[3-9]\d(?:{_SEP}?\d){{8}}" + _NUM_R)
# Landlines: area code 0 + 2-3 digits (or, after +86 and an optional "(0)", without the 0), then a
# 7-8 digit number, optionally an extension (转 / ext / -).
_EXT = r"(?:\s?(?:转|分机|ext\.?|x|-)\s?\d{1,5})?"
_LANDLINE = re.compile(_NUM_L + rf"(?:{_CC86}(?:\(0\))?\s?\(?[1-9]\d{{1,2}}\)?|\(?0[1-9]\d{{1,2}}\)?)"
                       rf"(?:{_SEP})?\d(?:{_SEP}?\d){{6,7}}{_EXT}" + _NUM_R)
_HOTLINE = re.compile(_NUM_L + rf"[48]00(?:{_SEP}?\d){{7}}" + _NUM_R)  # 400/800, any grouping
_INTL = re.compile(r"(?<![\w+])(?:"
                   r"\+\d{1,3}[ \-.]?\(?\d{1,4}\)?(?:[ \-.]?\d{2,4}){2,4}"  # +country ...
                   r"|\(\d{2,4}\)[ \-.]?\d{3,4}[ \-.]?\d{3,4}"  # (area) 555-0132
                   r"|\d{3}[ \-.]\d{3,4}[ \-.]\d{4}"  # 415-555-0132
                   r")(?!\d)")

_ORDER_WORDS = ("订单", "单号", "运单", "快递单", "物流", "发票号", "发票代码", "编号", "交易号", "流水号", "条码", "条形码", "包裹",
                "order", "tracking", "parcel", "invoice", "sku", "barcode", "waybill", "shipment", "receipt")
_CARD_WORDS = ("卡号", "银行卡", "信用卡", "储蓄卡", "借记卡", "卡", "card", "account", "acct", "visa", "mastercard")
_ID_WORDS = ("身份证", "证件", "实名", "护照", "id", "passport")
_CARD_PREFIXES = "3456"  # Amex/JCB/Diners 3, Visa 4, Mastercard 5, UnionPay/Discover 6
_CONTEXT = 14  # characters before a number that decide what it is
_CONTEXT_AFTER = 12  # and after it ("11010519… 是我的身份证号", "… is my card")


def _words(words) -> re.Pattern:
    """Chinese words as substrings; Latin ones as whole words (an optional plural s), so "id" is
    not found in "did" nor "card" in "discard"."""
    latin = [w for w in words if w.isascii()]
    other = [w for w in words if not w.isascii()]
    alts = [re.escape(w) for w in other] + [rf"(?<![a-z]){re.escape(w)}s?(?![a-z])" for w in latin]
    return re.compile("|".join(alts))


_PHONE_WORDS = ("电话", "手机", "座机", "热线", "联系", "致电", "拨打", "传真", "tel", "phone", "telephone", "call", "mobile",
                "fax")
_ORDER_RE, _CARD_RE, _ID_RE = _words(_ORDER_WORDS), _words(_CARD_WORDS), _words(_ID_WORDS)
_PHONE_RE = _words(_PHONE_WORDS)
# Digits typed one by one with a separator after each ("1 3 8 0 0 1 3 8 0 0 0"): seven or more in a
# row are one number, so their separators are taken out before matching (the patterns allow a
# separator between any two digits, but a mobile number's "1[3-9]" and an area code's "0xx" must
# be typed together). Shorter runs ("1 2 3") stay lists.
_SINGLES = re.compile(rf"\d(?:{_SEP}\d(?!\d)){{6,}}")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _normalise(text: str) -> tuple[str, list[int]]:
    """NFKC per character with the separators of one-by-one digits taken out, and for each
    character of the result the index of the original character it came from."""
    out, origin = [], []
    for i, ch in enumerate(text):
        n = unicodedata.normalize("NFKC", ch)
        out.append(n)
        origin.extend([i] * len(n))
    norm = "".join(out)
    drop = set()
    for m in _SINGLES.finditer(norm):
        drop.update(i for i in range(m.start(), m.end()) if not norm[i].isdigit())
    if drop:
        norm = "".join(c for i, c in enumerate(norm) if i not in drop)
        origin = [o for i, o in enumerate(origin) if i not in drop]
    return norm, origin


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


def _id_checksum_ok(digits: str) -> bool:
    """An 18-character ID's check digit is right (ISO 7064 MOD 11-2): proof enough that a number
    is an ID whatever word stands before it."""
    if len(digits) != 18 or not digits[:17].isdigit():
        return False
    return "10X98765432"[sum(int(c) * w for c, w in zip(digits, _ID_WEIGHTS)) % 11] == digits[17].upper()


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

    def before(m) -> str:
        """The words before a number, counted from the start of the code it is glued to
        ("tracking 1Z12345E0205…": the word is before the whole code)."""
        a = m.start()
        while a > max(0, m.start() - _CONTEXT) and norm[a - 1].isascii() and norm[a - 1].isalnum():
            a -= 1  # bounded: a long run of letters and digits must not make this quadratic
        return lower[max(0, a - _CONTEXT):m.start()]

    def after(m) -> str:
        """The words after a number, up to the next digit (the next number's words are its own)."""
        return re.split(r"\d", lower[m.end():m.end() + _CONTEXT_AFTER], maxsplit=1)[0]

    def said(m, words: re.Pattern) -> bool:
        return bool(words.search(before(m)) or words.search(after(m)))

    def order_context(m) -> bool:
        """An order word before the number, and no word before or after it saying it is an ID or
        a card. An order word *after* a number does not count: "call +1 415 555 0132 re order
        5531" names a phone and then an order."""
        return bool(_ORDER_RE.search(before(m))) and not (said(m, _ID_RE) or said(m, _CARD_RE))

    def landline(m, d: str) -> bool:
        """After an order word, digits that look like a landline are part of the order, invoice or
        parcel number — glued to its letters (运单号 SF0242…), the tail of a grouped number (order
        5521 0873 4410 2297) or typed in one unbroken run (发票代码 044001900111) — unless a phone
        word says otherwise."""
        if not order_context(m) or said(m, _PHONE_RE):
            return True
        a = m.start()
        glued = a > 0 and norm[a - 1].isascii() and norm[a - 1].isalpha()
        tail = bool(re.search(r"\d[ \-.]{1,2}$", norm[max(0, a - 3):a]))
        return not (glued or tail or m.group(0).isdigit())

    def card(m, d: str) -> bool:
        if _id_like(d) or _CN_MOBILE.fullmatch(m.group(0)):
            return False
        if d[0] in _CARD_PREFIXES and len(d) >= 14 and _luhn(d):
            return True  # a card by its checksum, whatever word stands next to it
        return said(m, _CARD_RE)  # said to be a card: whatever its checksum

    def cn_id(m, d: str) -> bool:
        # A right check digit is proof; a mistyped ID is one unless it is said to be an order number.
        return _id_like(d) and (_id_checksum_ok(d) or not order_context(m))

    def claim(pattern, kind, check=lambda m, digits: True):
        for m in pattern.finditer(norm):
            a, b = m.span()
            digits = re.sub(r"[^0-9Xx]", "", m.group(0))
            if free(a, b) and check(m, digits):
                spans.append((a, b, kind))

    claim(_EMAIL, "email")
    # Longest numbers first, so a phone number is never taken out of the middle of a card (a
    # +86 mobile number, which can pass the Luhn check, is not a card: see card()).
    claim(_CARD, "bank_card", card)
    claim(_ID18, "cn_id", cn_id)
    claim(_ID15, "cn_id", cn_id)
    claim(_CN_MOBILE, "phone")
    claim(_HOTLINE, "phone")
    claim(_LANDLINE, "phone", landline)
    # "+44 …" and "(212) …" are marked as phones; a bare 3-3/4-4 group after an order word is an order's.
    claim(_INTL, "phone", lambda m, d: m.group(0)[0] in "+(" or not order_context(m) or said(m, _PHONE_RE))
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


# What :func:`user_key` produces: HMAC-SHA256 in lowercase hex. Where a person types a key
# (``vloop privacy … --user-key``) only this is accepted: a key cut short (logs print 12
# characters) or mistyped is refused instead of being erased or opted out as if it were a user.
_HMAC_KEY = re.compile(r"^[0-9a-f]{64}$")


def is_hmac_user_key(value) -> bool:
    """Whether ``value`` is a whole key as :func:`user_key` makes it (64 lowercase hex digits)."""
    return isinstance(value, str) and bool(_HMAC_KEY.match(value))


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


ERASED_REQUESTS = "privacy/erased_requests/"  # per erased user: hashes of their request ids


def request_hash(request_id) -> str | None:
    """SHA-256 of a request id: what the lake keeps about an erased user's requests, so a late
    copy (a re-shipped spool segment, an annotation pulled again) is recognised and dropped
    without keeping the list of their requests."""
    return hashlib.sha256(str(request_id).encode()).hexdigest() if request_id else None


def record_erased_requests(lake, key: str, hashes: set[str]) -> set[str]:
    """Add ``hashes`` to ``key``'s erased-request record; returns all of them."""
    k = f"{ERASED_REQUESTS}{_check_key(key)}.json"
    exists = lake.exists(k)
    have = set(lake.get_json(k)["request_id_sha256"]) if exists else set()
    if not exists or not hashes <= have:  # also for a user with nothing stored: the record exists
        lake.put_json(k, {"user_key": key, "request_id_sha256": sorted(have | hashes)})
    return have | hashes


def erased_request_hashes(lake, key: str | None = None) -> set[str]:
    """Hashes of erased users' request ids (of one user, or all)."""
    keys = [f"{ERASED_REQUESTS}{key}.json"] if key else [k for k in lake.list(ERASED_REQUESTS) if k.endswith(".json")]
    out: set[str] = set()
    for k in keys:
        if lake.exists(k):
            out |= set(lake.get_json(k)["request_id_sha256"])
    return out


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
