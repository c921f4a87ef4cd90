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


def corpus_scores(name: str = "pii_corpus.jsonl", batch: int | None = None):
    """Recall on the PII spans of tests/data/<name> (of one batch of it) and precision of the
    replacements."""
    import json
    import re
    import unicodedata
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(__file__).parent / "data" / name).read_text("utf-8").splitlines()]
    rows = [r for r in rows if batch is None or r.get("batch") == batch]
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


def test_redaction_on_the_handwritten_heldout_corpus():
    """tests/data/pii_heldout.jsonl is written by hand, not by make_pii_corpus.py (whose templates
    are the patterns' own, so its recall of 1.000 says little): invoice, parcel and order numbers in
    the formats shops and carriers really use (Taobao, JD, Amazon, SF, UPS, USPS, 发票代码/号码,
    数电票), IDs and cards pasted next to order words, context words after the number, digits typed
    one by one, phones in running text; Chinese and English. Batch 1 was written first and the
    rules were refined after seeing its misses (so it flatters them); batch 2 was written after the
    rules were final and scored once, unchanged since: its figures are the honest held-out ones.
    Recall and precision are reported apart from the generated corpus'. On the previous main this
    corpus scored recall 0.722 and precision 0.891."""
    rows, recall, precision, misses, false_hits = corpus_scores("pii_heldout.jsonl")
    clean = [r for r in rows if not r["pii"]]
    kept = sum(redact(r["text"]) == (r["text"], 0) for r in clean) / len(clean)
    gen = corpus_scores()
    n_pii = sum(len(r["pii"]) for r in rows)
    print(f"\nheld-out corpus (by hand): {len(rows)} strings, {n_pii} PII spans; recall {recall:.3f}, precision "
          f"{precision:.3f}, order/invoice/parcel look-alikes left intact {kept:.3f}; false positives: {false_hits}")
    for b in (1, 2):
        rb = corpus_scores("pii_heldout.jsonl", batch=b)
        print(f"  batch {b}: {len(rb[0])} strings, {sum(len(r['pii']) for r in rb[0])} PII spans; "
              f"recall {rb[1]:.3f}, precision {rb[2]:.3f}")
    print(f"generated corpus: recall {gen[1]:.3f}, precision {gen[2]:.3f}")
    assert len(rows) >= 150 and n_pii >= 70 and len(clean) >= 80
    assert recall >= 0.97, misses
    assert precision >= 0.93, false_hits
    assert kept >= 0.93, false_hits  # the model must still see "order 123456"


@pytest.mark.parametrize("text, expected", [
    # A checksum-valid ID or a Luhn-valid card is redacted whatever word stands before it.
    ("订单 11010519491231002X", "订单 [CN_ID]"),
    ("invoice 11010519491231002X attached", "invoice [CN_ID] attached"),
    ("order 4111111111111111", "order [BANK_CARD]"),
    ("运单号 6222021234567890128", "运单号 [BANK_CARD]"),
    ("交易号 6225880123456783 是我信用卡吗", "交易号 [BANK_CARD] 是我信用卡吗"),
    # Words after the number count.
    ("4111 1111 1111 1112 is my card number", "[BANK_CARD] is my card number"),  # no Luhn: the word says it
    ("订单 110105194912310021 是我身份证号", "订单 [CN_ID] 是我身份证号"),  # checksum wrong: the word says it
    # Digits typed one by one.
    ("电话 1 3 8 0 0 1 3 8 0 0 0", "电话 [PHONE]"),
    ("1-3-8-0-0-1-3-8-0-0-0", "[PHONE]"),
    ("call 1.3.9.0.0.1.3.9.0.0.0 please", "call [PHONE] please"),
    ("座机 0 1 0 - 1 2 3 4 5 6 7 8", "座机 [PHONE]"),
    ("my visa 4 5 3 2 - 0 1 5 1 - 1 2 8 3 - 0 3 6 6", "my visa [BANK_CARD]"),
])
def test_order_word_hole_closed(text, expected):
    assert redact(text)[0] == expected


@pytest.mark.parametrize("text", [
    "order 123456 ships tomorrow",
    "订单号 2748163950271638491 什么时候发货",  # 19 digits, no card prefix
    "order 5521 0873 4410 2297",  # fails Luhn; its tail is no landline
    "发票代码 044001900111 发票号码 08123456",
    "tracking 1Z12345E0205271688 says delivered",
    "did order 110105194912310021 arrive? the video says so",  # "id" in "did"/"video" is no ID word
    "步骤 1 2 3 4 5 6 7 8 9 都做了",  # counting, not a number
    "取件码 6-2-8-1-4-5",
])
def test_order_numbers_that_prove_nothing_stay(text):
    assert redact(text) == (text, 0)


def test_an_order_word_after_a_phone_does_not_hide_it():
    assert redact("call +1 415 555 0132 re order 5531")[0] == "call [PHONE] re order 5531"
