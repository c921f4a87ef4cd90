"""The offline gate (vloop.learn.retrain.gate_decision): a paired test on the same golden items, not a
comparison of two averages; and the golden set it runs on is curated, never invented outside a
simulation (vloop.learn.dataset.ensure_golden)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vloop.learn.dataset import GOLDEN_KEY, GoldenSetMissing, ensure_golden
from vloop.learn.retrain import GateConfig, gate, gate_decision, mcnemar_exact_p, paired_difference_interval


def paired_metrics(cand, champ, categories=None, set_name="golden", paired=True) -> dict:
    """A ``metrics.json`` as training.job.evaluate writes it, from per-item 0/1 results."""
    cand, champ = [int(x) for x in cand], [int(x) for x in champ]
    n = len(cand)
    categories = categories or ["shoes"] * n

    def side(ok):
        by_cat = {}
        for cat in sorted(set(categories)):
            idx = [i for i, c in enumerate(categories) if c == cat]
            by_cat[cat] = {"n": len(idx), "exact_match": sum(ok[i] for i in idx) / len(idx)}
        return {"overall": {"n": n, "exact_match": sum(ok) / n}, "by_category": by_cat, "by_intent": {}}

    m = {"sets": {set_name: {"candidate": side(cand), "champion": side(champ)}}}
    if paired:
        m["paired"] = {set_name: {"example_id": [f"golden-{i}" for i in range(n)],
                                  "candidate_correct": cand, "champion_correct": champ}}
    return m


def from_table(a, b, c, d, **kw) -> dict:
    """Paired items: ``a`` both right, ``b`` only the candidate, ``c`` only the champion, ``d`` neither."""
    cand = [1] * a + [1] * b + [0] * c + [0] * d
    champ = [1] * a + [0] * b + [1] * c + [0] * d
    return paired_metrics(cand, champ, **kw)


def test_mcnemar_and_interval_against_references():
    from scipy.stats import binomtest

    for b, c in ((25, 16), (9, 0), (0, 0), (3, 12), (40, 20)):
        ref = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
        assert mcnemar_exact_p(b, c) == pytest.approx(ref, rel=1e-9)
    # Newcombe's square-and-add interval for paired data (1998, method 10), as in Fagerland,
    # Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8 (Cavo et al. 2012 data):
    # estimate -0.0621, 95% CI -0.1186 to -0.0046.
    lo, hi = paired_difference_interval(59, 6, 16, 80)
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)
    lo, hi = paired_difference_interval(15, 25, 16, 144)
    assert lo < 0.045 < hi
    lo2, hi2 = paired_difference_interval(150, 250, 160, 1440)
    assert hi2 - lo2 < hi - lo  # narrows with n
    lo, hi = paired_difference_interval(10, 5, 5, 10)
    assert lo == pytest.approx(-hi)


def test_gate_passes_a_clearly_better_candidate():
    # 0.30 vs 0.155 on 200 items: 31 items only the candidate answers, 2 only the champion.
    m = from_table(29, 31, 2, 138)
    d = gate_decision(m)
    assert d["passed"], d["reason"]
    assert (d["n"], d["b"], d["c"]) == (200, 31, 2) and d["p"] < 1e-6
    assert d["difference"] == pytest.approx(0.145) and d["interval"][0] > 0.08
    passed, reason = gate(m)  # the old two-value interface
    assert passed and "n=200" in reason and "b=31" in reason and "c=2" in reason and "p=" in reason
    assert "95% CI" in reason


def test_gate_fails_a_difference_inside_the_noise():
    # The incident: 0.200 vs 0.155 on 200 golden items, a difference of 9 items out of 41 that
    # disagree (25 for the candidate, 16 for the champion). Beats the margin, not the noise.
    m = from_table(15, 25, 16, 144)
    assert m["sets"]["golden"]["candidate"]["overall"]["exact_match"] == pytest.approx(0.200)
    assert m["sets"]["golden"]["champion"]["overall"]["exact_match"] == pytest.approx(0.155)
    d = gate_decision(m)
    assert not d["passed"] and "not significant" in d["reason"]
    assert (d["b"], d["c"], d["n"]) == (25, 16, 200) and 0.05 < d["p"] < 0.2
    assert d["interval"][0] < 0 < d["interval"][1]
    # The same averages from 9 items only the candidate gets right (and none the other way) pass.
    assert gate_decision(from_table(31, 9, 0, 160))["passed"]


def test_gate_keeps_the_margin_and_the_category_check():
    # Significant but below the margin: 5 more right out of 1000 items.
    d = gate_decision(from_table(200, 6, 1, 793), GateConfig(margin=0.02))
    assert not d["passed"] and "does not beat the champion" in d["reason"]
    # Significantly better overall, but one category collapses.
    cand = [1] * 40 + [1] * 40 + [0] * 20
    champ = [0] * 40 + [1] * 40 + [1] * 20
    cats = ["shoes"] * 80 + ["bags"] * 20
    d = gate_decision(paired_metrics(cand, champ, categories=cats))
    assert not d["passed"] and "regresses" in d["reason"] and "bags" in d["reason"]
    assert d["regressions"] and d["p"] < 0.05


def test_gate_fails_without_per_item_results():
    m = from_table(29, 31, 2, 138, paired=False)  # a metrics.json from before they were kept
    passed, reason = gate(m)
    assert not passed and "no per-item results" in reason
    assert gate({"sets": {}}) == (False, "no golden evaluation in the metrics")
    # The per-item results may also sit next to the scores (sets.<name>.paired).
    m = from_table(29, 31, 2, 138)
    m["sets"]["golden"]["paired"] = m.pop("paired")["golden"]
    assert gate(m)[0]


def test_gate_result_is_json():
    import json

    d = gate_decision(from_table(15, 25, 16, 144))
    assert json.loads(json.dumps(d)) == d
    assert {"passed", "reason", "p", "interval", "b", "c", "n"} <= set(d)


@pytest.mark.parametrize("accuracy,agreement", [(0.155, None), (0.5, None), (0.2, 0.9)])
def test_gate_false_pass_rate_of_equal_models(accuracy, agreement):
    """Two models equally good (same accuracy on every item's draw) on 200 items: the gate must
    pass at most alpha of them (+2 standard errors of the simulation). ``agreement``: the share of
    items where the candidate's verdict copies the champion's (correlated models, as a candidate
    fine-tuned from the champion is)."""
    rng = np.random.default_rng(20260101)
    runs, n, alpha = 1000, 200, 0.05
    cfg0 = GateConfig(margin=0.0, category_tolerance=1.0, alpha=alpha)  # the test alone
    passes = passes_default = passes_old = 0
    for _ in range(runs):
        champ = rng.random(n) < accuracy
        cand = rng.random(n) < accuracy
        if agreement is not None:
            copy = rng.random(n) < agreement
            cand = np.where(copy, champ, cand)
        m = paired_metrics(cand, champ)
        passes += gate_decision(m, cfg0)["passed"]
        passes_default += gate_decision(m)["passed"]
        passes_old += cand.mean() >= champ.mean() + 0.02  # the margin-only gate
    se = math.sqrt(alpha * (1 - alpha) / runs)
    assert passes / runs <= alpha + 2 * se, passes / runs
    assert passes_default <= passes
    print(f"accuracy {accuracy}, agreement {agreement}: false passes {passes / runs:.3f} (test alone), "
          f"{passes_default / runs:.3f} (default gate), {passes_old / runs:.3f} (margin-only gate)")


class _Sample:
    def __init__(self, i):
        from vloop.sim.synth import World

        self._s = World(7).sample(i)
        self.id, self.question, self.answer = f"s{i}", self._s.question, self._s.answer
        self.category, self.intent = self._s.category, self._s.intent

    def image_bytes(self):
        return self._s.image_bytes()


def test_ensure_golden_needs_a_curated_set_outside_a_simulation(local_lake, monkeypatch):
    monkeypatch.delenv("VLOOP_SIMULATION", raising=False)
    with pytest.raises(GoldenSetMissing, match="Production needs a curated golden") as e:
        ensure_golden(local_lake)
    assert GOLDEN_KEY in str(e.value) and "question" in str(e.value) and "ensure_golden(lake, samples=" in str(e.value)
    assert isinstance(e.value, ValueError) and not local_lake.exists(GOLDEN_KEY)
    # Simulation mode: the caller has to pass the synthetic set; nothing is generated here.
    with pytest.raises(GoldenSetMissing, match="golden_samples"):
        ensure_golden(local_lake, simulation=True)
    monkeypatch.setenv("VLOOP_SIMULATION", "1")
    with pytest.raises(GoldenSetMissing, match="golden_samples"):
        ensure_golden(local_lake)


def test_ensure_golden_writes_given_samples_once(local_lake, monkeypatch):
    monkeypatch.delenv("VLOOP_SIMULATION", raising=False)
    samples = [_Sample(i) for i in range(5)]
    golden = ensure_golden(local_lake, samples=samples)
    assert local_lake.exists(GOLDEN_KEY) and len(golden) == 5
    assert list(golden["question"]) == [s.question for s in samples]
    assert set(golden["split"]) == {"golden"} and golden["example_id"].str.startswith("golden-").all()
    assert all(local_lake.exists(k) for k in golden["image_key"])
    # From now on it is read back, whatever is passed.
    again = ensure_golden(local_lake, samples=[_Sample(9)])
    assert list(again["example_id"]) == list(golden["example_id"])


def test_simulation_golden_samples_are_the_fixed_synthetic_set():
    from vloop.sim.synth import GOLDEN_SEED, World, golden_samples

    a, b = golden_samples(3), World(GOLDEN_SEED).samples(3)
    assert [s.id for s in a] == [s.id for s in b]


def test_production_intent_of_matches_the_synthetic_worlds_questions():
    from vloop.learn.evaluation import intent_of
    from vloop.sim.synth import QUESTIONS, SUITABLE_QUESTIONS
    from vloop.sim.synth import intent_of as synth_intent_of

    questions = [q for qs in QUESTIONS.values() for q in qs]
    questions += [q for _, (_, by_lang) in SUITABLE_QUESTIONS.items() for qs in by_lang.values() for q in qs]
    assert all(intent_of(q) == synth_intent_of(q) for q in questions)
    assert intent_of("Is it waterproof?") == "other" and intent_of("这个多少钱?") == "other"
    assert intent_of("What colour are the laces?") == "colour" and intent_of("How many pockets?") == "count"
