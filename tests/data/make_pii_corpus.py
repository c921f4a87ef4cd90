"""Writes tests/data/pii_corpus.jsonl: the labelled corpus behind the redaction test.

Chinese and English chat text of the kind an e-commerce assistant sees: PII in the spellings people
really type (full-width digits, +86, spaces and dashes, IDs in groups, extensions) and look-alikes
that must survive (order and parcel numbers, prices, sizes, dates, model numbers). Each line is
``{"text": ..., "pii": [{"kind": ..., "value": ...}]}``; ``value`` is the exact substring of
``text``. Deterministic (fixed seed); re-run after changing a template: ``python
tests/data/make_pii_corpus.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

rng = random.Random(20261129)
FULL = str.maketrans("0123456789Xx-+() ", "０１２３４５６７８９Ｘｘ－＋（）\u3000")


def digits(n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def luhn_complete(prefix: str, length: int) -> str:
    body = prefix + digits(length - len(prefix) - 1)
    for check in "0123456789":
        total = 0
        for i, c in enumerate(reversed(body + check)):
            d = int(c) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        if total % 10 == 0:
            return body + check


def group(s: str, sizes, sep: str) -> str:
    out, i = [], 0
    for n in sizes:
        out.append(s[i:i + n])
        i += n
    if i < len(s):
        out.append(s[i:])
    return sep.join(p for p in out if p)


def mobile() -> str:
    n = "1" + rng.choice("3456789") + digits(9)
    style = rng.randrange(10)
    return [n, group(n, (3, 4, 4), " "), group(n, (3, 4, 4), "-"), "+86 " + n, "+86-" + group(n, (3, 4, 4), "-"),
            "0086 " + n, "(+86)" + n, n.translate(FULL), group(n, (3, 4, 4), " ").translate(FULL),
            "+86 " + group(n, (3, 4, 4), " ")][style]


def landline() -> str:
    area = rng.choice(["010", "020", "021", "0755", "0571", "028", "0512", "023"])
    local = rng.choice("2345678") + digits(7 if len(area) == 3 else rng.choice((6, 7)))
    style = rng.randrange(8)
    return [f"{area}-{local}", f"({area}){local}", f"{area} {group(local, (4,), ' ')}", f"{area}-{local}转{rng.randint(100, 999)}",
            f"+86 {area[1:]} {local}", f"+86-{area[1:]}-{local}", f"{area}-{local}".translate(FULL), f"{area}{local}"][style]


def hotline() -> str:
    n = rng.choice(["400", "800"]) + digits(7)
    return [group(n, (3, 3, 4), "-"), group(n, (3, 3, 4), " "), n, group(n, (3, 3, 4), "-").translate(FULL)][rng.randrange(4)]


ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id() -> str:
    region = rng.choice(["110105", "310104", "440305", "330106", "510107", "320102", "420111"])
    birth = f"{rng.randint(1950, 2006)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    body = region + birth + digits(3)
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, ID_WEIGHTS)) % 11]
    if rng.random() < 0.25:  # a mistyped checksum is still someone's ID
        check = rng.choice("0123456789X".replace(check, ""))
    n = body + check
    if rng.random() < 0.12:  # the old 15-digit IDs
        n = region + birth[2:] + digits(3)
        return [n, group(n, (6, 6), " ")][rng.randrange(2)]
    style = rng.randrange(7)
    return [n, group(n, (6, 8), " "), group(n, (6, 8), "-"), group(n, (4, 4, 4, 4), " "), n.lower(),
            n.translate(FULL), group(n, (6, 8), " ").translate(FULL)][style]


def bank_card() -> str:
    n = rng.choice([luhn_complete("62" + digits(4), 19), luhn_complete("62" + digits(4), 16),
                    luhn_complete("4" + digits(5), 16), luhn_complete("5" + rng.choice("12345") + digits(4), 16)])
    style = rng.randrange(5)
    return [n, group(n, (4, 4, 4, 4), " "), group(n, (4, 4, 4, 4), "-"), n.translate(FULL),
            group(n, (4, 4, 4, 4), " ").translate(FULL)][style]


def email() -> str:
    user = rng.choice(["zhang.wei", "li_na88", "wang.fang+shop", "chen123", "jane.doe", "mike.w", "xiaoming2008", "a.b.c"])
    dom = rng.choice(["qq.com", "163.com", "126.com", "gmail.com", "outlook.com", "example.co.uk", "sina.com.cn", "foxmail.com"])
    return rng.choice([f"{user}@{dom}", f"{user}@{dom}".upper() if rng.random() < 0.2 else f"{user}@{dom}",
                       f"{user} @ {dom}" if rng.random() < 0.2 else f"{user}@{dom}"])


def intl_phone() -> str:
    return rng.choice([f"+1 {digits(3)} 555 {digits(4)}", f"({rng.randint(201, 989)}) 555-{digits(4)}",
                       f"{rng.randint(201, 989)}-555-{digits(4)}", f"+44 20 7946 {digits(4)}",
                       f"+1-{rng.randint(201, 989)}-555-{digits(4)}"])


PII_TEMPLATES = {
    "phone_mobile": (mobile, ["我的手机号是{}，发货前麻烦联系", "收货电话：{}", "有问题打{}找我", "联系人 王先生 {}",
                              "my number is {}", "call me at {} after 6pm", "text {} when it ships", "电话{}，谢谢",
                              "这双鞋能跑步吗？我电话 {}", "手机：{} 微信同号"]),
    "phone_landline": (landline, ["座机{}，白天有人", "公司电话 {}", "office phone {}", "收件人座机：{}",
                                  "打这个 {} 找前台"]),
    "phone_hotline": (hotline, ["你们客服热线是不是{}？", "I called {} but nobody answered", "售后电话{}打不通"]),
    "cn_id": (lambda: cn_id(), ["身份证号{}，实名认证用", "报关需要身份证 {}", "my ID number is {} for customs",
                                "实名：张伟 {}", "身份证{}已经提交了"]),
    "bank_card": (bank_card, ["退款请打到卡号{}", "银行卡 {} 可以退吗", "refund to my card {} please",
                              "我用的信用卡是{}", "card number {}"]),
    "email": (email, ["邮箱{}，发票寄这里", "email me at {}", "发到 {} 就行", "my address is {} thanks"]),
    "phone_intl": (intl_phone, ["call me on {}", "reach me at {} any time", "US number: {}"]),
}
PER_KIND = {"phone_mobile": 60, "phone_landline": 30, "phone_hotline": 14, "cn_id": 40, "bank_card": 32,
            "email": 24, "phone_intl": 14}

LOOKALIKES = [
    lambda: f"订单号 {digits(19)} 什么时候发货？", lambda: f"order #{digits(rng.randint(10, 19))} hasn't arrived",
    lambda: f"运单号 SF{digits(12)}", lambda: f"快递单号 YT{digits(13)} 查不到", lambda: f"物流单号{digits(15)}",
    lambda: f"订单 {digits(18)} 申请退货", lambda: f"tracking number 1Z{digits(16)}",
    lambda: f"这双鞋多少钱？¥{rng.randint(99, 2999)}.00", lambda: f"price ${rng.randint(20, 300)}.{digits(2)}",
    lambda: f"价格 {rng.randint(199, 4999)} 元，能便宜点吗", lambda: f"满{rng.choice([199, 299, 399])}减{rng.choice([20, 50, 100])}",
    lambda: f"我穿{rng.randint(35, 46)}码，这双偏大吗", lambda: f"size EU {rng.randint(36, 47)}, US {rng.randint(5, 13)}.5",
    lambda: f"身高{rng.randint(150, 195)} 体重{rng.randint(45, 100)}kg 穿什么尺码", lambda: f"{rng.randint(2024, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} 下的单",
    lambda: f"{rng.randint(2024, 2026)}/{rng.randint(1, 12)}/{rng.randint(1, 28)} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} 到货",
    lambda: f"{rng.randint(1, 12)}月{rng.randint(1, 28)}日能送到吗", lambda: f"买了{rng.randint(2, 5)}双，第二双半价吗",
    lambda: f"SKU-{digits(5)}-XL 还有货吗", lambda: f"货号 DV{digits(4)}-{digits(3)}", lambda: f"Air Max {rng.choice([90, 97, 270, 720])} 适合跑步吗",
    lambda: f"iPhone {rng.randint(12, 16)} Pro {rng.choice([128, 256, 512])}GB", lambda: "执行标准 GB/T 18883-2002",
    lambda: f"ISBN 978-7-{digits(3)}-{digits(5)}-{digits(1)}", lambda: f"重量 {rng.randint(1, 9)}.{rng.randint(0, 9)}kg",
    lambda: f"商品编号 {digits(12)}", lambda: f"时间戳 {digits(10)}", lambda: f"第{rng.randint(2, 9)}件{rng.randint(5, 9)}折",
    lambda: f"version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}", lambda: f"鞋码 36-37-38 都有吗",
    lambda: f"can I run {rng.randint(5, 42)} km in these shoes?", lambda: f"it's {rng.randint(20, 300)} grams lighter than v{rng.randint(2, 9)}",
    lambda: f"会员卡积分 {rng.randint(100, 99999)} 能抵扣吗", lambda: f"充电宝 {rng.choice([10000, 20000])}mAh 能带上飞机吗",
    lambda: f"invoice INV-{rng.randint(2024, 2026)}-{digits(6)}", lambda: f"订单编号：{digits(16)}，申请售后",
    lambda: f"房间 {rng.randint(101, 2999)} 室收货", lambda: f"邮编 {rng.choice(['100101', '518000', '200120', '310012'])}",
    lambda: f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} pm delivery ok?", lambda: f"{rng.randint(2, 40)}% off today?",
]


# Written by hand after a review tried to break the redaction: spellings the generators above do
# not produce (numbers after letters or other numbers, unusual separators, trunk prefixes, ID and
# card words next to order words) and look-alikes that must survive.
HANDWRITTEN = [
    ("13800138000 13900139000", ["13800138000", "13900139000"]),
    ("房间1203 13800138000", ["13800138000"]), ("地址 幸福路 88 13800138000", ["13800138000"]),
    ("快递实名身份证号110105194912310021", ["110105194912310021"]),
    ("订单收件人身份证110105194912310021", ["110105194912310021"]),
    ("发票抬头写我身份证号码11010519491231002X", ["11010519491231002X"]),
    ("订单付款用的信用卡4111111111111111", ["4111111111111111"]),
    ("tel13800138000", ["13800138000"]), ("VX13800138000 加我", ["13800138000"]), ("wx: 13912345678", ["13912345678"]),
    ("Tel010-12345678", ["010-12345678"]), ("ID11010519491231002X号", ["11010519491231002X"]),
    ("电话13800138000abc", ["13800138000"]), ("电话+86 (0)10 12345678", ["+86 (0)10 12345678"]),
    ("+86(0)10-12345678 office", ["+86(0)10-12345678"]), ("86-10-88889999", ["86-10-88889999"]),
    ("电话:8613800138000", ["8613800138000"]), ("138 - 0013 - 8000", ["138 - 0013 - 8000"]),
    ("138 – 0013 – 8000", ["138 – 0013 – 8000"]), ("138～0013～8000", ["138～0013～8000"]),
    ("138−0013−8000", ["138−0013−8000"]), ("138·0013·8000", ["138·0013·8000"]), ("138・1234・5678", ["138・1234・5678"]),
    ("138  1234  5678", ["138  1234  5678"]), ("身份证110105  19491231  002x", ["110105  19491231  002x"]),
    ("abc@qq。com", ["abc@qq。com"]), ("邮箱 zhang@qq .com", ["zhang@qq .com"]), ("热线4008-123-456", ["4008-123-456"]),
    ("客服 400 6666 888", ["400 6666 888"]), ("卡号 6222 0212 3456 7890 128", ["6222 0212 3456 7890 128"]),
    ("我的手机是一三八... 算了，13800138000", ["13800138000"]), ("call +86 138-1234-5678", ["+86 138-1234-5678"]),
    ("１３８．００１３．８０００", ["１３８．００１３．８０００"]), ("mail:ｚｈａｎｇ＠ｑｑ．ｃｏｍ", ["ｚｈａｎｇ＠ｑｑ．ｃｏｍ"]),
    ("1080 1920 2560 1440 分辨率", []), ("数量 1000 2000 3000 4000", []), ("条码 6901234567892", []),
    ("商品编号 110105850101123", []), ("交易号 202611850101123", []), ("price ¥1299.00 on 2026-11-29 at 14:30", []),
    ("20261129 下单", []), ("型号 GT-2000 12345", []), ("尺寸 120x60x75cm", []), ("2026年11月29日 14:30:15", []),
]


def main() -> None:
    rows = []
    for kind, n in PER_KIND.items():
        make, templates = PII_TEMPLATES[kind]
        for i in range(n):
            value = make()
            rows.append({"text": templates[i % len(templates)].format(value),
                         "pii": [{"kind": kind, "value": value}]})
    for _ in range(12):  # two at once
        a, b = mobile(), email()
        rows.append({"text": f"手机{a}，邮箱{b}", "pii": [{"kind": "phone_mobile", "value": a}, {"kind": "email", "value": b}]})
    for i in range(160):
        rows.append({"text": LOOKALIKES[i % len(LOOKALIKES)](), "pii": []})
    for text, values in HANDWRITTEN:
        rows.append({"text": text, "pii": [{"kind": "handwritten", "value": v} for v in values]})
    rng.shuffle(rows)
    out = Path(__file__).with_name("pii_corpus.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} strings, {sum(len(r['pii']) for r in rows)} PII spans -> {out}")


if __name__ == "__main__":
    main()
