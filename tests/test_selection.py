"""The selection's random audit: a uniform sample, the same whether a day is selected at once or
a slice at a time, and never a copy of a priority pick."""

import numpy as np
import pytest
import pandas as pd

from vloop.curate.selection import SelectionConfig, finish_selection, merge_parts, select, select_part, uniform_sample


def _day(n=400, seed=0):
    rng = np.random.default_rng(seed)
    cands = pd.DataFrame({"request_id": [f"r{i:04d}" for i in range(n)], "user_key": "u" * 64,
                          "image_key": [f"img{i % 150}" for i in range(n)],
                          "image_sha256": [f"{i % 150}" for i in range(n)],
                          "question": rng.choice(["What colour is this?", "这是什么颜色?"], n),
                          "category": rng.choice(["shoes", "bags"], n), "confidence": rng.uniform(0, 1, n)})
    mined = pd.DataFrame({"request_id": cands["request_id"],
                          "weak_label": rng.choice(["positive", "negative", "unknown"], n), "weight": 0.8})
    return cands, mined


def test_audit_share_of_the_budget_goes_to_uniform_picks_outside_the_priority_ones():
    cands, mined = _day()
    cfg = SelectionConfig(budget=40, audit_share=0.25)
    chosen = select(cands, mined, cfg=cfg, category_error_rate={}, salt="2030-01-01")
    prio, audit = chosen[chosen["pick"].isin(["priority", "both"])], chosen[chosen["pick"].isin(["audit", "both"])]
    # The whole budget is used: an audit draw that is a priority pick frees a label for the next
    # priority row.
    assert len(chosen) == 40 and chosen["request_id"].is_unique and 7 <= len(audit) <= 10
    assert len(prio) == 30 + (chosen["pick"] == "both").sum()
    # The audit is drawn from every eligible row, priority picks included (else it would miss the
    # errors priority found and under-state the base rate): a shared row is labelled once.
    from vloop.curate.selection import audit_keys, select_part
    eligible = select_part(cands, mined, cfg=cfg, category_error_rate={}, salt="2030-01-01").pool
    drawn = set(eligible.nsmallest(10, "_audit_key")["request_id"])
    assert set(chosen.loc[chosen["pick"] == "audit", "request_id"]) <= drawn
    assert drawn & set(prio["request_id"]) <= set(chosen.loc[chosen["pick"] == "both", "request_id"])
    only_audit = chosen[chosen["pick"] == "audit"]
    assert only_audit["why"].str.startswith("random audit").all() and not prio["why"].str.startswith("random").any()
    # Not a priority-ordered pick: audits' priorities spread over the candidates' range.
    assert audit["priority"].min() < prio["priority"].min()
    assert len(audit_keys(cands["request_id"], "x")) == len(cands)
    # Another day's salt draws another sample.
    other = select(cands, mined, cfg=cfg, category_error_rate={}, salt="2030-01-02")
    assert set(other.loc[other["pick"] == "audit", "request_id"]) != set(audit["request_id"])


def test_selecting_an_hour_at_a_time_gives_the_days_selection():
    cands, mined = _day(600, seed=3)
    cfg = SelectionConfig(budget=50)
    whole = select(cands, mined, cfg=cfg, category_error_rate={"shoes": 0.2}, salt="d")
    best = None
    for part_ids in np.array_split(np.arange(len(cands)), 7):
        part = select_part(cands.iloc[part_ids], mined, cfg=cfg, category_error_rate={"shoes": 0.2}, salt="d")
        best = part if best is None else merge_parts([best, part], cfg)
    hourly = finish_selection([best], cfg)
    assert list(hourly["request_id"]) == list(whole["request_id"])
    assert list(hourly["pick"]) == list(whole["pick"]) and 3 <= whole["pick"].isin(["audit", "both"]).sum() <= 5
    assert len(whole) == 50


def test_uniform_sample_is_uniform():
    df = pd.DataFrame({"request_id": [f"q{i}" for i in range(100)]})
    hits = np.zeros(100)
    for s in range(2000):
        hits[df.index.get_indexer(uniform_sample(df, 10, salt=str(s)).index)] += 1
    # Each row is drawn with probability 0.1: 200 times in 2,000 draws, binomial sd ~13.4.
    assert abs(hits.mean() - 200) < 1e-9 and hits.min() > 140 and hits.max() < 260


def test_report_shows_the_selections_hit_rate_beside_the_audits_base_rate():
    from vloop.curate.report import selection_hit_rates

    selected = pd.DataFrame({"request_id": [f"p{i}" for i in range(20)] + [f"a{i}" for i in range(10)] + ["old"],
                             "selected_on": ["2030-01-01"] * 30 + ["2029-12-31"],
                             "pick": ["priority"] * 20 + ["audit"] * 10 + [None]})
    verdicts = ["wrong"] * 15 + ["correct"] * 4 + ["unclear"] + ["wrong"] * 2 + ["correct"] * 8 + ["wrong"]
    labels = pd.DataFrame({"request_id": list(selected["request_id"]), "verdict": verdicts})
    t = selection_hit_rates(selected, labels).set_index("selected_on")
    day = t.loc["2030-01-01"]
    assert day["priority_judged"] == 19 and day["hit_rate"] == pytest.approx(15 / 19)
    assert day["audit_judged"] == 10 and day["base_rate"] == pytest.approx(0.2)
    assert day["base_rate_lo"] < 0.2 < day["base_rate_hi"] and day["hit_over_base"] == pytest.approx(15 / 19 / 0.2)
    # A pick from before the audit existed counts as priority; that day has no base rate.
    old = t.loc["2029-12-31"]
    assert old["priority_judged"] == 1 and old["hit_rate"] == 1.0 and old["audit_judged"] == 0
    assert np.isnan(old["base_rate"])
    assert len(selection_hit_rates(selected.iloc[:0], labels)) == 0
