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
    "110105194912310021",  # wrong ID checksum
])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == (text, 0)


def test_none_and_empty():
    assert redact(None) == (None, 0) and redact("") == ("", 0)
