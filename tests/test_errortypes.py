"""Error types of wrong answers, edit length per category, deleted phrases, hedge rate per arm."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from vloop.curate.errortypes import error_types, hedged_mask, is_hedged, numbers, polarity

DAY = dt.datetime(2026, 11, 3, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("question, answer, correction, expected", [
    ("What colour is this?", "red", "blue", ["wrong colour"]),
    ("这是什么颜色?", "红色", "蓝色", ["wrong colour"]),
    ("What colour is this?", "红色", "red", []),  # the same colour in two languages
    ("How many are there?", "2", "3", ["wrong count"]),
    ("一共有多少个?", "三个", "两个", ["wrong count"]),
    ("What is this?", "shoes", "a bag", ["wrong category"]),
    ("这是什么?", "这是帽子", "这是包", ["wrong category"]),
    ("Can I run in these?", "no", "yes", ["wrong suitability"]),
    ("这双鞋能跑步吗?", "能", "不能", ["wrong suitability"]),
    ("这鞋适合跑步吗?", "不可能", "能", ["wrong suitability"]),  # 不可能 is a firm no, not a hedge
    ("What colour is this?", "shoes", "red", ["off-topic"]),
    ("How many items do you see?", "They are blue", "2", ["off-topic"]),
    ("What is this?", "Sorry, I cannot tell from this photo.", "hat", ["refused"]),
    ("这是什么?", "抱歉,无法判断", "帽子", ["refused"]),
    ("What colour is this?", "Maybe it is red", "red", ["hedging"]),
    ("这是什么颜色?", "可能是红色", "蓝色", ["wrong colour", "hedging"]),
    ("What colour is this?", "This is a lovely red shoe that goes well with many outfits.", "red", ["too long"]),
    ("What colour is this?", "red.", "red", []),  # a small fix is not padding
    ("What colour is this?", "I think it might be red", None, ["hedging"]),  # an edit without text
])
def test_error_types_on_known_cases(question, answer, correction, expected):
    assert error_types(question, answer, correction) == expected


def test_building_blocks():
    assert numbers("三个") == {3} and numbers("two shoes") == {2} and numbers("red") == set()
    assert polarity("不适合") == "no" and polarity("适合") == "yes" and polarity("Not really") == "no"
    assert is_hedged("我觉得是红色") and not is_hedged("不可能") and not is_hedged("Maybelline red")
    mask = hedged_mask(pd.Series(["probably red", "red", None, "大概两个", "不可能"]))
    assert mask.tolist() == [True, False, False, True, False]


def _inter(rows):
    base = {"ts": DAY, "user_key": "u", "session_id": "s", "adapter": None, "latency_ms": 100.0,
            "category": "shoes", "arm": "champion", "confidence": 0.5}
    return pd.DataFrame([{**base, **r} for r in rows])


def _edit(rid, text):
    return {"request_id": rid, "ts": DAY, "type": "edit", "edited_text": text, "dwell_ms": None, "rating": None}


def test_top_error_types_per_day_and_arm():
    from vloop.curate.report import errors_of_the_day, top_error_types

    rows = [{"request_id": f"c{i}", "question": "What colour is this?", "answer": "red", "arm": "champion"}
            for i in range(4)]
    rows += [{"request_id": f"k{i}", "question": "What colour is this?", "answer": "Maybe red", "arm": "canary",
              "adapter": "a@1"} for i in range(3)]
    rows += [{"request_id": "n1", "question": "How many are there?", "answer": "2", "arm": "canary", "adapter": "a@1"}]
    inter = _inter(rows)
    fb = pd.DataFrame([_edit(f"c{i}", "blue") for i in range(4)] + [_edit(f"k{i}", "red") for i in range(3)]
                      + [_edit("n1", "3")])
    # An annotator also judged c0 wrong (counted once, with the annotator's correction) and one
    # answer of another day.
    labels = pd.DataFrame([
        {"request_id": "c0", "question": "What colour is this?", "model_answer": "red", "corrected_answer": "green",
         "verdict": "wrong", "arm": "champion", "adapter": None, "category": "shoes"},
        {"request_id": "old", "question": "What is this?", "model_answer": "shoes", "corrected_answer": "bag",
         "verdict": "wrong", "arm": "champion", "adapter": None, "category": "bags"},
        {"request_id": "ok", "question": "What is this?", "model_answer": "shoes", "corrected_answer": "shoes",
         "verdict": "correct", "arm": "champion", "adapter": None, "category": "shoes"}])
    errors = errors_of_the_day(inter, fb, labels)
    assert len(errors) == 9 and errors["request_id"].is_unique
    assert errors.set_index("request_id").loc["c0", "source"] == "label"
    top = top_error_types(errors)
    overall = top[top["arm"] == "all"]
    assert overall["error_type"].tolist() == ["wrong colour", "hedging", "wrong category", "wrong count"]
    assert overall["errors"].tolist() == [4, 3, 1, 1] and overall["rank"].tolist() == [1, 2, 3, 4]
    assert overall["share"].iloc[0] == pytest.approx(4 / 9)
    canary = top[top["arm"] == "canary"].set_index("error_type")
    assert canary.loc["hedging", "errors"] == 3 and canary.loc["hedging", "share"] == pytest.approx(3 / 4)
    assert "Maybe red → red" in canary.loc["hedging", "example"]
    assert len(top_error_types(errors, k=2).query("arm == 'all'")) == 2  # the top k only


def test_edit_length_rise_is_flagged_against_the_7_day_mean():
    from vloop.curate.report import AnswerQualityConfig, edit_length_by_category, edit_length_trend

    inter = _inter([{"request_id": f"r{i}", "question": "q", "answer": "a", "category": c}
                    for i, c in enumerate(["shoes"] * 6 + ["bags"] * 6)])
    dist = [20] * 6 + [4] * 6
    mined = pd.DataFrame({"request_id": inter["request_id"], "edit_distance": pd.array(dist, dtype="Int64")})
    today = edit_length_by_category(inter, mined).set_index("category")
    assert today.loc["shoes", "edits"] == 6 and today.loc["shoes", "mean_edit_chars"] == 20
    history = pd.DataFrame([{"dt": f"2026-11-0{d}", "category": c, "edits": 10, "mean_edit_chars": 4.0}
                            for d in range(1, 8) for c in ("shoes", "bags")])
    trend = edit_length_trend(today.reset_index(), history).set_index("category")
    assert bool(trend.loc["shoes", "rose"]) and not bool(trend.loc["bags", "rose"])
    assert trend.loc["shoes", "mean_7d"] == pytest.approx(4.0) and trend.loc["shoes", "days_7d"] == 7
    # Too short a baseline, or too few edits today, flags nothing.
    assert not edit_length_trend(today.reset_index(), history[history["dt"] <= "2026-11-02"])["rose"].any()
    assert not edit_length_trend(today.reset_index(), history, AnswerQualityConfig(rise_min_edits=10))["rose"].any()
    assert not edit_length_trend(today.reset_index(), history.iloc[:0])["rose"].any()


def test_phrases_users_delete_are_listed_with_counts_and_examples():
    from vloop.curate.report import deleted_phrases, deleted_runs

    assert deleted_runs("I think it is red", "it is blue") == [["i", "think"]]  # "red" is a content word
    assert deleted_runs("可能是红色", "蓝色") == [["可", "能", "是"]]  # 红 is content
    edits = pd.DataFrame({"answer": ["I think it is red", "I think these are shoes", "可能是红色", "大概是红色",
                                     "可能是两个", "I think so, yes"],
                          "correction": ["red", "shoes", "红色", "红色", "两个", "I think so, yes"]})
    got = deleted_phrases(edits).set_index("phrase")
    assert got.loc["i think", "deleted"] == 2 and got.loc["i think", "kept"] == 1
    assert got.loc["i think", "deletion_rate"] == pytest.approx(2 / 3)
    assert got.loc["可能是", "deleted"] == 2 and "可能是红色 → 红色" in got.loc["可能是", "examples"]
    assert "大概是" not in got.index  # deleted once: under phrase_min_count
    assert got.index[0] in ("i think", "可能是")  # most often deleted first


def test_hedge_rate_and_answer_length_per_arm():
    from vloop.curate.mining import mine
    from vloop.curate.report import traffic_metrics

    inter = _inter([{"request_id": "a", "question": "q", "answer": "maybe red", "arm": "champion"},
                    {"request_id": "b", "question": "q", "answer": "red", "arm": "champion"},
                    {"request_id": "c", "question": "q", "answer": "blue", "arm": "canary", "adapter": "x@1"}])
    fb = pd.DataFrame(columns=["request_id", "ts", "type", "edited_text", "dwell_ms", "rating"])
    m = traffic_metrics(inter, fb, mine(inter, fb)).set_index("arm")
    assert m.loc["champion", "hedge_rate"] == 0.5 and m.loc["canary", "hedge_rate"] == 0
    assert m.loc["champion", "mean_answer_chars"] == 6 and m.loc["canary", "mean_answer_chars"] == 4


def test_report_page_shows_the_quality_tables():
    from vloop.curate.report import answer_quality, render_html

    inter = _inter([{"request_id": "a", "question": "What colour is this?", "answer": "maybe red"}])
    fb = pd.DataFrame([_edit("a", "red")])
    mined = pd.DataFrame({"request_id": ["a"], "edit_distance": pd.array([6], dtype="Int64")})
    q = answer_quality(inter, fb, mined, None, pd.DataFrame())
    assert q["error_types"]["error_type"].tolist() == ["hedging", "hedging"]  # all, and the champion arm
    empty = answer_quality(inter.iloc[:0], fb.iloc[:0], mined.iloc[:0], None, pd.DataFrame())
    for name in q:  # a day without traffic: the same columns, no rows
        assert list(empty[name].columns) == list(q[name].columns) and len(empty[name]) == 0, name
    page = render_html("2026-11-03", pd.DataFrame(), pd.DataFrame(), {}, {"history": "", "calibration": ""}, q)
    assert "Top error types" in page and "Phrases users delete" in page and "hedging" in page
