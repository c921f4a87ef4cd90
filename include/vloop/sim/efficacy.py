"""Is the loop worth its cost? Its learning part, round after round, per strategy (a simulation).

What ``bench/loop_efficacy.py`` runs. No services: the synthetic world (:mod:`vloop.sim.synth`)
plays the users and the annotator, and everything between them is production code — mining
(:func:`vloop.curate.mining.mine`), selection (:func:`vloop.curate.selection.select`, with the category error
rates of :func:`vloop.curate.daily.category_error_rates`), grounding scores, the dataset builder
(:func:`vloop.learn.dataset.build_dataset`, on a local lake laid out as the daily DAG leaves it), LoRA
training (:func:`training.lora.train_lora`), the gate (:func:`vloop.learn.retrain.gate_decision` on
the golden set) and the evaluation metrics (:mod:`vloop.learn.evaluation`). A candidate that passes the
gate becomes the champion (the canary stage is assumed to promote it: its statistics are tested
elsewhere, and it would cost every strategy the same days).

Per seed, every strategy sees the same world, base model, questions, users and reactions'
random draws, and every labelling strategy spends the same budget:

* ``active`` — the production selection (priority by confidence, feedback, category error rate,
  grounding, plus its random audit share);
* ``random`` — the same number of items drawn uniformly from the same candidates;
* ``edits_only`` — no annotators: users' own edits and confident accepted answers
  (``use_user_edits``); some users' edits are wrong, as in the world;
* ``active+edits`` — both.

A day is ``requests_per_day`` colour questions. From round ``drift_round`` on, a product line the
base never saw (``new_line``, dresses) appears and grows (``drift_shares`` per day), and its
shoppers also ask what it is and how many there are — questions the base never learnt: the drift
scenario. Exact match is measured after every round on held-out questions of three slices: the
base's strong slice (the categories and colours it was trained on), the rest of the old lines
(weak), and the new line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

STRATEGIES = ("active", "random", "edits_only", "active+edits")
SEEN_CATEGORIES = ("shoes", "bags", "hats")  # the base's slice (vloop.sim.pretrain's defaults)
SEEN_COLOURS = ("red", "blue", "green", "black")
FIRST_DAY = dt.date(2030, 1, 1)  # simulated calendar: day index 0
EVAL_WORLD = 90_001  # held-out questions (the demo's evaluation world), + seed
USER_SECRET = "loop-efficacy-simulation"
# What shoppers ask about the old lines (colours: the base knows some) and about the new line
# (also what it is and how many: questions the base never learnt, so the new line starts weak).
NEW_LINE_INTENTS = ("colour", "category", "count")  # user keys are HMACs, as the gateway makes them


@dataclass
class EfficacyConfig:
    seeds: tuple[int, ...] = (1, 2, 3)  # seed 0 is the development seed: never reported
    budgets: tuple[int, ...] = (50, 100, 200)  # labels per round (split over its days)
    rounds: int = 4
    days_per_round: int = 2  # one retraining cycle, in simulated days
    requests_per_day: int = 250
    strategies: tuple[str, ...] = STRATEGIES
    new_line: str = "dresses"
    drift_round: int = 1  # the new line's first day is this round's first day
    drift_shares: tuple[float, ...] = (0.05, 0.10, 0.20)  # its share of traffic day by day (the last holds)
    degraded: float = 0.1
    users: int = 600
    no_reaction: float = 0.15  # the demo's shoppers (vloop.sim.demo_loop.LoopConfig)
    repeat: float = 0.10
    wrong_edit: float = 0.05
    annotator_error: float = 0.03
    eval_per_slice: int = 80
    epochs: float = 4.0  # LoRA steps = epochs over the training set, within [min_steps, max_steps]
    min_steps: int = 30
    max_steps: int = 160
    batch_size: int = 16
    fix_tolerance: float = 0.05  # "fixed": the new line's exact match within this of the old lines'
    dev: bool = False  # allow seed 0, the development seed (for tuning; never reported)

    def __post_init__(self):
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown:
            raise ValueError(f"unknown strategies {sorted(unknown)}; use {STRATEGIES}")
        if 0 in self.seeds and not self.dev:
            raise ValueError("seed 0 is the development seed (selection changes are tuned on it): report others")

    @property
    def days(self) -> int:
        return self.rounds * self.days_per_round

    @property
    def drift_day(self) -> int:
        return self.drift_round * self.days_per_round

    def new_line_share(self, day: int) -> float:
        if day < self.drift_day:
            return 0.0
        return self.drift_shares[min(day - self.drift_day, len(self.drift_shares) - 1)]


# -- the world's side: traffic, reactions, the annotator ---------------------------------------------
@dataclass
class Request:
    request_id: str
    sample: object  # vloop.sim.synth.Sample
    user: int
    at: dt.datetime
    r_react: float  # the reaction's random draws: the same for every strategy
    r_edit: float


def day_traffic(cfg: EfficacyConfig, seed: int, day: int) -> list[Request]:
    """The questions of simulated day ``day`` (the same for every strategy and budget)."""
    from vloop.sim.synth import CATEGORIES, World

    rng = random.Random(f"traffic|{seed}|{day}")
    world = World(seed * 7919 + day)
    old = tuple(c for c in CATEGORIES if c != cfg.new_line)
    share = cfg.new_line_share(day)
    out = []
    for k in range(cfg.requests_per_day):
        new = rng.random() < share
        s = world.sample(k, categories=(cfg.new_line,) if new else old, intents=NEW_LINE_INTENTS if new else ("colour",),
                         degraded=cfg.degraded)
        at = dt.datetime.combine(FIRST_DAY + dt.timedelta(days=day), dt.time(), dt.timezone.utc) + \
            dt.timedelta(seconds=rng.randrange(60, 86_000))
        rid = hashlib.sha256(f"{seed}|{day}|{k}".encode()).hexdigest()[:24]
        out.append(Request(rid, s, rng.randrange(cfg.users), at, rng.random(), rng.random()))
    return out


def reaction(cfg: EfficacyConfig, req: Request, right: bool) -> dict | None:
    """What the user does with the answer (the demo's shoppers): accept a right one; edit a wrong
    one with the truth (sometimes with a wrong "correction"), or ask again, or nothing."""
    if req.r_react < cfg.no_reaction:
        return None
    if right:
        return {"type": "accept"}
    if req.r_react < cfg.no_reaction + cfg.repeat:
        return {"type": "regenerate"}
    return {"type": "edit", "edited_text": "grey" if req.r_edit < cfg.wrong_edit else req.sample.answer}


def slice_of(sample, new_line: str) -> str:
    if sample.category == new_line:
        return "new"
    return "strong" if sample.category in SEEN_CATEGORIES and sample.colour in SEEN_COLOURS else "weak"


def eval_set(cfg: EfficacyConfig, seed: int) -> list:
    """Held-out colour questions, ``eval_per_slice`` of each slice (strong, weak, new)."""
    from vloop.sim.synth import World

    world, want = World(EVAL_WORLD + seed), {"strong": [], "weak": [], "new": []}
    i = 0
    while any(len(v) < cfg.eval_per_slice for v in want.values()):
        s = world.sample(i, intents=("colour",))
        if s.category == cfg.new_line:  # the new line is asked about as its shoppers ask
            s = world.sample(i, categories=(cfg.new_line,), intents=NEW_LINE_INTENTS)
        i += 1
        bucket = want[slice_of(s, cfg.new_line)]
        if len(bucket) < cfg.eval_per_slice:
            bucket.append(s)
    return want["strong"] + want["weak"] + want["new"]


# -- models --------------------------------------------------------------------------------------
class Models:
    """The base and the adapters trained so far; answers cached per (model, day) so that the
    rounds before any strategy differs are computed once for all of them."""

    def __init__(self, base_dir: Path):
        from vloop.vlm.model import load_model

        self.base_dir = Path(base_dir)
        self._lm = {"base": load_model(str(base_dir), device="cpu")}
        self._cache: dict = {}

    def lm(self, model_id: str):
        if model_id not in self._lm:
            from peft import PeftModel

            from vloop.vlm.model import load_model

            lm = load_model(str(self.base_dir), device="cpu")
            self._lm = {"base": self._lm["base"], model_id: dataclasses.replace(
                lm, model=PeftModel.from_pretrained(lm.model, model_id).eval())}  # keep one adapter loaded
        return self._lm[model_id]

    def answers(self, model_id: str, key, samples: list, *, grounding: bool = False) -> pd.DataFrame:
        """``answer``, ``confidence`` (and ``grounding``) of ``model_id`` for ``samples``."""
        ck = (model_id, key, grounding)
        if ck not in self._cache:
            from vloop.curate.grounding import grounding_scores
            from vloop.vlm.model import generate

            lm, rows = self.lm(model_id), []
            for s in range(0, len(samples), 64):
                chunk = samples[s:s + 64]
                gens = generate(lm, [x.image for x in chunk], [x.question for x in chunk], max_new_tokens=8)
                rows += [{"answer": g.text, "confidence": g.confidence.geo_mean_prob} for g in gens]
            df = pd.DataFrame(rows)
            if grounding:
                df["grounding"] = grounding_scores(lm, [x.image for x in samples], [x.question for x in samples],
                                                   df["answer"].tolist())
            self._cache[ck] = df
        return self._cache[ck]

    def forget(self, keep: set[str]) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k[0] in keep or k[0] == "base"}


# -- one run: a seed, a strategy, a budget ---------------------------------------------------------
def _right(answer: str, truth: str) -> bool:
    from vloop.vlm.model import normalise_answer

    return normalise_answer(answer) == normalise_answer(truth)


def _steps(cfg: EfficacyConfig, n_train: int) -> int:
    return int(min(cfg.max_steps, max(cfg.min_steps, math.ceil(cfg.epochs * n_train / cfg.batch_size))))


class Run:
    """The loop for one (seed, strategy, budget) on its own local lake."""

    def __init__(self, cfg: EfficacyConfig, seed: int, strategy: str, budget: int, models: Models,
                 work: Path, golden: list, evals: list, log: Callable[[str], None]):
        from vloop.learn.dataset import ensure_golden
        from vloop.store.lake import open_lake

        self.cfg, self.seed, self.strategy, self.budget = cfg, seed, strategy, budget
        self.models, self.work, self.golden, self.evals, self.log = models, work, golden, evals, log
        self.lake = open_lake((work / "lake").resolve().as_uri())
        ensure_golden(self.lake, samples=golden)
        self.champion = "base"
        self.labelled: set[str] = set()
        self.records: list[dict] = []
        self.picks: list[dict] = []
        self.traffic: list[str] = []  # a digest of each day's questions: the same for every strategy

    @property
    def labels_per_day(self) -> int:
        return 0 if self.strategy == "edits_only" else self.budget // self.cfg.days_per_round

    def live_day(self, day: int) -> None:
        """A day of traffic answered by the champion, laid out in the lake as feedback_daily
        leaves it (curated interactions, feedback, mined labels, confidence), then the day's
        selection labelled by the simulated annotator."""
        from vloop.curate import daily
        from vloop.curate.mining import mine
        from vloop.privacy import user_key
        from vloop.store.schema import FEEDBACK, INTERACTION

        cfg, lake, d = self.cfg, self.lake, FIRST_DAY + dt.timedelta(days=day)
        reqs = day_traffic(cfg, self.seed, day)
        self.traffic.append(hashlib.sha256("|".join(f"{r.request_id}:{r.sample.id}:{r.user}:{r.r_react:.6f}"
                                                    for r in reqs).encode()).hexdigest()[:16])
        ans = self.models.answers(self.champion, ("day", self.seed, day), [r.sample for r in reqs], grounding=True)
        rows, events, truth = [], [], {}
        keys = {}
        for r, a in zip(reqs, ans.itertuples(index=False)):
            stored = keys.get(r.sample.id) or lake.put_image(r.sample.image_bytes())
            keys[r.sample.id] = stored
            rows.append({"request_id": r.request_id, "ts": r.at, "user_key": user_key(f"u{r.user}", USER_SECRET),
                         "session_id": f"s{self.seed}-{day}-{r.user}", "category": r.sample.category,
                         "image_sha256": stored.sha256, "image_key": stored.key, "image_w": stored.width,
                         "image_h": stored.height, "question": r.sample.question, "answer": a.answer,
                         "token_logprobs": None, "confidence": a.confidence, "latency_ms": 50.0,
                         "base_model": "tiny-base", "adapter": None if self.champion == "base" else self.champion,
                         "arm": "champion", "status": "ok", "redactions": 0})
            ev = reaction(cfg, r, _right(a.answer, r.sample.answer))
            if ev:
                events.append({"event_id": r.request_id + "-fb", "request_id": r.request_id,
                               "ts": r.at + dt.timedelta(seconds=5 + int(r.r_edit * 60)),
                               "edited_text": ev.get("edited_text"), "type": ev["type"], "dwell_ms": None,
                               "rating": None})
            truth[r.request_id] = (r.sample.answer, a.answer, _right(a.answer, r.sample.answer))
        inter, fb = INTERACTION.to_table(rows), FEEDBACK.to_table(events)
        lake.write_parquet(daily.slice_key(daily.CURATED, d, 0, "interactions.parquet"), inter)
        lake.write_parquet(daily.slice_key(daily.CURATED, d, 0, "feedback.parquet"), fb)
        inter_df, fb_df = inter.to_pandas(), fb.to_pandas()
        mined = mine(inter_df, fb_df)
        daily.put_frame(lake, daily.slice_key(daily.CURATED, d, 0, "mined.parquet"), mined)
        daily.put_frame(lake, daily.slice_key(daily.CURATED, d, 0, "mined_counts.parquet"),
                        daily.mined_counts(mined.merge(inter_df[["request_id", "category"]], on="request_id")))
        conf = pd.DataFrame({"request_id": inter_df["request_id"], "confidence": ans["confidence"].to_numpy(),
                             "grounding": ans["grounding"].to_numpy()})
        daily.put_frame(lake, daily.slice_key(daily.CURATED, d, 0, "confidence.parquet"), conf)
        daily.put_frame(lake, daily.slice_key(daily.CURATED, d, 0, "image_quality.parquet"),
                        pd.DataFrame({"image_key": sorted({k.key for k in keys.values()}), "poor": False}))
        chosen = self.pick(d, inter_df.drop(columns=["confidence"]).merge(conf, on="request_id"), mined)
        self.annotate(d, chosen, truth, day)

    def pick(self, d: dt.date, cands: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
        from vloop.curate import daily
        from vloop.curate.selection import SelectionConfig, select, uniform_sample

        n = self.labels_per_day
        if not n:
            return cands.iloc[:0]
        if self.strategy in ("active", "active+edits"):
            return select(cands, mined, cfg=SelectionConfig(budget=n), already_labelled=self.labelled,
                          category_error_rate=daily.category_error_rates(self.lake, d), salt=d.isoformat())
        eligible = cands[~cands["request_id"].isin(self.labelled)]
        return uniform_sample(eligible, n, salt=f"random|{d}").assign(pick="random", why="random pick")

    def annotate(self, d: dt.date, chosen: pd.DataFrame, truth: dict, day: int) -> None:
        """The simulated annotator: a verdict against the truth (wrong with probability
        ``annotator_error``) and, for a wrong answer, the true one typed in."""
        from vloop.curate import daily
        from vloop.curate.labelstudio import LABELED_COLUMNS

        rng = random.Random(f"annotator|{self.seed}|{day}")
        rows = []
        for r in chosen.to_dict("records"):
            answer_true, model_answer, right = truth[r["request_id"]]
            flip = rng.random() < self.cfg.annotator_error
            verdict_right = right != flip
            rows.append({**{c: None for c in LABELED_COLUMNS}, "request_id": r["request_id"], "task_id": 0,
                         "annotation_id": 0, "image_key": r["image_key"], "question": r["question"],
                         "model_answer": model_answer, "verdict": "correct" if verdict_right else "wrong",
                         "corrected_answer": model_answer if verdict_right else answer_true,
                         "category": r["category"], "selected_on": d.isoformat(), "user_key": r["user_key"],
                         "confidence": r.get("confidence"), "lead_time_s": 10.0,
                         "created_at": pd.Timestamp(d, tz="UTC"), "updated_at": pd.Timestamp(d, tz="UTC")})
            self.picks.append({"day": day, "pick": r.get("pick", "priority"), "wrong": not right,
                               "slice": slice_of_key(r["category"], self.cfg.new_line)})
            self.labelled.add(r["request_id"])
        df = pd.DataFrame(rows, columns=LABELED_COLUMNS)
        daily.put_frame(self.lake, daily.key(daily.LABELED, d, daily.LABELED_FILE), df)

    def retrain(self, rnd: int) -> dict:
        """Dataset → LoRA → gate against the champion on the golden set; the champion moves if it
        passes."""
        from training.job import load_examples
        from training.lora import LoraTrainConfig, train_lora
        from vloop.learn.dataset import DatasetConfig, build_dataset, load_split
        from vloop.learn.evaluation import breakdown, exact_matches
        from vloop.learn.retrain import gate_decision

        cfg = self.cfg
        last = FIRST_DAY + dt.timedelta(days=(rnd + 1) * cfg.days_per_round - 1)
        out = {"round": rnd + 1, "labels": len(self.labelled)}
        try:
            ds = build_dataset(self.lake, DatasetConfig(until=last.isoformat(), seed=self.seed,
                                                        use_user_edits=self.strategy in ("edits_only", "active+edits")),
                               today=last)
        except ValueError as e:  # nothing to learn from
            return {**out, "trained": False, "why": str(e)}
        train = load_split(self.lake, ds["id"], "train")
        steps = _steps(cfg, len(train))
        adapter = self.work / f"adapter-r{rnd + 1}"
        t0 = time.perf_counter()
        train_lora(self.models.base_dir, load_examples(self.lake, train), adapter,
                   LoraTrainConfig(steps=steps, batch_size=cfg.batch_size, seed=self.seed, log_every=10 ** 9),
                   log=lambda _: None)
        out.update(trained=True, examples=len(train), by_source=_by_source(ds), steps=steps,
                   train_s=round(time.perf_counter() - t0, 1))
        gold = pd.DataFrame([{"example_id": s.id, "answer": s.answer, "category": s.category, "intent": s.intent}
                             for s in self.golden])
        metrics = {"sets": {"golden": {}}, "paired": {}}
        correct = {}
        for who, model_id in (("candidate", str(adapter)), ("champion", self.champion)):
            preds = self.models.answers(model_id, "golden", self.golden)["answer"].tolist()
            metrics["sets"]["golden"][who] = breakdown(gold.assign(prediction=preds))
            correct[who] = exact_matches(preds, gold["answer"].tolist())
        metrics["paired"]["golden"] = {"example_id": gold["example_id"].tolist(),
                                       "candidate_correct": correct["candidate"],
                                       "champion_correct": correct["champion"]}
        g = gate_decision(metrics)
        out.update(gate_passed=g["passed"], gate_candidate=g["candidate"], gate_champion=g["champion"], gate_p=g["p"],
                   gate_reason=g["reason"].split(";")[0])
        out["candidate_items"] = self.evaluate(str(adapter))  # what the data bought, promoted or not
        if g["passed"]:
            self.champion = str(adapter)
        self.models.forget({self.champion, str(adapter)})
        return out

    def evaluate(self, model_id: str | None = None) -> dict:
        """The champion's (or ``model_id``'s) per-item exact match on the held-out questions, by slice."""
        preds = self.models.answers(model_id or self.champion, ("eval", self.seed), self.evals)["answer"]
        right = [_right(p, s.answer) for p, s in zip(preds, self.evals)]
        return {"right": right, "slices": [slice_of(s, self.cfg.new_line) for s in self.evals]}

    def run(self) -> list[dict]:
        ev = self.evaluate()
        self.records.append({"round": 0, "labels": 0, "day": 0, **_slice_em(ev), "items": ev,
                             **_slice_em(ev, "cand_"), "candidate_items": ev})
        for rnd in range(self.cfg.rounds):
            t0 = time.perf_counter()
            for day in range(rnd * self.cfg.days_per_round, (rnd + 1) * self.cfg.days_per_round):
                self.live_day(day)
            t1 = time.perf_counter()
            info = self.retrain(rnd)
            t2 = time.perf_counter()
            ev = self.evaluate()
            info["seconds"] = {"days": round(t1 - t0, 1), "retrain": round(t2 - t1, 1),
                               "evaluate": round(time.perf_counter() - t2, 1)}
            cand = info.pop("candidate_items", None) or ev  # no candidate: the champion stays what there is
            rec = {**info, "day": (rnd + 1) * self.cfg.days_per_round, "champion": Path(self.champion).name,
                   **_slice_em(ev), "items": ev, **_slice_em(cand, "cand_"), "candidate_items": cand}
            self.records.append(rec)
            self.log(f"    round {rnd + 1}: labels {info['labels']}, gate "
                     f"{'passed' if info.get('gate_passed') else 'failed' if info.get('trained') else 'not run'}, "
                     f"exact match {rec['all']:.3f} (strong {rec['strong']:.3f}, weak {rec['weak']:.3f}, "
                     f"new {rec['new']:.3f}); candidate {rec['cand_all']:.3f} (new {rec['cand_new']:.3f}); seconds {info['seconds']}, training {info.get('train_s')} s")
        return self.records


def slice_of_key(category: str, new_line: str) -> str:
    return "new" if category == new_line else "old"


def _by_source(manifest: dict) -> dict:
    out: dict = {}
    for k, v in manifest["by_source"].items():
        split, source = k.strip("()").replace("'", "").split(", ")
        if split == "train":
            out[source] = out.get(source, 0) + v
    return out


def _slice_em(ev: dict, prefix: str = "") -> dict:
    right, slices = np.array(ev["right"], dtype=float), np.array(ev["slices"])
    out = {"all": float(right[slices != "new"].mean()) if (slices != "new").any() else float("nan"),
           "all_with_new": float(right.mean())}
    for s in ("strong", "weak", "new"):
        out[s] = float(right[slices == s].mean()) if (slices == s).any() else float("nan")
    return {prefix + k: v for k, v in out.items()}


# -- the experiment ------------------------------------------------------------------------------
def run_experiment(cfg: EfficacyConfig, base_dir: Path, *, log: Callable[[str], None] = print,
                   work: Path | None = None) -> dict:
    """Every (seed, strategy, budget) run; ``edits_only`` spends no labels, so it runs once per
    seed. Returns the raw records and the summary (:func:`summarise`)."""
    from vloop.sim.synth import GOLDEN_SEED, World

    golden = World(GOLDEN_SEED).samples(200, intents=("colour",))
    work = Path(work or tempfile.mkdtemp(prefix="loop-efficacy-"))
    runs, t0 = [], time.perf_counter()
    plan = [(seed, s, b) for seed in cfg.seeds for s in cfg.strategies
            for b in ((0,) if s == "edits_only" else cfg.budgets)]
    for i, (seed, strategy, budget) in enumerate(plan):
        if i == 0 or plan[i - 1][0] != seed:
            models = Models(base_dir)  # a fresh cache per seed (bounded memory)
            evals = eval_set(cfg, seed)
        log(f"[{i + 1}/{len(plan)}] seed {seed} {strategy} budget {budget}/round")
        d = work / f"s{seed}-{strategy.replace('+', '_')}-b{budget}"
        run = Run(cfg, seed, strategy, budget, models, d, golden, evals, log)
        runs.append({"seed": seed, "strategy": strategy, "budget": budget, "records": run.run(), "picks": run.picks,
                     "traffic": run.traffic})
        el = time.perf_counter() - t0
        log(f"    done in {el / 60:.1f} min so far; eta {(len(plan) - i - 1) * el / (i + 1) / 60:.1f} min")
        shutil.rmtree(d, ignore_errors=True)
    return {"config": asdict(cfg), "runs": runs, "summary": summarise(cfg, runs),
            "seconds": round(time.perf_counter() - t0, 1)}


# -- the figures ---------------------------------------------------------------------------------
def bootstrap_interval(item_lists: list[list[bool]], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean exact match across seeds and items: seeds resampled, then items
    within each resampled seed (a hierarchical bootstrap: both the training runs' and the
    evaluation items' variation count)."""
    rng = np.random.default_rng(seed)
    arrs = [np.asarray(x, dtype=float) for x in item_lists if len(x)]
    if not arrs:
        return float("nan"), float("nan")
    means = np.empty(reps)
    for i in range(reps):
        pick = rng.integers(0, len(arrs), len(arrs))
        means[i] = np.mean([arrs[j][rng.integers(0, len(arrs[j]), len(arrs[j]))].mean() for j in pick])
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def curve_table(cfg: EfficacyConfig, runs: list[dict]) -> pd.DataFrame:
    """One row per (strategy, budget, round): labels spent, exact match per slice (mean over
    seeds) with 95% intervals, gate passes."""
    rows = []
    keys = sorted({(r["strategy"], r["budget"]) for r in runs}, key=lambda k: (STRATEGIES.index(k[0]), k[1]))
    for strategy, budget in keys:
        group = [r for r in runs if r["strategy"] == strategy and r["budget"] == budget]
        for rnd in range(cfg.rounds + 1):
            recs = [r["records"][rnd] for r in group]
            row = {"strategy": strategy, "budget": budget, "round": rnd, "day": recs[0]["day"],
                   "labels": int(np.mean([x["labels"] for x in recs])), "seeds": len(recs),
                   "gate_passed": sum(bool(x.get("gate_passed")) for x in recs)}
            for who, prefix in (("items", ""), ("candidate_items", "cand_")):
                for sl in ("all", "strong", "weak", "new"):
                    items = [[ok for ok, s in zip(x[who]["right"], x[who]["slices"])
                              if (s != "new" if sl == "all" else s == sl)] for x in recs]
                    row[prefix + sl] = float(np.mean([np.mean(i) for i in items if i]))
                    row[prefix + sl + "_lo"], row[prefix + sl + "_hi"] = bootstrap_interval(items)
            rows.append(row)
    return pd.DataFrame(rows)


def labels_to_reach(curve: pd.DataFrame, target: float, column: str = "all") -> float:
    """Labels a strategy's budget curve (exact match against labels spent, every budget and round
    pooled, its upper envelope) needs to reach ``target``, interpolated linearly; inf if never."""
    pts = curve.groupby("labels")[column].mean().sort_index()
    x, y = pts.index.to_numpy(dtype=float), np.maximum.accumulate(pts.to_numpy())
    if y[0] >= target:
        return float(x[0])
    for i in range(1, len(x)):
        if y[i] >= target:
            return float(x[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))
    return float("inf")


def time_to_fix(cfg: EfficacyConfig, records: list[dict]) -> float:
    """Simulated days from the new line's first day until the champion's exact match on it is
    within ``fix_tolerance`` of the old lines' (inf: not within the run)."""
    for rec in records:
        if rec["day"] > cfg.drift_day and rec["new"] >= rec["all"] - cfg.fix_tolerance:
            return float(rec["day"] - cfg.drift_day)
    return float("inf")


def summarise(cfg: EfficacyConfig, runs: list[dict]) -> dict:
    curve = curve_table(cfg, runs)
    final = curve[curve["round"] == cfg.rounds].set_index(["strategy", "budget"])
    base = curve[curve["round"] == 0]
    out: dict = {"curve": curve.to_dict("records"), "per_budget": {}}
    active = curve[curve["strategy"] == "active"]
    for b in cfg.budgets:
        row: dict = {}
        for s in cfg.strategies:
            k = (s, 0 if s == "edits_only" else b)
            if k in final.index:
                row[f"{s}_final"] = float(final.loc[k, "all"])
                row[f"{s}_final_interval"] = [float(final.loc[k, "all_lo"]), float(final.loc[k, "all_hi"])]
                row[f"{s}_strong_change"] = float(final.loc[k, "strong"] - base["strong"].mean())
        if ("random", b) in final.index and len(active):
            # The champions (what users get, through the gate), and the candidates (what the
            # labels bought, promoted or not: the gate's pass/fail luck left out).
            spent = cfg.rounds * b
            for col, name in (("all", "label_efficiency"), ("cand_all", "label_efficiency_candidates")):
                need = labels_to_reach(pd.concat([active, base.iloc[:1].assign(labels=0)]), final.loc[("random", b), col],
                                       col)
                row[name.replace("label_efficiency", "active_labels_to_random_final")] = need
                row[name] = need / spent
        out["per_budget"][str(b)] = row
    for name in ("label_efficiency", "label_efficiency_candidates"):
        eff = [r[name] for r in out["per_budget"].values() if name in r]
        out[name] = max(eff) if eff else float("nan")  # the worst budget: the goal is "at every budget"
    fix: dict = {}
    for r in runs:
        fix.setdefault(r["strategy"], {}).setdefault(str(r["budget"]), []).append(time_to_fix(cfg, r["records"]))
    out["time_to_fix_days"] = fix
    picks = pd.DataFrame([{**p, "strategy": r["strategy"], "budget": r["budget"]} for r in runs for p in r["picks"]])
    if len(picks):
        out["picks_wrong_share"] = {f"{s}/{k}": {"n": int(len(g)), "wrong": float(g["wrong"].mean())}
                                    for (s, k), g in picks.groupby(["strategy", "pick"])}
    return out


def result_figures(cfg: EfficacyConfig, summary: dict) -> dict:
    """The RESULT line's figures: finals at the middle budget, efficiency at the worst budget,
    time to fix of the production selection (the slowest seed, at the middle budget)."""
    mid = str(cfg.budgets[len(cfg.budgets) // 2])
    row = summary["per_budget"][mid]
    fix = summary["time_to_fix_days"].get("active", {}).get(mid, [float("nan")])
    return {"label_efficiency": summary["label_efficiency"],
            "label_efficiency_candidates": summary["label_efficiency_candidates"], "active_final": row.get("active_final"),
            "random_final": row.get("random_final"), "edits_only_final": row.get("edits_only_final"),
            "active_edits_final": row.get("active+edits_final"), "time_to_fix_days": max(fix),
            "budget": int(mid), "seeds": len(cfg.seeds), "rounds": cfg.rounds}


COLOURS = {"active": "tab:blue", "random": "tab:orange", "edits_only": "tab:green", "active+edits": "tab:purple"}


def plots(cfg: EfficacyConfig, summary: dict, out_dir: Path) -> list[Path]:
    """``efficacy_curve.png`` (exact match against labels per strategy, a panel per budget, the
    strong slice below) and ``efficacy_drift.png`` (the new line's exact match per day)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = pd.DataFrame(summary["curve"])
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = len(cfg.budgets)
    fig, axes = plt.subplots(2, nb, figsize=(4.2 * nb, 6.4), squeeze=False, sharey="row")
    for j, b in enumerate(cfg.budgets):
        for i, sl in enumerate(("all", "strong")):
            ax = axes[i][j]
            for s in cfg.strategies:
                g = curve[(curve["strategy"] == s) & (curve["budget"] == (0 if s == "edits_only" else b))]
                if not len(g):
                    continue
                x = g["round"] * b  # labels the labelling strategies spent; edits_only spends none
                ax.plot(x, g[sl], marker="o", color=COLOURS[s], label=s)
                ax.fill_between(x, g[sl + "_lo"], g[sl + "_hi"], color=COLOURS[s], alpha=0.15)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{b} labels/round: {'old lines' if sl == 'all' else 'base strong slice'}", fontsize=9)
            ax.set_xlabel("labels spent (edits_only: none; same rounds)", fontsize=8)
            if j == 0:
                ax.set_ylabel("held-out exact match")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"exact match per round, mean of {len(cfg.seeds)} seed(s), 95% interval over seeds and items",
                 fontsize=10)
    fig.tight_layout()
    curve_png = out_dir / "efficacy_curve.png"
    fig.savefig(curve_png, dpi=90)
    plt.close(fig)
    mid = cfg.budgets[len(cfg.budgets) // 2]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for s in cfg.strategies:
        g = curve[(curve["strategy"] == s) & (curve["budget"] == (0 if s == "edits_only" else mid))]
        if len(g):
            ax.plot(g["day"], g["new"], marker="o", color=COLOURS[s], label=s)
            ax.fill_between(g["day"], g["new_lo"], g["new_hi"], color=COLOURS[s], alpha=0.15)
    ax.axvline(cfg.drift_day, color="grey", ls="--")
    ax.text(cfg.drift_day, 0.02, f" {cfg.new_line} appear ({cfg.drift_shares[0]:.0%} of traffic)", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("simulated day (the champion after each retraining)")
    ax.set_ylabel(f"exact match on {cfg.new_line}")
    ax.set_title(f"a new product line: {mid} labels/round", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    drift_png = out_dir / "efficacy_drift.png"
    fig.savefig(drift_png, dpi=90)
    plt.close(fig)
    return [curve_png, drift_png]
