"""The demo's loop report (vloop.sim.demo_loop.write_report): its rounds table shows the gate's
figures and the training data per source as figures, one per cell (vloop.curate.report.round_rows),
not the dicts they come in."""

from __future__ import annotations

import re

import pandas as pd

from tests.test_gate import from_table
from vloop.curate.report import gate_cells, round_rows, source_counts
from vloop.learn.retrain import gate_decision

GATE_KEYS = ("n", "b", "c", "candidate", "champion", "difference", "interval", "p")


def round_record(rnd: int, decision: dict, sources: dict[tuple[str, str], int], outcome: str) -> dict:
    """A round as the demo records it (demo_loop._round_info): the registry's gate figures and the
    dataset manifest's counts, in the shapes those write them."""
    df = pd.DataFrame([{"split": split, "source": src} for (split, src), n in sources.items() for _ in range(n)])
    by_source = {str(k): int(v) for k, v in df.groupby(["split", "source"]).size().items()}  # as build_dataset
    figures = {k: x for k, x in decision.items() if k != "reason"}  # as retrain_biweekly records the gate
    return {"round": rnd, "ref": f"vqa@{rnd}", "gate_passed": figures["passed"], "gate_reason": decision["reason"],
            "gate": {k: figures.get(k) for k in GATE_KEYS}, "train_seconds": 41.25,
            "examples": {"train": int((df["split"] == "train").sum()), "heldout": int((df["split"] == "heldout").sum()),
                         "golden": 200},
            "by_source": by_source, "outcome": outcome}


PASSED = gate_decision(from_table(120, 30, 4, 46))  # 200 items: 0.750 vs 0.620
FAILED = gate_decision(from_table(150, 10, 4, 36))  # +0.030 beats the margin, but within the noise
ROUNDS = [
    round_record(1, PASSED, {("train", "label_corrected"): 20, ("heldout", "label_corrected"): 3,
                             ("train", "user_edit"): 35}, "promoted"),
    round_record(2, FAILED, {("train", "label_confirmed"): 12, ("train", "user_edit"): 8}, "not deployed"),
    {"round": 3, "outcome": "not deployed"},  # too few new labels: no dataset, no gate
]


def test_source_counts_sum_the_splits_per_source():
    assert source_counts(ROUNDS[0]["by_source"]) == {"label_corrected": 23, "user_edit": 35}
    assert source_counts(None) == {} and source_counts({"replay": 4}) == {"replay": 4}


def test_gate_cells_are_figures():
    cells = gate_cells(ROUNDS[0]["gate"] | {"passed": True}, PASSED["reason"])
    assert cells["gate items"] == 200
    assert cells["candidate EM"] == 0.75 and cells["champion EM"] == 0.62
    lo, hi = PASSED["interval"]
    assert cells["difference (95% CI)"] == f"+0.130 ({lo:+.3f} to {hi:+.3f})"
    assert cells["only candidate / only champion right"] == "30 / 4"
    assert cells["p (McNemar)"] == f"{PASSED['p']:.3g}" and PASSED["p"] < 0.05
    assert cells["gate"] == "passed"
    failed = gate_cells(ROUNDS[1]["gate"] | {"passed": False}, FAILED["reason"])
    assert failed["gate"].startswith("not significant") and ";" not in failed["gate"]
    assert set(gate_cells(None).values()) == {None}


def test_round_rows_flatten_the_dicts_into_columns():
    df = round_rows(ROUNDS)
    assert list(df.columns[:2]) == ["round", "ref"] and set(df.columns[-2:]) == {"outcome", "train_seconds"}
    assert df.loc[0, "from user_edit"] == 35 and df.loc[1, "from label_confirmed"] == 12
    assert df.loc[0, "train examples"] == 55 and df.loc[0, "heldout examples"] == 3
    assert df.loc[1, "gate"].startswith("not significant") and df.loc[0, "gate"] == "passed"
    assert pd.isna(df.loc[2, "candidate EM"]) and pd.isna(df.loc[2, "from user_edit"])
    for v in df.to_numpy().ravel():
        assert "{" not in str(v) and "[" not in str(v), v


def test_the_loop_reports_rounds_table_shows_figures(local_lake):
    from vloop.sim.demo_loop import LoopConfig, Timeline, write_report

    tl = Timeline(rounds=ROUNDS, steps=[{"step": "services up", "seconds": 3.2}])
    rates = [{"day": d, "phase": "labelling", "arm": "all", "model": "base", "requests": 500, "acceptance": a,
              "acceptance_lo": a - 0.04, "acceptance_hi": a + 0.04, "edit_rate": 1 - a}
             for d, a in (("2026-11-04", 0.61), ("2026-11-05", 0.74))]
    evals = [{"round": 0, "exact_match": 0.62, "seen": 0.7, "unseen": 0.3},
             {"round": 1, "exact_match": 0.75, "seen": 0.8, "unseen": 0.55}]
    key = write_report(local_lake, LoopConfig(rounds=3), tl, rates, evals, rates[0], rates[1], 12.5)
    page = local_lake.get_bytes(key).decode()
    rounds = re.search(r"<h2>Rounds: data, gate, outcome, cost</h2>(.*?)<h2>", page, re.S).group(1)
    cells = re.findall(r"<td>(.*?)</td>", rounds)
    headers = re.findall(r"<th>(.*?)</th>", rounds)
    assert cells and not any("{" in c or "[" in c or "NA" in c or "nan" in c for c in cells), cells
    assert cells.count("–") >= 10  # round 3 got no dataset and no gate: empty cells, not NaN
    for h in ("candidate EM", "champion EM", "difference (95% CI)", "p (McNemar)", "gate", "from user_edit",
              "from label_corrected", "train examples"):
        assert h in headers, h
    lo, hi = PASSED["interval"]
    for figure in ("0.750", "0.620", f"+0.130 ({lo:+.3f} to {hi:+.3f})", "30 / 4", "passed", "promoted", "35", "23"):
        assert figure in cells, figure
    assert "vqa@1" in cells and "gate_reason" not in rounds and "by_source" not in rounds
