#!/usr/bin/env python
"""Is the loop worth its cost? Active selection against random labels, users' edits instead of
annotators, and the days until a new product line is answered well (a simulation).

The loop's learning part round after round through the production code (selection, dataset,
LoRA training, gate, evaluation: see ``vloop.sim.efficacy``), for the strategies ``active``,
``random``, ``edits_only`` and ``active+edits`` on identical traffic and budgets, several label
budgets per round and several seeds. Prints a line per round and run, a table per budget, and
writes ``loop_efficacy.json`` and two plots to ``--out``; with ``--report`` also into the lake
(``reports/efficacy/``), where the loop report shows them.

    python bench/loop_efficacy.py              # seeds 1-3, budgets 50/100/200, 4 rounds
    python bench/loop_efficacy.py --quick      # 1 seed, budgets 40/120, 4 rounds, smaller days (<= 10 min)
    python bench/loop_efficacy.py --quick --seed 2

Seed 0 is the development seed: selection changes are tuned on it, so it is never reported.
The goals (a miss is a finding, not a failure): ``label_efficiency`` <= 0.5 (active reaches
random's final exact match with at most half the labels, at every budget), time to fix a new
product line <= one retraining cycle (``days_per_round`` days) after it reaches 5% of traffic,
``active+edits`` above ``active`` at the smallest budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path


def main(argv=None) -> dict:
    from vloop.sim.efficacy import STRATEGIES, EfficacyConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, two budgets, smaller days (<= 10 min)")
    ap.add_argument("--seed", type=int, action="append", help="a seed to run (repeatable; 0 is the dev seed)")
    ap.add_argument("--budgets", help="labels per round, comma-separated")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--model", help="the base model directory (default: the demo's, built on first use)")
    ap.add_argument("--out", default="var/bench/loop_efficacy", help="where the JSON and the plots go")
    ap.add_argument("--report", action="store_true", help="also write the figures to the lake (VLOOP_LAKE_URL)")
    ap.add_argument("--dev", action="store_true", help="allow seed 0 (tuning only; never report it)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices
    warnings.filterwarnings("ignore", category=UserWarning)
    kw = dict(seeds=(1,), budgets=(40, 120), rounds=4, days_per_round=2, requests_per_day=120,
              eval_per_slice=50) if args.quick else {}
    if args.seed:
        kw["seeds"] = tuple(args.seed)
    if args.budgets:
        kw["budgets"] = tuple(int(b) for b in args.budgets.split(","))
    if args.rounds:
        kw["rounds"] = args.rounds
    kw["strategies"] = tuple(s for s in args.strategies.split(",") if s)
    cfg = EfficacyConfig(**kw, dev=args.dev)
    return run(cfg, args.model, Path(args.out), report=args.report)


def run(cfg, model: str | None, out: Path, *, report: bool = False) -> dict:
    from vloop.store.config import load_settings
    from vloop.sim.demo_loop import ensure_base_model
    from vloop.sim.efficacy import plots, result_figures, run_experiment

    t0 = time.perf_counter()
    base = Path(model) if model else ensure_base_model(Path(load_settings().home), log=print)
    print(f"base model {base}; seeds {list(cfg.seeds)}, budgets {list(cfg.budgets)} labels/round, "
          f"{cfg.rounds} rounds of {cfg.days_per_round} days x {cfg.requests_per_day} requests; "
          f"strategies {', '.join(cfg.strategies)}; {cfg.new_line} appear on day {cfg.drift_day}", flush=True)
    res = run_experiment(cfg, base, log=lambda s: print(s, flush=True))
    summary = res["summary"]
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(cfg, summary, out)
    slim = {**res, "runs": [{k: v for k, v in r.items() if k != "records"}
                            | {"records": [{k: v for k, v in x.items() if k != "items"} for x in r["records"]]}
                            for r in res["runs"]]}
    (out / "loop_efficacy.json").write_text(json.dumps(slim, indent=1, default=float))
    print_tables(cfg, summary)
    if report:
        from vloop.store.lake import open_lake

        lake = open_lake()
        for p in pngs:
            lake.put_bytes(f"reports/efficacy/{p.name}", p.read_bytes(), "image/png")
        lake.put_json("reports/efficacy/latest.json", {"figures": result_figures(cfg, summary),
                                                       "summary": summary, "config": res["config"]})
        print(f"written to {lake.url} reports/efficacy/ (the loop report shows it)")
    fig = result_figures(cfg, summary)
    print(f"figures and plots in {out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    print("RESULT " + " ".join(f"{k}={_fmt(v)}" for k, v in fig.items()), flush=True)
    return {"summary": summary, "figures": fig, "seconds": res["seconds"]}


def print_tables(cfg, summary) -> None:
    import pandas as pd

    curve = pd.DataFrame(summary["curve"])
    cols = ["strategy", "budget", "round", "labels", "all", "all_lo", "all_hi", "strong", "weak", "new", "gate_passed"]
    with pd.option_context("display.width", 160, "display.max_rows", 200, "display.float_format", "{:.3f}".format):
        print(curve[cols].to_string(index=False))
    for b, row in summary["per_budget"].items():
        print(f"budget {b}/round: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                                                if not isinstance(v, list)))
    print("time to fix (days, per seed): " + "; ".join(
        f"{s} {b}: {v}" for s, by in summary["time_to_fix_days"].items() for b, v in by.items()))
    for k, v in summary.get("picks_wrong_share", {}).items():
        print(f"picked items answered wrong, {k}: {v['wrong']:.3f} of {v['n']}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.3f}"
    return str(v)


if __name__ == "__main__":
    main(sys.argv[1:])
