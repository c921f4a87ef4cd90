"""What kind of mistake an answer made, from the question, the answer and the correction.

The daily report used to rank product *categories* by negative feedback; this module names the
*type* of each error, for every answer a user edited or an annotator judged wrong:

| type | rule (first the question's intent, :func:`vloop.learn.evaluation.intent_of`) |
|---|---|
| ``refused`` | the answer declines to answer ("sorry, I can't tell", "无法判断") |
| ``off-topic`` | the answer says nothing of the kind the question asks for (a colour question answered without a colour, a count question without a number, ...) |
| ``wrong colour`` | the colours named in the correction differ from those in the answer |
| ``wrong count`` | the numbers differ |
| ``wrong category`` | the product nouns differ |
| ``wrong suitability`` | a yes/no suitability answer with the opposite polarity to the correction |
| ``hedging`` | the answer hedges ("maybe", "可能", "我觉得") and the correction does not |
| ``too long`` | the correction keeps the answer's gist in far fewer characters (the user trimmed padding) |

An answer can have several types (a hedged wrong colour is both ``hedging`` and ``wrong colour``);
:func:`error_types` lists all that apply, most specific first. Content checks compare what the
answer and the correction *say* (colours, numbers, nouns, yes/no), in English and Chinese, so
"红色" and "red" are the same colour. Without a correction (an edit event without text), only the
types that need none are found: refused, off-topic, hedging, too long.

The vocabularies here are a shopping assistant's; they are data in :class:`ErrorTypeRules` so a
deployment for other products extends them without touching the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ERROR_TYPES = ("refused", "off-topic", "wrong colour", "wrong count", "wrong category", "wrong suitability",
               "hedging", "too long")

# Canonical colour -> the words that name it (English words, Chinese characters/words).
COLOUR_WORDS = {
    "red": ("red", "红"), "blue": ("blue", "navy", "蓝"), "green": ("green", "绿"), "black": ("black", "黑"),
    "white": ("white", "白"), "yellow": ("yellow", "黄"), "pink": ("pink", "粉"), "purple": ("purple", "violet", "紫"),
    "orange": ("orange", "橙", "橘"), "brown": ("brown", "棕", "咖啡色", "褐"), "grey": ("grey", "gray", "灰"),
    "beige": ("beige", "米色", "米白"), "gold": ("gold", "golden", "金色"), "silver": ("silver", "银"),
}
# Canonical product category -> the nouns that name it.
CATEGORY_WORDS = {
    "shoes": ("shoe", "shoes", "sneaker", "sneakers", "boot", "boots", "heels", "sandals", "trainers", "鞋", "靴"),
    "bags": ("bag", "bags", "backpack", "handbag", "purse", "tote", "包"),
    "dresses": ("dress", "dresses", "skirt", "gown", "裙"),
    "shirts": ("shirt", "shirts", "t-shirt", "blouse", "top", "衬衫", "衣", "上衣"),
    "hats": ("hat", "hats", "cap", "caps", "beanie", "帽"),
    "trousers": ("trousers", "pants", "jeans", "shorts", "裤"),
    "watches": ("watch", "watches", "表"),
}
NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "a pair": 2, "pair": 2, "single": 1, "both": 2,
                "一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10,
                "一双": 2, "一对": 2}
# Hedges users delete. "不可能" ("impossible") contains "可能" ("maybe") but is a firm answer:
# HEDGE_EXCEPTIONS are removed from the text before the hedges are looked for.
HEDGES = ("maybe", "probably", "perhaps", "possibly", "might be", "may be", "i think", "i believe", "i guess",
          "it seems", "seems to be", "looks like", "likely", "not sure", "hard to say",
          "可能", "大概", "也许", "或许", "我觉得", "我认为", "应该是", "好像", "似乎", "不确定", "估计")
HEDGE_EXCEPTIONS = ("不可能", "impossible")
REFUSALS = (r"\bsorry\b", r"\bi (can ?not|can't|cannot|am unable to|'m unable to|don't know)\b", r"\bunable to\b",
            r"\bas an ai\b", r"\bno idea\b", r"抱歉", r"对不起", r"无法(判断|回答|识别|确定|看清|提供)", r"不知道",
            r"我不能回答", r"看不清")
YES = (r"\byes\b", r"\bsure\b", r"\bdefinitely\b", r"\bof course\b", r"\bgood for\b", r"\bsuitable\b",
       r"\byou can\b", r"(?<!不)能", r"(?<!不)可以", r"(?<!不)适合", r"^是的?")
NO = (r"\bno\b", r"\bnot\b", r"\bcan't\b", r"\bcannot\b", r"\bisn't\b", r"\baren't\b", r"\bwouldn't\b",
      r"\bunsuitable\b", r"不能", r"不可以", r"不适合", r"不行", r"^不")


@dataclass
class ErrorTypeRules:
    """The vocabularies and thresholds the rules use (defaults: a shopping assistant, en + zh)."""
    colours: dict = field(default_factory=lambda: dict(COLOUR_WORDS))
    categories: dict = field(default_factory=lambda: dict(CATEGORY_WORDS))
    numbers: dict = field(default_factory=lambda: dict(NUMBER_WORDS))
    hedges: tuple = HEDGES
    hedge_exceptions: tuple = HEDGE_EXCEPTIONS
    refusals: tuple = REFUSALS
    # "too long": the correction is at most this share of the answer's characters ...
    too_long_ratio: float = 0.6
    # ... and the answer is at least this long (trimming "red." to "red" is not padding) ...
    too_long_min_chars: int = 12
    # ... and this share of the correction's tokens was already in the answer (same gist, trimmed).
    too_long_kept_share: float = 0.7

    def __post_init__(self):
        # One compiled pattern per vocabulary (a day has thousands of corrections to classify).
        self._patterns = {name: _vocab_pattern(vocab) for name, vocab in
                          (("colours", self.colours), ("categories", self.categories), ("numbers", self.numbers))}
        self._refusal = re.compile("|".join(f"(?:{p})" for p in self.refusals))
        # Hedges: English ones as whole words, Chinese as substrings; each alone (which ones a text
        # has) and all in one pattern (whether it has any, and cutting them out).
        self._hedge_each = [(h, None if _CJK.search(h) else re.compile(rf"\b{re.escape(h)}\b")) for h in self.hedges]
        self._hedge_any = "|".join(re.escape(h) if _CJK.search(h) else rf"\b{re.escape(h)}\b" for h in self.hedges)


def _vocab_pattern(vocab: dict) -> tuple[re.Pattern, dict]:
    """A pattern matching any word of ``vocab`` (English ones as whole words, Chinese anywhere:
    Chinese has no spaces), longest first, and the map from a matched word to its key."""
    # key -> its words (colours, categories), or word -> its value (numbers)
    words = {w.lower(): canon for canon, ws in vocab.items() for w in ws} \
        if all(isinstance(ws, (tuple, list)) for ws in vocab.values()) else {w.lower(): v for w, v in vocab.items()}
    ordered = sorted(words, key=len, reverse=True)
    en = [re.escape(w) for w in ordered if not _CJK.search(w)]
    zh = [re.escape(w) for w in ordered if _CJK.search(w)]
    parts = ([rf"(?<![\w-])(?:{'|'.join(en)})(?![\w-])"] if en else []) + ([f"(?:{'|'.join(zh)})"] if zh else [])
    return re.compile("|".join(parts)), words


_CJK = re.compile(r"[\u3400-\u9fff]")
_YES = re.compile("|".join(f"(?:{p})" for p in YES))
_NO = re.compile("|".join(f"(?:{p})" for p in NO))


def _lower(text) -> str:
    return (text or "").lower() if isinstance(text, str) else ""


def _find(text: str, rules: "ErrorTypeRules", name: str) -> set:
    """The keys of the ``name`` vocabulary named in ``text``."""
    pattern, words = rules._patterns[name]
    return {words[m] for m in pattern.findall(text)}


def colours(text, rules: ErrorTypeRules | None = None) -> set[str]:
    return _find(_lower(text), rules or _DEFAULT, "colours")


def categories(text, rules: ErrorTypeRules | None = None) -> set[str]:
    return _find(_lower(text), rules or _DEFAULT, "categories")


_MEASURE = re.compile(r"^(个|件|双|只|顶|条|款|对|位)")


def numbers(text, rules: ErrorTypeRules | None = None) -> set[int]:
    """Numbers in ``text``: digits, number words, Chinese numerals (一 in 一个 counts as one)."""
    rules = rules or _DEFAULT
    t = _lower(text)
    found = {int(d) for d in re.findall(r"\d+", t)}
    pattern, words = rules._patterns["numbers"]
    for m in pattern.finditer(t):
        w = m.group(0)
        # A Chinese numeral counts before a measure word (三个, 两双) or alone as the whole answer.
        if not _CJK.search(w) or _MEASURE.match(t[m.end():]) or t.strip(" 。.!！") == w:
            found.add(words[w])
    return found


def _without_hedges(text: str, rules: ErrorTypeRules) -> str:
    """``text`` with its hedges cut out (firm words that contain one, like 不可能, kept whole)."""
    t = _lower(text)
    for i, firm in enumerate(rules.hedge_exceptions):  # set aside behind a placeholder ...
        t = t.replace(firm, f"\x00{i}\x01")
    t = re.sub(rules._hedge_any, "", t)
    for i, firm in enumerate(rules.hedge_exceptions):  # ... and put back
        t = t.replace(f"\x00{i}\x01", firm)
    return re.sub(r"\s+", " ", t).strip(" ,，")


def hedged_mask(texts: pd.Series, rules: ErrorTypeRules | None = None) -> pd.Series:
    """:func:`is_hedged` of every text, vectorised (a day's million answers in about a second)."""
    rules = rules or _DEFAULT
    # Each distinct text checked once (a day's answers repeat a lot), then spread back to the rows.
    codes, distinct = pd.factorize(texts.fillna("").astype("str"))
    t = pd.Series(distinct, dtype="str").str.lower()
    for firm in rules.hedge_exceptions:
        t = t.str.replace(firm, " ", regex=False)
    found = t.str.contains(rules._hedge_any, regex=True).to_numpy(dtype=bool)
    return pd.Series(found[codes] if len(found) else np.zeros(len(texts), dtype=bool), index=texts.index)


def hedges(text, rules: ErrorTypeRules | None = None) -> list[str]:
    """The hedge phrases in ``text`` (after removing firm words that contain one, like 不可能)."""
    rules = rules or _DEFAULT
    t = _lower(text)
    for firm in rules.hedge_exceptions:
        t = t.replace(firm, " ")
    return [h for h, word in rules._hedge_each if (h in t if word is None else word.search(t))]


def is_hedged(text, rules: ErrorTypeRules | None = None) -> bool:
    return bool(hedges(text, rules))


def is_refusal(text, rules: ErrorTypeRules | None = None) -> bool:
    return bool((rules or _DEFAULT)._refusal.search(_lower(text)))


def polarity(text) -> str | None:
    """"yes", "no" or None for an answer to a yes/no question; a negation wins over a yes word
    ("not suitable" is no, 不能 is no although it contains 能)."""
    t = _lower(text).strip()
    if _NO.search(t):
        return "no"
    if _YES.search(t):
        return "yes"
    return None


_DEFAULT = ErrorTypeRules()


def _tokens(text: str) -> list[str]:
    from vloop.learn.evaluation import tokens

    return tokens(text)


def error_types(question, answer, correction=None, rules: ErrorTypeRules | None = None) -> list[str]:
    """The error types of ``answer`` to ``question`` given the user's or annotator's
    ``correction`` (None or "" when there is none), most specific first; [] when no rule applies
    (e.g. a rephrasing the rules cannot tell apart)."""
    from vloop.learn.evaluation import intent_of

    rules = rules or _DEFAULT
    intent = intent_of(question if isinstance(question, str) else "")
    a = answer if isinstance(answer, str) else ""
    c = correction if isinstance(correction, str) and correction.strip() else None
    out: list[str] = []
    if is_refusal(a, rules) and not (c is not None and is_refusal(c, rules)):
        out.append("refused")
    else:
        said = {"colour": colours(a, rules), "count": numbers(a, rules), "category": categories(a, rules),
                "suitable": polarity(a)}
        if intent in said and not said[intent]:
            out.append("off-topic")
        if c is not None:
            for name, extract in (("wrong colour", colours), ("wrong count", numbers),
                                  ("wrong category", categories)):
                # The answer named something of this kind and the correction names something else.
                # (An answer that named nothing of the kind the question asks is off-topic, above;
                # a correction that adds a detail the question did not ask for is no error.)
                said_here, fixed = extract(a, rules), extract(c, rules)
                if said_here and fixed and said_here != fixed:
                    out.append(name)
            if intent == "suitable" and polarity(c) and polarity(a) and polarity(c) != polarity(a):
                out.append("wrong suitability")
    if is_hedged(a, rules) and not (c is not None and is_hedged(c, rules)):
        out.append("hedging")
    # Padding is what is left to trim once the hedges are gone (a deleted "maybe" is hedging).
    plain = _without_hedges(a, rules)
    if c is not None and len(plain) >= rules.too_long_min_chars and len(c) <= rules.too_long_ratio * len(plain):
        kept = _tokens(c)
        in_answer = set(_tokens(plain))
        if kept and sum(t in in_answer for t in kept) / len(kept) >= rules.too_long_kept_share:
            out.append("too long")
    return out


def classify_frame(df: pd.DataFrame, rules: ErrorTypeRules | None = None) -> pd.Series:
    """:func:`error_types` of each row of ``df`` (``question``, ``answer``, ``correction``), as
    lists."""
    if not len(df):
        return pd.Series([], dtype=object, index=df.index)
    corr = df["correction"] if "correction" in df.columns else pd.Series(None, index=df.index)
    # Answers repeat a lot (the same wrong colour, the same hedge): classify each distinct triple once.
    memo: dict = {}
    out = []
    for q, a, c in zip(df["question"], df["answer"], corr):
        k = (q, a, c if isinstance(c, str) else None)
        if k not in memo:
            memo[k] = error_types(q, a, c, rules)
        out.append(memo[k])
    return pd.Series(out, index=df.index, dtype=object)
