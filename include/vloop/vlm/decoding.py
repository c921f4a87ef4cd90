"""The decoding policy: phrases the model must never say (hedges such as 可能, 大概, maybe).

Where the phrases come from: the daily report lists the phrases users most often delete when they
edit an answer (``reports/dt=D/deleted_phrases.parquet``); a person approves one into the policy
with ``vloop decoding ban PHRASE --reason ...``.

**Storage** (the lake, so every serving replica sees the same policy): each change is a new
numbered version, ``config/decoding/<version>.json``, created with a conditional write so two
people changing the policy at once cannot lose each other's change (the second gets
:class:`PolicyConflict` and retries on the new head); ``config/decoding.json`` is a copy of the
newest, for people and tools that read one file. :class:`PolicyCache` re-reads the head at most
every ``ttl_s`` seconds: a replica picks up a change without a restart.

**Enforcement** (:class:`BannedPhrases`, a logits processor for ``transformers`` generation):
the check is on the *bytes* of the decoded answer, not on token ids, because a phrase can be
spelled by many token sequences — byte-level BPE splits Chinese characters into partial UTF-8
pieces and merges them with their neighbours differently in different contexts (可能 may come as
``可|能``, ``可能是``, or three byte fragments). At every step, a token is masked when appending its
bytes to the answer so far would complete a banned phrase: either the token contains the whole
phrase, or the answer ends with the phrase's first ``k`` bytes and the token starts with the rest.
Every tokenisation is covered, and the decoded answer never contains the phrase. Latin phrases
are banned in their lower-case, capitalised and upper-case forms.

**Longer words that contain a banned phrase** (不可能, "impossible", contains 可能, "maybe"): the
policy's ``exceptions`` list such words. A banned phrase is allowed where the text just before it
is the part of an exception that precedes the phrase — 可能 right after 不 — so 不可能 can be said
while 可能 alone cannot. Only the left context is checked (generation cannot see ahead), so an
exception is a word in which the banned phrase comes last or is followed by anything
(不可能, 不可能的).

The upstream path (vLLM) receives the phrases as vLLM's ``bad_words``; vLLM bans the token
sequences of a word's tokenisations (with and without a leading space), not every byte path, and
knows no exceptions.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace

HISTORY = "config/decoding/"
CURRENT = "config/decoding.json"
MAX_PHRASE_CHARS = 50
DEFAULT_EXCEPTIONS = ("不可能",)


class PolicyError(ValueError):
    """A phrase the policy cannot hold (empty, too long), or an unknown one to unban."""


class PolicyConflict(PolicyError):
    """Someone else changed the policy since it was read; read it again and retry."""


@dataclass(frozen=True)
class DecodingPolicy:
    version: int = 0  # 0: nothing banned yet
    banned: tuple[str, ...] = ()
    exceptions: tuple[str, ...] = DEFAULT_EXCEPTIONS
    at: str = ""
    actor: str = ""
    reason: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2).encode()

    @classmethod
    def from_json(cls, d: dict) -> "DecodingPolicy":
        return cls(**{**d, "banned": tuple(d.get("banned", ())), "exceptions": tuple(d.get("exceptions", ()))})


def _clean(phrase: str) -> str:
    if not isinstance(phrase, str):
        raise PolicyError(f"a phrase must be text, got {type(phrase).__name__}")
    p = re.sub(r"\s+", " ", phrase).strip()
    if not p:
        raise PolicyError("an empty phrase cannot be banned")
    if len(p) > MAX_PHRASE_CHARS:
        raise PolicyError(f"phrase {p[:20]!r}... is {len(p)} characters, over {MAX_PHRASE_CHARS}")
    return p


def current(lake) -> DecodingPolicy:
    """The newest policy version in the lake (an empty policy when none was ever written)."""
    keys = sorted(k for k in lake.list(HISTORY) if k.endswith(".json"))
    return DecodingPolicy.from_json(lake.get_json(keys[-1])) if keys else DecodingPolicy()


def _write(lake, head: DecodingPolicy, changes: dict, *, actor: str, reason: str) -> DecodingPolicy:
    new = replace(head, **changes, version=head.version + 1, at=dt.datetime.now(dt.timezone.utc).isoformat(),
                  actor=actor, reason=reason)
    if not lake.put_bytes_if_absent(f"{HISTORY}{new.version:08d}.json", new.to_json(), "application/json"):
        raise PolicyConflict(f"decoding policy version {new.version} was written by someone else meanwhile; "
                             f"read it again (vloop decoding list) and retry")
    lake.put_bytes(CURRENT, new.to_json(), "application/json")  # a copy of the head, for reading
    return new


def ban(lake, phrases, *, actor: str, reason: str) -> DecodingPolicy:
    """Add ``phrases`` to the banned list (already banned ones are ignored); a new version."""
    head = current(lake)
    add = [p for p in dict.fromkeys(_clean(p) for p in phrases) if p not in head.banned]
    if not add:
        return head
    return _write(lake, head, {"banned": head.banned + tuple(add)}, actor=actor, reason=reason)


def unban(lake, phrases, *, actor: str, reason: str) -> DecodingPolicy:
    """Remove ``phrases`` from the banned list; unknown ones are an error (a typo, not a no-op)."""
    head = current(lake)
    drop = [_clean(p) for p in phrases]
    unknown = [p for p in drop if p not in head.banned]
    if unknown:
        raise PolicyError(f"not banned: {', '.join(unknown)} (banned now: {', '.join(head.banned) or 'nothing'})")
    return _write(lake, head, {"banned": tuple(p for p in head.banned if p not in drop)}, actor=actor, reason=reason)


def history(lake) -> list[DecodingPolicy]:
    return [DecodingPolicy.from_json(lake.get_json(k)) for k in sorted(lake.list(HISTORY)) if k.endswith(".json")]


@dataclass
class PolicyCache:
    """The lake's policy, re-read at most every ``ttl_s`` seconds (what a serving replica holds):
    a ban takes effect within ``ttl_s`` without a restart. If the lake cannot be read, the last
    policy read stays in force."""
    lake: object
    ttl_s: float = 10.0
    _policy: DecodingPolicy = field(default_factory=DecodingPolicy)
    _read_at: float = float("-inf")

    @property
    def stale(self) -> bool:
        """True when the next :meth:`get` reads the lake (an async caller runs it in a thread)."""
        return time.monotonic() - self._read_at >= self.ttl_s

    def get(self) -> DecodingPolicy:
        if self.stale:
            try:
                self._policy = current(self.lake)
            except Exception:  # noqa: BLE001 - an unreachable lake must not stop answering
                pass
            self._read_at = time.monotonic()
        return self._policy


# -- enforcement ------------------------------------------------------------------------------------

def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: bytes that are printable
    themselves (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves, the others are
    shifted past 255 in order. This is the inverse: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id adds to the decoded text (None for special tokens, which are never
    part of an answer's text)."""
    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or piece is None:
            out.append(None)
        elif all(ch in dec for ch in piece):
            out.append(bytes(dec[ch] for ch in piece))
        else:  # an added token written as plain text
            out.append(piece.encode())
    return out


def variants(phrase: str) -> list[str]:
    """The forms of a phrase that are banned: as written, lower case, capitalised, upper case."""
    return list(dict.fromkeys([phrase, phrase.lower(), phrase[:1].upper() + phrase[1:], phrase.upper()]))


_INDEX_CACHE: dict = {}


class _VocabIndex:
    """One tokenizer's token bytes, and the rules of the phrase forms asked for so far. Scanning
    a 150k-token vocabulary takes a noticeable fraction of a second; serving combines the policy
    with each request's own ``bad_words``, so the scan and each phrase's rule are done once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # held, so the id() key below is never reused
        self.tok_bytes = token_bytes(tokenizer)
        self.by_first: dict[int, list[int]] = {}  # tokens by their first byte: the scans stay small
        for i, b in enumerate(self.tok_bytes):
            if b:
                self.by_first.setdefault(b[0], []).append(i)
        self.rules: dict[tuple, tuple] = {}

    def rule(self, form: str, exceptions: tuple[str, ...]) -> tuple:
        key = (form, exceptions)
        if key not in self.rules:
            import torch

            pb = form.encode()
            before = tuple(e.encode()[:e.encode().find(pb)] for e in exceptions
                           if pb in e.encode() and e.encode().find(pb) > 0)
            whole = [i for i, b in enumerate(self.tok_bytes) if b and pb in b]
            rest = {}
            for k in range(1, len(pb)):
                ids = [i for i in self.by_first.get(pb[k], []) if self.tok_bytes[i].startswith(pb[k:])]
                if ids:
                    rest[k] = torch.tensor(ids, dtype=torch.long)
            if len(self.rules) > 4096:  # request bad_words are bounded, but their variety is not
                self.rules.clear()
            self.rules[key] = (pb, whole, rest, before)
        return self.rules[key]


_VOCAB_CACHE: dict[int, _VocabIndex] = {}


def _vocab_index(tokenizer) -> _VocabIndex:
    if id(tokenizer) not in _VOCAB_CACHE:
        if len(_VOCAB_CACHE) > 4:
            _VOCAB_CACHE.clear()
        _VOCAB_CACHE[id(tokenizer)] = _VocabIndex(tokenizer)
    return _VOCAB_CACHE[id(tokenizer)]


class BannedPhrases:
    """A logits processor (``transformers`` generation) that keeps every phrase of ``banned`` out
    of the decoded answer, whatever tokens would spell it; see the module doc.

    Building one scans the vocabulary; :meth:`for_tokenizer` keeps one per tokenizer and policy,
    and :meth:`at` binds it to a request's (padded) prompt length, after which the answer starts
    in ``input_ids``."""

    def __init__(self, tokenizer, banned, exceptions=DEFAULT_EXCEPTIONS, prompt_len: int = 0):
        self.prompt_len = prompt_len
        self.banned = tuple(banned)
        vocab = _vocab_index(tokenizer)
        self.tok_bytes = vocab.tok_bytes
        # Per banned byte string: the tokens that hold it whole; for each k, the tokens that start
        # with its bytes after the first k; and the exception words' text before it. Each rule is
        # built once per tokenizer (a serving request's own bad_words combine cached rules).
        self.rules = [rule for phrase in self.banned for form in variants(phrase)
                      for rule in [vocab.rule(form, tuple(exceptions))]]

    @classmethod
    def for_tokenizer(cls, tokenizer, banned, exceptions=DEFAULT_EXCEPTIONS) -> "BannedPhrases":
        key = (id(tokenizer), tuple(banned), tuple(exceptions))
        if key not in _INDEX_CACHE:
            if len(_INDEX_CACHE) > 16:  # a few policies and tokenizers at most; drop old ones
                _INDEX_CACHE.clear()
            _INDEX_CACHE[key] = cls(tokenizer, banned, exceptions)
        return _INDEX_CACHE[key]

    def at(self, prompt_len: int) -> "BannedPhrases":
        bound = object.__new__(BannedPhrases)
        bound.__dict__.update(self.__dict__, prompt_len=prompt_len)
        return bound

    def text_bytes(self, ids) -> bytes:
        return b"".join(self.tok_bytes[i] or b"" for i in ids)

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            text = self.text_bytes(input_ids[row, self.prompt_len:].tolist())
            for pb, whole, rest, before in self.rules:
                for k, ids in rest.items():  # the answer ends with the phrase's first k bytes
                    if not text.endswith(pb[:k]):
                        continue
                    if before and text[:len(text) - k].endswith(before):
                        continue  # the phrase would end an exception word (不 + 可能)
                    scores[row, ids] = float("-inf")
                for i in whole:  # the token holds the whole phrase
                    b = self.tok_bytes[i]
                    if not (before and (text + b[:b.find(pb)]).endswith(before)):
                        scores[row, i] = float("-inf")
        return scores


def contains_banned(text: str, banned, exceptions=DEFAULT_EXCEPTIONS) -> list[str]:
    """The banned phrases ``text`` contains outside the exception words (what a test or an audit
    of logged answers checks)."""
    found = []
    for phrase in banned:
        for form in variants(phrase):
            t = text
            for e in exceptions:
                if form in e:
                    t = t.replace(e, " ")
            if form in t:
                found.append(phrase)
                break
    return found
