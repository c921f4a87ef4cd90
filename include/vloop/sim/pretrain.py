"""Turn the random tiny Qwen3-VL into a mediocre champion (``vloop pretrain-base``).

Full fine-tuning on the CPU for a couple of minutes on a deliberately partial slice of the
synthetic world (by default: colour questions about red, blue, green and black shoes, bags and
hats), so the base is right on what it saw and wrong on the rest (white and yellow, other
questions) — the gap the feedback loop exists to close. Afterwards it
measures exact-match accuracy per intent and category on held-out samples of the whole world
(the trained intents over every category and colour, and separately the intents it never saw),
and how well confidence separates right from wrong answers (AUROC), and saves it all as
``eval.json`` beside the weights.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from vloop.sim.synth import CATEGORIES, INTENTS, World


@dataclass
class PretrainConfig:
    seed: int = 0
    # What the base gets to see: colour questions about red, blue, green and black shoes, bags
    # and hats. White and yellow, dresses and shirts, and the other intents are left for the
    # feedback loop to teach.
    categories: tuple[str, ...] = ("shoes", "bags", "hats")
    colours: tuple[str, ...] = ("red", "blue", "green", "black")
    intents: tuple[str, ...] = ("colour",)
    train_samples: int = 3000
    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 10
    eval_samples: int = 400  # held out: the trained intents over the whole world
    other_eval_samples: int = 120  # held out: the intents the base never saw
    log_every: int = 10


@dataclass
class EvalReport:
    n: int
    exact_match: float
    by_intent: dict[str, float]
    by_category: dict[str, float]
    by_seen: dict[str, float]
    confidence_auroc: float
    mean_confidence_right: float
    mean_confidence_wrong: float
    examples: list[dict] = field(default_factory=list)


def evaluate(lm, samples, *, seen=lambda sample: True, batch_size: int = 64, max_new_tokens: int = 8) -> EvalReport:
    """Greedy answers on ``samples``: exact match by intent and category, confidence AUROC."""
    from vloop.vlm.model import auroc, generate, normalise_answer

    rows = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s:s + batch_size]
        gens = generate(lm, [x.image for x in chunk], [x.question for x in chunk], max_new_tokens=max_new_tokens)
        for x, g in zip(chunk, gens):
            rows.append({"id": x.id, "question": x.question, "answer": x.answer, "predicted": g.text,
                         "right": normalise_answer(g.text) == normalise_answer(x.answer),
                         "confidence": g.confidence.geo_mean_prob, "intent": x.intent,
                         "category": x.category, "seen": bool(seen(x))})

    def acc(key):
        groups = defaultdict(list)
        for r in rows:
            groups[str(r[key])].append(r["right"])
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    right = [r["confidence"] for r in rows if r["right"]]
    wrong = [r["confidence"] for r in rows if not r["right"]]
    return EvalReport(
        n=len(rows), exact_match=sum(r["right"] for r in rows) / max(1, len(rows)),
        by_intent=acc("intent"), by_category=acc("category"),
        by_seen={("seen" if k == "True" else "unseen"): v for k, v in acc("seen").items()},
        confidence_auroc=auroc([r["confidence"] for r in rows], [r["right"] for r in rows]),
        mean_confidence_right=sum(right) / len(right) if right else float("nan"),
        mean_confidence_wrong=sum(wrong) / len(wrong) if wrong else float("nan"),
        examples=rows[:20])


def pretrain_base(model_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig | None = None,
                  log: Callable[[str], None] = print) -> EvalReport:
    """Fully fine-tune the model in ``model_dir`` on the partial slice; save it with its eval to ``out_dir``."""
    import torch

    from vloop.vlm.model import load_model
    from vloop.learn.sft import run_sft

    cfg = cfg or PretrainConfig()
    torch.manual_seed(cfg.seed)
    lm = load_model(model_dir, device="cpu")
    world = World(cfg.seed)
    train = world.samples(cfg.train_samples, categories=cfg.categories, intents=cfg.intents,
                          colours=cfg.colours)
    # Held out (another seed of the world): the trained intents over every category and colour,
    # and separately the intents the base never saw.
    held_out = World(cfg.seed + 10_000).samples(cfg.eval_samples, intents=cfg.intents)
    other_intents = tuple(i for i in INTENTS if i not in cfg.intents)
    other = World(cfg.seed + 20_000).samples(cfg.other_eval_samples, intents=other_intents) if other_intents else []
    log(f"pretraining {model_dir} on {len(train)} {'/'.join(cfg.intents)} questions about "
        f"{', '.join(cfg.categories)} "
        f"for {cfg.steps} steps of {cfg.batch_size}")

    result = run_sft(lm.model, lm.processor, train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     warmup_steps=cfg.warmup_steps, seed=cfg.seed, weight_decay=0.01,
                     log_every=cfg.log_every, log=log)
    losses, train_s = result.losses, result.seconds

    def seen(x):
        return x.category in cfg.categories and x.intent in cfg.intents and x.colour in cfg.colours

    report = evaluate(lm, held_out, seen=seen)
    other_report = evaluate(lm, other, seen=seen) if other else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out)
    lm.processor.save_pretrained(out)
    (out / "eval.json").write_text(json.dumps({
        "config": asdict(cfg), "train_seconds": round(train_s, 1), "final_loss": losses[-1],
        "losses": losses, "held_out": asdict(report),
        "other_intents": asdict(other_report) if other_report else None}, indent=2, ensure_ascii=False))
    log(format_report(report))
    if other_report:
        log(f"intents it never saw ({', '.join(other_intents)}): exact match {other_report.exact_match:.1%} "
            f"on {other_report.n} samples")
    return report


def format_report(r: EvalReport) -> str:
    lines = [f"held-out exact match {r.exact_match:.1%} on {r.n} samples "
             f"(on the slice it was trained on {r.by_seen.get('seen', float('nan')):.1%}, "
             f"elsewhere {r.by_seen.get('unseen', float('nan')):.1%})",
             "  by intent:   " + ", ".join(f"{k} {v:.0%}" for k, v in r.by_intent.items()),
             "  by category: " + ", ".join(f"{k} {r.by_category.get(k, float('nan')):.0%}" for k in CATEGORIES),
             f"  confidence AUROC (right vs wrong) {r.confidence_auroc:.3f}; mean confidence "
             f"right {r.mean_confidence_right:.2f}, wrong {r.mean_confidence_wrong:.2f}"]
    return "\n".join(lines)
