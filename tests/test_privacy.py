from __future__ import annotations

import pytest

from vloop.privacy import redact, user_key


def test_user_key_is_keyed_and_stable():
    a = user_key("alice@example.com", "s1")
    assert a == user_key("alice@example.com", "s1") and len(a) == 64
    assert a != user_key("alice@example.com", "s2") and a != user_key("bob", "s1")
    assert "alice" not in a
    with pytest.raises(ValueError, match="VLOOP_USER_KEY_SECRET"):
        user_key("alice", "")


@pytest.mark.parametrize("text, expected, n", [
    ("mail me at jane.doe+shop@example.co.uk please", "mail me at [EMAIL] please", 1),
    ("我的手机是13812345678，谢谢", "我的手机是[PHONE]，谢谢", 1),
    ("call +86 138-1234-5678", "call [PHONE]", 1),
    ("US office (415) 555-0132", "US office [PHONE]", 1),
    ("身份证 11010519491231002X 已提交", "身份证 [CN_ID] 已提交", 1),
    ("card 4111 1111 1111 1111 expires", "card [BANK_CARD] expires", 1),
    ("卡号6222021234567890128", "卡号[BANK_CARD]", 1),
    ("email a@b.cn and phone 13900001111", "email [EMAIL] and phone [PHONE]", 2),
])
def test_pii_becomes_typed_placeholders(text, expected, n):
    assert redact(text) == (expected, n)


@pytest.mark.parametrize("text", [
    "Can I run in these shoes?",
    "这双鞋多少钱? 299元",
    "order 20261129 ships in 3 days",
    "size 42, 2 pairs",
    "4111 1111 1111 1112",  # fails Luhn: not a card
    "order 110105194912310021 shipped",  # an order number, however ID-like
])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == (text, 0)


def test_none_and_empty():
    assert redact(None) == (None, 0) and redact("") == ("", 0)


def corpus_scores():
    """Recall on the PII spans of tests/data/pii_corpus.jsonl and precision of the replacements."""
    import json
    import re
    import unicodedata
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(__file__).parent / "data" / "pii_corpus.jsonl").read_text("utf-8").splitlines()]
    caught = missed = false_pos = 0
    misses, false_hits = [], []
    for r in rows:
        out, n = redact(r["text"])
        digits_left = re.sub(r"[^0-9a-z@]", "", unicodedata.normalize("NFKC", out).lower())
        found = 0
        for p in r["pii"]:
            core = re.sub(r"[^0-9a-z@]", "", unicodedata.normalize("NFKC", p["value"]).lower())
            if p["value"] in out or core in digits_left:  # any spelling of it left in the text
                missed += 1
                misses.append((p["kind"], r["text"], out))
            else:
                found += 1
        caught += found
        if n > found:
            false_pos += n - found
            false_hits.append((r["text"], out))
    return rows, caught / (caught + missed), caught / max(1, caught + false_pos), misses, false_hits


def test_redaction_recall_on_the_labelled_corpus():
    """At least 300 strings (Chinese and English, PII and look-alikes): recall on PII ≥ 0.99, and
    the precision is printed (look-alikes such as order numbers turned into placeholders)."""
    rows, recall, precision, misses, false_hits = corpus_scores()
    n_pii = sum(len(r["pii"]) for r in rows)
    print(f"\nredaction corpus: {len(rows)} strings, {n_pii} PII spans; recall {recall:.3f}, "
          f"precision {precision:.3f}; false positives: {false_hits[:5]}")
    assert len(rows) >= 300 and n_pii >= 150 and len(rows) - sum(bool(r["pii"]) for r in rows) >= 100
    assert recall >= 0.99, misses[:10]
    assert precision >= 0.95, false_hits[:10]  # looser: a redacted order number costs little


@pytest.mark.parametrize("text, expected", [
    ("座机010-12345678", "座机[PHONE]"),
    ("深圳 0755-88889999 转 123", "深圳 [PHONE]"),
    ("手机１３８００１３８０００，谢谢", "手机[PHONE]，谢谢"),  # full-width digits; the full-width comma stays
    ("身份证 110105 19491231 002X", "身份证 [CN_ID]"),  # separators, checksum not required
    ("客服 400-820-8820", "客服 [PHONE]"),
    ("卡号 6222 0212 3456 7890 128", "卡号 [BANK_CARD]"),
])
def test_spellings_from_the_field(text, expected):
    assert redact(text)[0] == expected
