"""bench/loop_efficacy.py's simulation (vloop.sim.efficacy): strategies see the same traffic and spend
the same budget, and the figures follow the seed (nothing is fixed in advance)."""

import pytest

from vloop.sim.efficacy import EfficacyConfig, day_traffic, labels_to_reach, run_experiment, time_to_fix


def test_traffic_is_the_same_for_every_strategy_and_changes_with_the_seed():
    cfg = EfficacyConfig(requests_per_day=30, drift_round=1, days_per_round=1)
    a, b = day_traffic(cfg, 1, 0), day_traffic(cfg, 1, 0)
    assert [(r.request_id, r.sample.question, r.sample.answer, r.user, r.r_react) for r in a] == \
        [(r.request_id, r.sample.question, r.sample.answer, r.user, r.r_react) for r in b]
    other = day_traffic(cfg, 2, 0)
    assert [r.sample.id for r in other] != [r.sample.id for r in a]
    # The new line appears on its day, never before.
    assert not any(r.sample.category == cfg.new_line for r in a)
    assert cfg.new_line_share(1) == cfg.drift_shares[0] and cfg.new_line_share(5) == cfg.drift_shares[-1]


def test_seed_zero_is_kept_for_development():
    with pytest.raises(ValueError, match="development seed"):
        EfficacyConfig(seeds=(0, 1))


def test_label_curve_interpolation_and_time_to_fix():
    import pandas as pd

    curve = pd.DataFrame({"labels": [0, 100, 200, 300], "all": [0.5, 0.6, 0.8, 0.7]})
    assert labels_to_reach(curve, 0.7) == pytest.approx(150)
    assert labels_to_reach(curve, 0.75) == pytest.approx(175)  # the envelope: 300 labels never lose what 200 had
    assert labels_to_reach(curve, 0.9) == float("inf")
    cfg = EfficacyConfig(days_per_round=2, drift_round=1)
    recs = [{"day": 0, "new": 0.2, "all": 0.7}, {"day": 2, "new": 0.3, "all": 0.7},
            {"day": 4, "new": 0.5, "all": 0.8}, {"day": 6, "new": 0.78, "all": 0.8}]
    assert time_to_fix(cfg, recs) == 4.0
    assert time_to_fix(cfg, recs[:3]) == float("inf")


def test_strategies_share_traffic_and_budget_and_figures_follow_the_seed(base_model_dir, tmp_path):
    cfg = EfficacyConfig(seeds=(1, 2), budgets=(10,), rounds=1, days_per_round=1, requests_per_day=40,
                         strategies=("active", "random"), eval_per_slice=8, min_steps=4, max_steps=4)
    res = run_experiment(cfg, base_model_dir, log=lambda s: None, work=tmp_path)
    runs = {(r["seed"], r["strategy"]): r for r in res["runs"]}
    for seed in cfg.seeds:
        active, random_ = runs[seed, "active"], runs[seed, "random"]
        assert active["traffic"] == random_["traffic"]  # the same questions, users and reactions' draws
        assert random_["records"][-1]["labels"] == 10  # the budget, spent
        assert 0 < active["records"][-1]["labels"] <= 10  # never more than the budget
        assert {p["pick"] for p in random_["picks"]} == {"random"}
        assert "priority" in {p["pick"] for p in active["picks"]}
        # Before any retraining both are the base: the same figures.
        assert active["records"][0]["all"] == random_["records"][0]["all"]
    assert runs[1, "active"]["traffic"] != runs[2, "active"]["traffic"]
    base_em = [runs[s, "active"]["records"][0]["items"]["right"] for s in cfg.seeds]
    assert base_em[0] != base_em[1]  # other held-out questions per seed
    curve = res["summary"]["curve"]
    assert {(c["strategy"], c["round"]) for c in curve} == {(s, r) for s in ("active", "random") for r in (0, 1)}
    assert all(c["all_lo"] <= c["all"] <= c["all_hi"] for c in curve)
