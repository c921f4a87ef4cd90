"""The canary decision rule, checked by simulating experiments look by look.

The simulation (here, not in the production module): users arrive each hour (Poisson), each is
assigned to the canary with probability ``share``, sends ``1 + Poisson(2)`` requests (mean 3), and
has their own acceptance and edit propensities drawn from Beta distributions around the arm's rates
(concentration 5, so the intra-user correlation is 1/6: the clustered variance matters). Per hour
and arm the per-user sums and second moments are added up; cumulative sums give the counts at each
hourly look, and an experiment ends at the first action other than "continue".
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest

from vloop.release.rollout import Decision, RolloutPolicy, decide, mixture_radius, rate_variance

STATS = ("users", "requests", "accepted", "edited",
         "requests_sq", "accepted_sq", "edited_sq", "accepted_x_requests", "edited_x_requests")
MOMENTS = STATS[4:]
BASE_RATES = (0.55, 0.20)  # acceptance, edit
CONCENTRATION = 5.0  # Beta(κp, κ(1−p)) per user: intra-user correlation 1/(κ+1)
EXTRA_REQUESTS = 2.0  # requests per user = 1 + Poisson(2)
HORIZON_HOURS = 72
# 60,000 requests over the 72 hours at 3 requests per user.
USERS_PER_HOUR = 60_000 / 3 / HORIZON_HOURS
AA_EXPERIMENTS = 200
AA_HOURS = 168  # a week of hourly looks, up to the default max_hours
POWER_RUNS = 120


def simulate_counts(rng, *, hours, canary_share, champion=BASE_RATES, canary=BASE_RATES,
                    users_per_hour=USERS_PER_HOUR):
    """Cumulative counts, shape (hours, 2 arms [champion, canary], len(STATS))."""
    hour = np.repeat(np.arange(hours), rng.poisson(users_per_hour, size=hours))
    is_canary = (rng.random(hour.size) < canary_share).astype(np.int64)
    requests = 1 + rng.poisson(EXTRA_REQUESTS, hour.size)
    rates = np.array([champion, canary])[is_canary]  # (users, 2)
    propensity = rng.beta(CONCENTRATION * rates, CONCENTRATION * (1 - rates))
    accepted = rng.binomial(requests, propensity[:, 0])
    edited = rng.binomial(requests, propensity[:, 1])
    per_user = (np.ones_like(requests), requests, accepted, edited, requests**2, accepted**2, edited**2,
                accepted * requests, edited * requests)
    cell = hour * 2 + is_canary
    totals = np.stack([np.bincount(cell, weights=s, minlength=2 * hours) for s in per_user], axis=-1)
    return np.cumsum(totals.reshape(hours, 2, len(STATS)), axis=0)


def counts_frame(cumulative, look, columns=STATS):
    """The DataFrame ``decide`` gets at look ``look`` (0-based; hours = look + 1)."""
    values = cumulative[look]
    data = {"arm": ["champion", "canary"]}
    data.update((c, values[:, STATS.index(c)]) for c in columns)
    data["hours"] = [float(look + 1)] * 2
    return pd.DataFrame(data)


def run_experiment(cumulative, policy=None):
    """Calls ``decide`` at every hourly look; returns the first non-continue decision (or the last
    one) and the hour it came at."""
    for look in range(len(cumulative)):
        decision = decide(counts_frame(cumulative, look), policy)
        if decision.action != "continue":
            break
    return decision, look + 1


@lru_cache(maxsize=1)
def aa_experiments():
    rng = np.random.default_rng(20240601)
    return [simulate_counts(rng, hours=AA_HOURS, canary_share=0.10) for _ in range(AA_EXPERIMENTS)]


def frame(**arms):
    """A counts frame from ``arm=dict(...)`` keyword arguments, with hours 30 unless given."""
    rows = [{"arm": name, "hours": 30.0, **values} for name, values in arms.items()]
    return pd.DataFrame(rows)


CHAMPION = dict(users=9000, requests=27000, accepted=14850, edited=5400)
CANARY = dict(users=1000, requests=3000, accepted=1650, edited=600)


# --- error rates and power, by simulation -------------------------------------------------------


def test_aa_experiments_are_rarely_promoted_or_rolled_back():
    started = time.perf_counter()
    outcomes = [run_experiment(cumulative) for cumulative in aa_experiments()]
    false_decisions = sum(d.action == "promote" or (d.action == "rollback" and not d.inconclusive)
                          for d, _ in outcomes)
    halts = sum(d.action == "halt" for d, _ in outcomes)
    inconclusive = sum(d.inconclusive for d, _ in outcomes)
    n = len(outcomes)
    rate = false_decisions / n
    print(f"\nA/A: {n} experiments x up to {AA_HOURS} hourly looks: promoted or rolled back {false_decisions} "
          f"({rate:.1%}, alpha 5%), SRM halts {halts} ({halts / n:.1%}), inconclusive at max_hours "
          f"{inconclusive}; {time.perf_counter() - started:.1f} s")
    assert rate <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / n)
    # The chi-square SRM check at p < 0.001 is repeated at every look: some false halts, but few.
    assert halts / n <= 0.05
    assert inconclusive == n - false_decisions - halts  # every other experiment ran out of time


@pytest.mark.parametrize("direction, expected", [(+1, "promote"), (-1, "rollback")])
def test_three_points_is_detected_with_80_percent_power(direction, expected):
    """Canary 3 points better (acceptance +0.03, edit −0.03) or worse, 10% share, 60,000 requests
    over 72 hours."""
    rng = np.random.default_rng(7 if direction > 0 else 8)
    canary = (BASE_RATES[0] + 0.03 * direction, BASE_RATES[1] - 0.03 * direction)
    outcomes = [run_experiment(simulate_counts(rng, hours=HORIZON_HOURS, canary_share=0.10, canary=canary))
                for _ in range(POWER_RUNS)]
    hits = [hour for d, hour in outcomes if d.action == expected and not d.inconclusive]
    wrong = sum(d.action not in (expected, "continue") for d, _ in outcomes)
    power = len(hits) / POWER_RUNS
    print(f"\n{'better' if direction > 0 else 'worse'} by 3 points: {expected} in {len(hits)}/{POWER_RUNS} "
          f"({power:.0%}), median hour {np.median(hits) if hits else float('nan'):.0f}, other actions {wrong}")
    assert power >= 0.80
    assert wrong <= 2


def test_sample_ratio_mismatch_halts():
    """A 7% split when 10% is configured is halted before anything else is decided."""
    rng = np.random.default_rng(11)
    outcomes = [run_experiment(simulate_counts(rng, hours=HORIZON_HOURS, canary_share=0.07)) for _ in range(20)]
    assert all(d.action == "halt" for d, _ in outcomes), [d.reason for d, _ in outcomes if d.action != "halt"]
    print(f"\nSRM 7% vs 10%: halted 20/20, at hours {sorted(h for _, h in outcomes)}")
    # And at 10k users directly.
    d = decide(frame(champion=dict(users=9300, requests=27900, accepted=15345, edited=5580),
                     canary=dict(users=700, requests=2100, accepted=1155, edited=420)))
    assert d.action == "halt" and d.srm_p < 1e-10
    assert "7.00%" in d.reason and "10%" in d.reason and "SRM p=" in d.reason
    print(d.reason)


def with_guardrail_columns(frame, rng, error_rates, p95_ms):
    """A counts frame with ``errors`` (Binomial on the requests) and ``latency_p95_ms`` per arm."""
    frame = frame.copy()
    frame["errors"] = [rng.binomial(int(n), error_rates[arm]) for arm, n in zip(frame["arm"], frame["requests"])]
    frame["latency_p95_ms"] = [p95_ms[arm] for arm in frame["arm"]]
    return frame


def test_broken_canary_with_a_sample_ratio_mismatch_is_taken_off():
    """A canary at 7% of the users instead of 10%, with a 43% error rate and a 5 s p95: a split
    mismatch most often means replicas that failed to load the canary, exactly when it is broken.
    The guardrails win over the SRM check once the canary has ``guardrail_min_requests``; before
    that a halt may come first, and a halt takes the canary off too (vloop.release.canary.step). Either way
    the experiment ends within the first hours, and no look, however late, halts it instead."""
    rng = np.random.default_rng(12)
    errors, p95 = {"champion": 0.01, "canary": 0.43}, {"champion": 800.0, "canary": 5000.0}
    policy = RolloutPolicy()
    actions = []
    for _ in range(20):
        cumulative = simulate_counts(rng, hours=HORIZON_HOURS, canary_share=0.07)
        for look in range(HORIZON_HOURS):
            d = decide(with_guardrail_columns(counts_frame(cumulative, look), rng, errors, p95), policy)
            if d.action != "continue":
                break
        canary_requests = cumulative[look][1][STATS.index("requests")]
        if canary_requests >= policy.guardrail_min_requests:
            assert d.action == "rollback" and d.guardrails == ["error_rate", "latency_p95"], d.reason
        else:  # too few canary requests for a guardrail yet: the mismatch alone decided
            assert d.action == "halt" and "sample-ratio mismatch" in d.reason, d.reason
        assert look <= 2, (look, d.reason)
        actions.append(d.action)
    print(f"\nbroken canary at 7% vs 10%: {actions.count('rollback')} rolled back by the guardrails, "
          f"{actions.count('halt')} halted (taken off) before they had {policy.guardrail_min_requests} requests")
    assert actions.count("rollback") >= 15
    # Late in the experiment the split is far off (p ~ 1e-11 and below), and still the guardrails decide.
    late = decide(with_guardrail_columns(counts_frame(cumulative, HORIZON_HOURS - 1), rng, errors, p95))
    assert late.srm_p < 1e-6 and late.action == "rollback" and late.guardrails == ["error_rate", "latency_p95"]
    # A significant regression beats the mismatch as well.
    worse = decide(frame(champion=dict(users=9300, requests=27900, accepted=15345, edited=5580),
                         canary=dict(users=700, requests=2100, accepted=700, edited=420)))
    assert worse.srm_p < 1e-10 and worse.action == "rollback" and worse.metrics["acceptance"].worse


def test_max_hours_wins_over_a_sample_ratio_mismatch():
    """At 500 hours a mismatched canary is retired as inconclusive, not halted (again)."""
    mismatched = dict(champion=dict(users=9300, requests=27900, accepted=15345, edited=5580, hours=500.0),
                      canary=dict(users=700, requests=2100, accepted=1155, edited=420, hours=500.0))
    d = decide(frame(**mismatched))
    assert d.srm_p < 1e-10 and d.action == "rollback" and d.inconclusive, d.reason
    assert "sample-ratio mismatch" in d.reason
    # Before max_hours it is a halt, and never a promotion, however much better the canary looks.
    better = dict(mismatched, canary=dict(mismatched["canary"], accepted=1800, hours=48.0),
                  champion=dict(mismatched["champion"], hours=48.0))
    d = decide(frame(**better))
    assert d.action == "halt" and d.metrics["acceptance"].better
    # A canary that gets no users at all, at max_hours: retired too.
    d = decide(frame(champion=dict(CHAMPION, hours=500.0)))
    assert d.action == "rollback" and d.inconclusive


# --- the variance ------------------------------------------------------------------------------


def test_delta_method_variance_matches_the_spread_of_simulated_rates():
    """Across the A/A experiments, the variance of the canary−champion difference at hour 24 is what
    the delta method estimates; the fallback without moments is wider."""
    look = 23
    frames = [counts_frame(c, look) for c in aa_experiments()]
    diffs, delta, fallback = [], [], []
    for f in frames:
        arms = {r.pop("arm"): r for r in f.to_dict("records")}
        diffs.append(arms["canary"]["accepted"] / arms["canary"]["requests"]
                     - arms["champion"]["accepted"] / arms["champion"]["requests"])
        delta.append(sum(rate_variance(arms[a], "accepted")[0] for a in arms))
        bare = {a: {k: v for k, v in r.items() if k not in MOMENTS} for a, r in arms.items()}
        fallback.append(sum(rate_variance(bare[a], "accepted")[0] for a in arms))
    ratio = np.var(diffs, ddof=1) / np.mean(delta)
    widening = np.mean(fallback) / np.mean(delta)
    print(f"\nempirical / delta-method variance {ratio:.2f}; fallback / delta {widening:.2f}")
    assert 0.7 < ratio < 1.4  # sd of a variance from 200 samples is ~10%
    assert widening > 1.5


def test_without_moment_columns_the_interval_is_wider():
    cumulative = aa_experiments()[0]
    with_moments = decide(counts_frame(cumulative, 47))
    without = decide(counts_frame(cumulative, 47, columns=STATS[:4]))
    for name in ("acceptance", "edit"):
        m, f = with_moments.metrics[name], without.metrics[name]
        assert m.variance_method == "delta" and f.variance_method == "conservative"
        assert f.diff == pytest.approx(m.diff)
        assert f.upper - f.lower > m.upper - m.lower
    # Absent on one arm only: that metric falls back too.
    partial = counts_frame(cumulative, 47)
    partial.loc[partial["arm"] == "canary", "accepted_sq"] = np.nan
    assert decide(partial).metrics["acceptance"].variance_method == "conservative"


def test_mixture_radius_shape():
    tau = 0.03
    variances = np.geomspace(1e-7, 1e-1, 25)
    radii = np.array([mixture_radius(v, tau, 0.025) for v in variances])
    assert np.all(np.diff(radii) > 0)  # grows with V
    # Relative to the fixed-sample z·sqrt(V), the width grows once V is large against τ²...
    relative = radii / np.sqrt(variances)
    large = variances > tau**2
    assert np.all(np.diff(relative[large]) > 0)
    # ... and is ~3.3 sqrt(V) near V = τ²/10.
    assert mixture_radius(tau**2 / 10, tau, 0.025) / math.sqrt(tau**2 / 10) == pytest.approx(3.28, abs=0.01)
    # At fixed V, a larger alpha gives a narrower interval.
    by_alpha = [mixture_radius(1e-4, tau, a) for a in (0.001, 0.01, 0.025, 0.05, 0.2)]
    assert all(x > y for x, y in zip(by_alpha, by_alpha[1:]))
    # Closed form at one point.
    v, t2 = 1e-4, tau**2
    assert mixture_radius(v, tau, 0.05) == pytest.approx(
        math.sqrt(2 * v * (v + t2) / t2 * (math.log(20) + 0.5 * math.log((v + t2) / v))))


# --- single looks ------------------------------------------------------------------------------


def test_guardrails_roll_back():
    champion = dict(CHAMPION, errors=270, latency_p95_ms=800.0)
    errors = decide(frame(champion=champion, canary=dict(CANARY, errors=120, latency_p95_ms=820.0)))
    assert errors.action == "rollback" and errors.guardrails == ["error_rate"]
    assert "error rate 0.040 canary vs 0.010 champion" in errors.reason
    slow = decide(frame(champion=champion, canary=dict(CANARY, errors=30, latency_p95_ms=1600.0)))
    assert slow.action == "rollback" and slow.guardrails == ["latency_p95"]
    assert "1600 ms canary vs 800 ms champion" in slow.reason
    both = decide(frame(champion=champion, canary=dict(CANARY, errors=120, latency_p95_ms=1600.0)))
    assert both.guardrails == ["error_rate", "latency_p95"]
    # Too few canary requests, or the columns on one arm only: no guardrail.
    few = dict(users=30, requests=60, accepted=33, edited=12, errors=10, latency_p95_ms=5000.0)
    assert decide(frame(champion=champion, canary=few)).guardrails == []
    assert decide(frame(champion=CHAMPION, canary=dict(CANARY, errors=900))).guardrails == []
    fine = decide(frame(champion=champion, canary=dict(CANARY, errors=35, latency_p95_ms=900.0)))
    assert fine.action == "continue" and fine.guardrails == []


def test_significantly_worse_rolls_back_before_min_hours():
    canary = dict(CANARY, accepted=1350)  # 0.45 vs 0.55 on 1,000 users
    d = decide(frame(champion=dict(CHAMPION, hours=3.0), canary=dict(canary, hours=3.0)))
    assert d.action == "rollback" and not d.inconclusive
    assert d.metrics["acceptance"].worse and d.metrics["acceptance"].upper < 0


def test_promotion_waits_for_min_hours_and_min_requests():
    better = dict(CANARY, accepted=1950, edited=420)  # +10 points acceptance, −6 points edit
    early = decide(frame(champion=dict(CHAMPION, hours=10.0), canary=dict(better, hours=10.0)))
    assert early.action == "continue" and early.metrics["acceptance"].better
    assert "waiting for 24 h" in early.reason
    assert decide(frame(champion=CHAMPION, canary=better)).action == "promote"
    policy = RolloutPolicy(min_requests=5000)
    assert decide(frame(champion=CHAMPION, canary=better), policy).action == "continue"


def test_max_hours_without_a_decision_is_an_inconclusive_rollback():
    d = decide(frame(champion=dict(CHAMPION, hours=168.0), canary=dict(CANARY, hours=168.0)))
    assert d.action == "rollback" and d.inconclusive
    assert d.reason.startswith("inconclusive after 168 hours")


def test_missing_arm_or_no_users_continues():
    d = decide(frame(champion=dict(users=40, requests=120, accepted=60, edited=20)))
    assert d.action == "continue" and "canary row is missing" in d.reason
    d = decide(frame(champion=dict(users=40, requests=120, accepted=60, edited=20),
                     canary=dict(users=0, requests=0, accepted=0, edited=0)))
    assert d.action == "continue" and "canary has no users" in d.reason
    nothing = pd.DataFrame(columns=["arm", "users", "requests", "accepted", "edited", "hours"])
    assert decide(nothing).action == "continue"
    # Other arms are ignored.
    holdout = dict(users=-5, requests=0, accepted=0, edited=0)
    d = decide(frame(champion=CHAMPION, canary=CANARY, holdout=holdout))
    assert d.action == "continue" and d.users == {"champion": 9000, "canary": 1000}
    # But a canary that gets no users at all while the champion gets thousands is an assignment bug.
    d = decide(frame(champion=CHAMPION))
    assert d.action == "halt" and "sample-ratio mismatch" in d.reason


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns=["edited"]), "missing required column"),
    (lambda f: f.assign(users=-1), ">= 0"),
    (lambda f: f.assign(accepted=f["requests"] + 1), "accepted="),
    (lambda f: f.assign(edited=np.nan), "NaN"),
    (lambda f: f.assign(requests="many"), "not a number"),
    (lambda f: pd.concat([f, f.iloc[[1]]]), "one row per arm"),
    (lambda f: f.assign(errors=f["requests"] + 1), "errors="),
])
def test_bad_input_raises(change, message):
    with pytest.raises(ValueError, match=message):
        decide(change(frame(champion=CHAMPION, canary=CANARY)))


def test_counts_must_be_a_dataframe():
    with pytest.raises(ValueError, match="DataFrame"):
        decide([CHAMPION, CANARY])


def test_impossible_counts_halt():
    d = decide(frame(champion=CHAMPION, canary=dict(CANARY, users=4000)))
    assert d.action == "halt" and "more users (4000) than requests (3000)" in d.reason
    d = decide(frame(champion=dict(CHAMPION, requests_sq=1000), canary=CANARY))
    assert d.action == "halt" and "requests_sq" in d.reason
    d = decide(frame(champion=CHAMPION, canary=dict(CANARY, users=0)))
    assert d.action == "halt" and "requests but no users" in d.reason
    d = decide(frame(champion=CHAMPION, canary=dict(CANARY, accepted_sq=10, accepted_x_requests=9000,
                                                     requests_sq=9000, edited_sq=600, edited_x_requests=600)))
    assert d.action == "halt" and "moments of accepted" in d.reason


def test_reason_has_the_figures_and_to_dict_is_json():
    d = decide(counts_frame(aa_experiments()[1], 35))
    assert isinstance(d, Decision) and d.action == "continue"
    m = d.metrics["acceptance"]
    for text in (f"{m.canary:.3f} canary vs {m.champion:.3f} champion", f"diff {m.diff:+.3f}",
                 f"[{m.lower:+.3f}, {m.upper:+.3f}]", f"{d.users['canary']:,} canary",
                 f"{d.users['champion']:,} champion users", "after 36.0 h", "97.5% always-valid"):
        assert text in d.reason
    assert "edit " in d.reason
    payload = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert payload["action"] == "continue" and payload["metrics"]["edit"]["variance_method"] == "delta"
    assert set(payload["metrics"]["acceptance"]) >= {"champion", "canary", "diff", "lower", "upper",
                                                      "better", "worse"}
    empty = decide(frame(champion=dict(users=1, requests=1, accepted=1, edited=0)))
    json.dumps(empty.to_dict(), allow_nan=False)


def test_policy_is_validated():
    with pytest.raises(ValueError, match="alpha"):
        RolloutPolicy(alpha=0)
    with pytest.raises(ValueError, match="max_hours"):
        RolloutPolicy(min_hours=48, max_hours=24)
