"""Daily-pipeline building blocks without Airflow: validation with quarantine, implicit feedback."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from vloop.curate.mining import MiningRules, edit_distance, mine
from vloop.curate.quality import QualityConfig, QualityGateError, check_gate, validate_interactions
from vloop.store.schema import INTERACTION

DAY0 = dt.datetime(2026, 11, 3, tzinfo=dt.timezone.utc)
DAY1 = DAY0 + dt.timedelta(days=1)


def row(i, **over):
    r = {"request_id": f"r{i}", "ts": DAY0 + dt.timedelta(minutes=i), "user_key": "k", "session_id": "s",
         "question": f"q{i}", "answer": "red", "token_logprobs": [-0.1, -0.3], "confidence": 0.8,
         "latency_ms": 120.0, "base_model": "m", "arm": "champion", "status": "ok", "redactions": 0}
    r.update(over)
    return r


def frame(rows):
    return INTERACTION.to_table([{k: v for k, v in r.items()} for r in rows]).to_pandas()


def test_bad_rows_are_quarantined_with_reasons():
    rows = [row(i) for i in range(20)]
    df = frame(rows)
    # Break rows in ways the record schema lets through but the suite must not.
    df.loc[3, "latency_ms"] = 1e9
    df.loc[5, "ts"] = DAY1 + dt.timedelta(hours=2)
    df.loc[7, "request_id"] = "r8"  # duplicate id: both copies are suspect
    df.at[9, "token_logprobs"] = [0.5]
    df.loc[11, "confidence"] = 1.5
    out = validate_interactions(df, DAY0, DAY1)
    reasons = dict(zip(out.quarantined["request_id"], out.quarantined["quarantine_reason"]))
    assert "latency out of range" in reasons["r3"]
    assert "timestamp outside the interval" in reasons["r5"]
    assert reasons["r8"] == "request_id not unique"
    assert "a token logprob above 0" in reasons["r9"]
    assert "confidence out of [0, 1]" in reasons["r11"]
    assert len(out.good) + len(out.quarantined) == 20  # nothing dropped silently
    assert set(out.good["request_id"]).isdisjoint(out.quarantined["request_id"])
    assert out.bad_fraction == pytest.approx(len(out.quarantined) / 20)
    assert out.result["success"] is False and out.result["results"]
    with pytest.raises(QualityGateError, match="over the threshold"):
        check_gate(out, QualityConfig(max_bad_fraction=0.1))
    check_gate(out, QualityConfig(max_bad_fraction=0.5))


def test_clean_batch_passes_and_missing_images_are_caught(local_lake):
    stored = local_lake.put_image(__import__("tests.test_lake", fromlist=["png"]).png())
    rows = [row(i, image_sha256=stored.sha256, image_key=stored.key) for i in range(5)]
    rows.append(row(5, image_sha256="ab" * 32, image_key="raw/images/ab/missing.png"))
    out = validate_interactions(frame(rows), DAY0, DAY1, lake=local_lake)
    assert list(out.quarantined["request_id"]) == ["r5"]
    assert out.quarantined["quarantine_reason"].iloc[0] == "image object missing"
    assert validate_interactions(frame(rows[:5]), DAY0, DAY1, lake=local_lake).bad_fraction == 0


def test_implicit_feedback_rules():
    inter = pd.DataFrame([row(i) for i in range(8)])
    inter.loc[6, "question"] = "same question"
    inter.loc[7, "question"] = "same question"  # asked again a minute later in the same session
    t = lambda i, s: DAY0 + dt.timedelta(minutes=i, seconds=s)
    fb = pd.DataFrame([
        {"request_id": "r0", "ts": t(0, 10), "type": "accept", "edited_text": None, "dwell_ms": None, "rating": None},
        {"request_id": "r1", "ts": t(1, 10), "type": "edit", "edited_text": "blue", "dwell_ms": None, "rating": None},
        {"request_id": "r2", "ts": t(2, 10), "type": "regenerate", "edited_text": None, "dwell_ms": None, "rating": None},
        {"request_id": "r3", "ts": t(3, 2), "type": "close", "edited_text": None, "dwell_ms": None, "rating": None},
        {"request_id": "r4", "ts": t(4, 30), "type": "dwell", "edited_text": None, "dwell_ms": 40000, "rating": None},
        {"request_id": "r5", "ts": t(5, 30), "type": "rating", "edited_text": None, "dwell_ms": None, "rating": 1},
    ])
    got = mine(inter, fb).set_index("request_id")
    assert got.loc["r0", "weak_label"] == "positive"
    assert got.loc["r1", "weak_label"] == "negative" and got.loc["r1", "edit_distance"] == edit_distance("red", "blue")
    assert got.loc["r1", "edit_ratio"] == pytest.approx(edit_distance("red", "blue") / 4)
    assert got.loc["r2", "reason"] == "regenerated"
    assert got.loc["r3", "weak_label"] == "weak_negative"
    assert (got.loc["r4", "weak_label"], got.loc["r4", "reason"]) == ("unknown", "long dwell, no action")
    assert got.loc["r5", "weak_label"] == "negative"
    assert got.loc["r6", "reason"] == "question repeated in the session"
    assert got.loc["r7", "weak_label"] == "unknown"
    # Rules are configurable: a wider quick-close window changes nothing here, a narrower one does.
    strict = mine(inter, fb, MiningRules(quick_close_s=1.0)).set_index("request_id")
    assert strict.loc["r3", "weak_label"] == "unknown"


def test_mining_without_feedback_or_traffic():
    """No feedback at all (it used to fail with KeyError: '_pos'), and a day without interactions."""
    from vloop.curate.mining import MINED_COLUMNS

    inter = pd.DataFrame([row(i) for i in range(3)])
    no_fb = pd.DataFrame(columns=["request_id", "ts", "type", "edited_text", "dwell_ms", "rating"])
    got = mine(inter, no_fb)
    assert list(got.columns) == MINED_COLUMNS and len(got) == 3
    assert (got["weak_label"] == "unknown").all() and (got["reason"] == "no reaction").all()
    empty = mine(inter.iloc[:0], no_fb)
    assert list(empty.columns) == MINED_COLUMNS and len(empty) == 0
    assert empty["weight"].dtype == "float64" and str(empty["edit_distance"].dtype) == "Int64"


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("红色", "蓝色") == 1


def test_ingest_joins_late_feedback_and_drops_exact_duplicates(lake):
    from vloop.curate.ingest import ingest_day
    from vloop.store.schema import FEEDBACK

    rows = [row(i) for i in range(4)]
    lake.write_partition("raw/interactions", INTERACTION.to_table(rows[:3]), DAY0.date(), hour=0)
    lake.write_partition("raw/interactions", INTERACTION.to_table([rows[2], rows[3]]), DAY0.date(), hour=1)
    ev = lambda i, rid, ts: {"event_id": f"e{i}", "request_id": rid, "ts": ts, "type": "accept"}
    lake.write_partition("raw/feedback", FEEDBACK.to_table([ev(1, "r0", DAY0 + dt.timedelta(hours=1)),
                                                            ev(1, "r0", DAY0 + dt.timedelta(hours=1)),
                                                            ev(2, "other-day", DAY0)]), DAY0.date())
    lake.write_partition("raw/feedback", FEEDBACK.to_table([ev(3, "r1", DAY1 + dt.timedelta(hours=2)),
                                                            ev(4, "r2", DAY1 + dt.timedelta(hours=9))]), DAY1.date())
    batch = ingest_day(lake, DAY0.date(), run_time=DAY1 + dt.timedelta(hours=3))
    assert sorted(batch.interactions["request_id"]) == ["r0", "r1", "r2", "r3"]
    # r0's duplicate dropped; r1's late event counts; r2's arrives after the run; unknown ids ignored.
    assert sorted(batch.feedback["event_id"]) == ["e1", "e3"]
    assert batch.duplicates_dropped == 2


def test_selection_prioritises_explains_and_excludes():
    from vloop.curate.selection import SelectionConfig, select

    rows = [row(i, confidence=0.9, category="shoes", image_sha256=f"{i:064x}", image_key=f"raw/images/{i}.png")
            for i in range(10)]
    rows[1]["confidence"] = 0.2  # low confidence
    rows[2]["confidence"] = 0.3
    rows[3].update(question=rows[2]["question"].upper() + "!", image_sha256=rows[2]["image_sha256"],
                   image_key=rows[2]["image_key"], confidence=0.35)  # near-duplicate of r2
    rows[4]["user_key"] = "opted-out"
    rows[4]["confidence"] = 0.1
    rows[5]["confidence"] = 0.1  # already labelled
    rows[6]["confidence"] = 0.1
    rows[6]["image_key"] = "raw/images/blurry.png"
    cands = pd.DataFrame(rows)
    mined = pd.DataFrame([{"request_id": r["request_id"], "weak_label": "unknown", "weight": 0.0} for r in rows])
    mined.loc[mined["request_id"] == "r7", ["weak_label", "weight"]] = ["negative", 1.0]
    chosen = select(cands, mined, cfg=SelectionConfig(budget=3), opted_out_users={"opted-out"},
                    already_labelled={"r5"}, poor_images={"raw/images/blurry.png"})
    assert list(chosen["request_id"]) == ["r7", "r1", "r2"]  # budget 3, highest priority first
    why = dict(zip(chosen["request_id"], chosen["why"]))
    assert "negative feedback" in why["r7"] and "low confidence 0.20" in why["r1"]
    assert "category shoes error rate" in why["r1"]
    everything = select(cands, mined, opted_out_users={"opted-out"}, already_labelled={"r5"},
                        poor_images={"raw/images/blurry.png"})
    assert {"r3", "r4", "r5", "r6"}.isdisjoint(everything["request_id"])  # duplicate, opt-out, labelled, poor


def test_daily_metrics_per_arm_and_calibration():
    from vloop.curate.report import daily_metrics, expected_calibration_error, top_error_categories

    assert expected_calibration_error([0.9, 0.9], [True, True]) == pytest.approx(0.1)
    assert expected_calibration_error([0.95, 0.15], [True, False]) == pytest.approx(0.1)
    inter = pd.DataFrame([row(i, arm="canary" if i >= 6 else "champion", adapter="a@2" if i >= 6 else None,
                              category="bags" if i % 2 else "shoes", latency_ms=float(100 + i),
                              confidence=0.9 if i % 3 else 0.2) for i in range(10)])
    fb = pd.DataFrame([{"request_id": f"r{i}", "ts": DAY0, "type": t, "edited_text": "x" if t == "edit" else None,
                        "dwell_ms": None, "rating": None}
                       for i, t in [(0, "accept"), (1, "edit"), (2, "accept"), (3, "regenerate"), (6, "accept"),
                                    (7, "accept"), (8, "edit")]])
    mined = mine(inter, fb)
    verdicts = pd.DataFrame({"request_id": ["r0", "r1", "r6", "r8"], "verdict": ["correct", "wrong", "correct", "correct"]})
    inter.loc[0, "base_model"] = "/srv/models/qwen3-vl-8b"  # a path: never shown as the version
    m = daily_metrics(inter, fb, mined, verdicts).set_index("arm")
    assert len(m) == 2 and "base_model" not in m.columns  # one row per (model version, arm)
    assert m.loc["champion", "requests"] == 6 and m.loc["canary", "requests"] == 4
    assert m.loc["champion", "acceptance_rate"] == pytest.approx(2 / 6)
    assert m.loc["champion", "edit_rate"] == pytest.approx(1 / 6)
    assert m.loc["champion", "repeat_rate"] == pytest.approx(1 / 6)
    assert m.loc["canary", "model_version"] == "a@2" and m.loc["champion", "model_version"] == "base"
    assert m.loc["champion", "implicit_agreement"] == 1.0  # r0 accepted & correct, r1 edited & wrong
    assert m.loc["canary", "implicit_agreement"] == 0.5  # r8 edited but judged correct
    assert m.loc["champion", "latency_p50_ms"] == pytest.approx(102.5)
    top = top_error_categories(inter, mined)
    assert list(top["category"]) == ["bags", "shoes"] and list(top["errors"]) == [2, 1]


def test_outcome_flags_is_the_one_definition_of_acceptance():
    """accepted = an ``accept`` event, edited = an ``edit`` event; dwell, close, ratings are neither."""
    from vloop.curate.report import outcome_flags, traffic_metrics

    inter = pd.DataFrame([row(i, user_key=f"u{i % 2}", arm="canary" if i >= 4 else "champion", adapter=None)
                          for i in range(6)])
    ev = lambda rid, t: {"request_id": rid, "ts": DAY0, "type": t, "edited_text": None, "dwell_ms": None,  # noqa: E731
                         "rating": None}
    fb = pd.DataFrame([ev("r0", "accept"), ev("r0", "edit"), ev("r1", "dwell"), ev("r2", "edit"),
                       ev("r3", "close"), ev("r4", "accept"), ev("r4", "accept"), ev("elsewhere", "accept")])
    flags = outcome_flags(inter[["request_id", "user_key", "arm"]], fb[["request_id", "type"]])
    assert list(flags.columns) == ["request_id", "accepted", "edited"]
    assert list(flags["request_id"]) == list(inter["request_id"])  # one row per interaction, in order
    assert flags["accepted"].tolist() == [True, False, False, False, True, False]  # dwell (r1) is not acceptance
    assert flags["edited"].tolist() == [True, False, True, False, False, False]
    assert flags["accepted"].dtype == bool
    # The report's rates are the same flags averaged per arm.
    m = traffic_metrics(inter, fb, mine(inter, fb)).set_index("arm")
    assert m.loc["champion", "acceptance_rate"] == pytest.approx(1 / 4) and m.loc["canary", "acceptance_rate"] == 0.5
    assert m.loc["champion", "edit_rate"] == pytest.approx(2 / 4)
    none = outcome_flags(inter, fb.iloc[:0])
    assert not none["accepted"].any() and not none["edited"].any() and len(none) == 6
    assert len(outcome_flags(inter.iloc[:0], fb)) == 0
