"""One retraining job: train a LoRA adapter on a stored dataset, evaluate it against the champion,
publish it to the lake. ``python -m training --config FILE [--stage train|evaluate|all]``.

The config file (YAML or JSON) maps onto :class:`TrainJob`; ``lora`` onto
:class:`training.lora.LoraTrainConfig`. Stages:

* ``train`` — reads ``datasets/<id>/train.parquet`` and the images from the lake, trains with
  checkpoints under ``work_dir`` (a rerun after an interruption resumes from the last one), and
  uploads the PEFT adapter, ``training.json`` and a loss plot to ``adapters/<name>/<version>/``.
  The upload goes last, file by file, ``adapter_config.json`` at the very end: an adapter
  directory without it is incomplete and nothing loads it.
* ``evaluate`` — the candidate and the champion (its adapter, or the base when there is none)
  answer the golden set and the held-out labels; ``metrics.json`` (scores, and per-item results
  for the gate's paired test) and a model card (``README.md``) go next to the adapter.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.lora import LoraTrainConfig, add_lora

log = logging.getLogger("training")
ADAPTER_FILES_LAST = "adapter_config.json"


@dataclass
class TrainJob:
    dataset_id: str
    base_model: str
    version: str
    adapter_name: str = "vqa"
    lake_url: str | None = None  # default: VLOOP_LAKE_URL / the local lake
    champion_path: str | None = None  # lake prefix of the champion adapter; None = the base model
    work_dir: str = "var/training"
    checkpoint_every: int = 20
    eval_batch_size: int = 32
    max_new_tokens: int = 16
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)

    @property
    def lake_prefix(self) -> str:
        return f"adapters/{self.adapter_name}/{self.version}/"

    @property
    def local_dir(self) -> Path:
        return Path(self.work_dir) / self.adapter_name / self.version

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainJob":
        import yaml

        raw = yaml.safe_load(Path(path).read_text())
        lora = LoraTrainConfig(**raw.pop("lora", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(sorted(unknown))}")
        return cls(**raw, lora=lora)

    def to_dict(self) -> dict:
        return asdict(self)


def _lake(job: TrainJob):
    from vloop.store.lake import open_lake

    return open_lake(job.lake_url) if job.lake_url else open_lake()


class _Example:
    __slots__ = ("image", "question", "answer")

    def __init__(self, image, question, answer):
        self.image, self.question, self.answer = image, question, answer


def load_examples(lake, df) -> list[_Example]:
    from vloop.vlm.model import as_image

    return [_Example(as_image(lake.get_bytes(k)), q, a) for k, q, a in zip(df["image_key"], df["question"], df["answer"])]


def loss_plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def train(job: TrainJob) -> dict:
    import torch

    from vloop.learn.dataset import load_split, manifest
    from vloop.vlm.model import load_model
    from vloop.learn.sft import run_sft

    lake = _lake(job)
    published = _published(lake, job)
    if published is not None:  # a retry after the upload went through: reuse it
        return published
    data = load_split(lake, job.dataset_id, "train")
    ds = manifest(lake, job.dataset_id)
    examples = load_examples(lake, data)
    cfg = job.lora
    run_cfg = cfg.resolved()  # device, bf16, gradient checkpointing decided (CUDA: on; CPU: fp32, off)
    torch.manual_seed(cfg.seed)
    lm = load_model(job.base_model, device=run_cfg.device, dtype=run_cfg.dtype)
    model = add_lora(lm.model, cfg, gradient_checkpointing=run_cfg.gradient_checkpointing)
    out = job.local_dir
    out.mkdir(parents=True, exist_ok=True)
    log.info("training %s on %d examples of %s (%s, %s, gradient checkpointing %s)", job.lake_prefix,
             len(examples), job.dataset_id, lm.device, "bf16" if run_cfg.bf16 else "fp32",
             "on" if run_cfg.gradient_checkpointing else "off")
    result = run_sft(model, lm.processor, examples, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     warmup_steps=cfg.warmup_steps, seed=cfg.seed, log_every=cfg.log_every, log=log.info,
                     checkpoint=out / "checkpoint.pt", checkpoint_every=job.checkpoint_every,
                     autocast_dtype=run_cfg.autocast_dtype)
    adapter = out / "adapter"
    model.save_pretrained(adapter)
    summary = {"adapter": f"{job.adapter_name}@{job.version}", "base_model": str(job.base_model),
               "dataset_id": job.dataset_id, "dataset_sha256": ds["content_sha256"], "examples": len(examples),
               "config": job.to_dict(), "seconds": round(result.seconds, 2), "tokens": result.tokens,
               "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
               "final_loss": result.losses[-1], "losses": result.losses, "device": str(lm.device),
               "bf16": run_cfg.bf16, "gradient_checkpointing": run_cfg.gradient_checkpointing}
    (adapter / "training.json").write_text(json.dumps(summary, indent=2))
    loss_plot(result.losses, adapter / "loss.png")
    files = sorted(adapter.iterdir(), key=lambda p: p.name == ADAPTER_FILES_LAST)
    for f in files:  # adapter_config.json last: its presence means the upload is complete
        lake.put_bytes(job.lake_prefix + f.name, f.read_bytes())
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return {k: v for k, v in summary.items() if k != "losses"}


def _published(lake, job: TrainJob) -> dict | None:
    """The summary of this job's adapter if an earlier try of the same job already published it
    (the task was retried after its upload succeeded); None if nothing is published under the
    version; FileExistsError if another job's adapter holds it."""
    if not lake.exists(job.lake_prefix + ADAPTER_FILES_LAST):
        return None
    summary = lake.get_json(job.lake_prefix + "training.json")
    if summary.get("config") != json.loads(json.dumps(job.to_dict())):
        raise FileExistsError(f"{job.lake_prefix} is already published by another training job; pick a new version")
    log.info("%s is already published by an earlier try of this job: reusing it", job.lake_prefix)
    return {**{k: v for k, v in summary.items() if k != "losses"}, "reused": True}


def _with_adapter(lm, lake, prefix: str | None, cache: Path):
    """``lm`` with the adapter at lake ``prefix`` applied (the base itself when None)."""
    from peft import PeftModel

    from vloop.store.lake import fetch_files

    if not prefix:
        return lm
    local = fetch_files(lake, lake.list(prefix.rstrip("/") + "/"), cache / prefix.strip("/").replace("/", "_"))
    model = PeftModel.from_pretrained(lm.model, local)
    model.eval()
    return dataclasses.replace(lm, model=model)


def evaluate(job: TrainJob) -> dict:
    """Candidate vs champion on the golden set and the held-out labels, side by side.

    ``metrics["sets"][set][who]`` holds the overall, per-category and per-intent scores;
    ``metrics["paired"][set]`` the per-item exact match of both on the same items, aligned by
    ``example_id`` (``{"example_id": [...], "candidate_correct": [0/1...], "champion_correct":
    [...]}``), which the gate's paired test (:func:`vloop.learn.retrain.gate_decision`) needs."""
    import pandas as pd

    from vloop.learn.dataset import load_split
    from vloop.learn.evaluation import breakdown, exact_matches, predict
    from vloop.vlm.model import load_model

    lake = _lake(job)
    if not lake.exists(job.lake_prefix + ADAPTER_FILES_LAST):
        raise FileNotFoundError(f"no complete adapter at {job.lake_prefix}; run the train stage first")
    sets = {"golden": load_split(lake, job.dataset_id, "golden"), "heldout": load_split(lake, job.dataset_id, "heldout")}
    metrics: dict = {"candidate": f"{job.adapter_name}@{job.version}", "champion_path": job.champion_path,
                     "dataset_id": job.dataset_id, "sets": {}, "paired": {}}
    correct: dict = {}  # (set, who) -> {example_id: 0/1}
    cache = job.local_dir / "eval-cache"
    for who, prefix in (("candidate", job.lake_prefix), ("champion", job.champion_path)):
        lm = _with_adapter(load_model(job.base_model, device=job.lora.device), lake, prefix, cache)
        for name, df in sets.items():
            if not len(df):
                continue
            log.info("evaluating the %s on %s (%d examples)", who, name, len(df))
            preds = predict(lm, lake, df, batch_size=job.eval_batch_size, max_new_tokens=job.max_new_tokens,
                            log=log.info)
            metrics["sets"].setdefault(name, {})[who] = breakdown(pd.DataFrame({**df, "prediction": preds}))
            correct[name, who] = dict(zip(df["example_id"].astype(str), exact_matches(preds, df["answer"].tolist())))
    for name, df in sets.items():
        if (name, "candidate") in correct and (name, "champion") in correct:
            ids = [i for i in df["example_id"].astype(str) if i in correct[name, "candidate"]
                   and i in correct[name, "champion"]]
            metrics["paired"][name] = {"example_id": ids,
                                       "candidate_correct": [correct[name, "candidate"][i] for i in ids],
                                       "champion_correct": [correct[name, "champion"][i] for i in ids]}
    lake.put_json(job.lake_prefix + "metrics.json", metrics)
    lake.put_bytes(job.lake_prefix + "README.md", model_card(job, lake, metrics).encode(), "text/markdown")
    return metrics


def model_card(job: TrainJob, lake, metrics: dict) -> str:
    from vloop.learn.dataset import manifest

    ds = manifest(lake, job.dataset_id)
    training = json.loads(lake.get_bytes(job.lake_prefix + "training.json"))
    rows = []
    for name, by_who in metrics["sets"].items():
        for who, m in by_who.items():
            o = m["overall"]
            rows.append(f"| {name} | {who} | {o['n']} | {o['exact_match']:.3f} | {o['token_f1']:.3f} | "
                        f"{o['bleu']:.3f} | {o['rouge_l']:.3f} |")
    return f"""---
base_model: {job.base_model}
library_name: peft
tags: [lora, qwen3-vl, vloop]
---
# {job.adapter_name}@{job.version}

LoRA adapter for `{job.base_model}`, trained by vloop on {dt.date.today().isoformat()}.

- Dataset: `{job.dataset_id}` (sha256 `{ds['content_sha256'][:16]}…`): {ds['examples']['train']} training
  examples, {ds['examples']['heldout']} held-out labels, {ds['examples']['golden']} golden examples.
- LoRA: rank {job.lora.rank}, alpha {job.lora.alpha}, dropout {job.lora.dropout}, targets `{job.lora.target_modules}`.
- Training: {job.lora.steps} steps of {job.lora.batch_size}, lr {job.lora.lr}, seed {job.lora.seed};
  {training['seconds']} s, {training['tokens_per_s']} tokens/s on {training['device']}; final loss {training['final_loss']:.4f}.
- Champion compared against: `{job.champion_path or 'the base model'}`.

| set | model | n | exact match | token F1 | BLEU | ROUGE-L |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Per-category and per-intent figures: `metrics.json`. Loss curve: `loss.png`.
"""


def run(job: TrainJob, stage: str = "all") -> dict:
    t0 = time.perf_counter()
    out = {}
    if stage in ("train", "all"):
        out["train"] = train(job)
    if stage in ("evaluate", "all"):
        m = evaluate(job)
        out["evaluate"] = {s: {w: v["overall"] for w, v in by.items()} for s, by in m["sets"].items()}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
