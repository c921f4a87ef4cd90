"""LoRA fine-tuning of a Qwen3-VL on (image, question, answer) samples with PEFT.

This is the core training step: chat-format batches from :func:`vloop.model.encode` (loss on the
answer tokens only), LoRA on the language model's attention and MLP projections, the vision tower
frozen (vLLM applies LoRA to the language model), AdamW with warm-up and cosine decay, seeded,
progress logged with loss and tokens/s. The output is a standard PEFT adapter directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

# The language model's projections; the regex keeps LoRA out of the vision tower.
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class LoraTrainConfig:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = LM_TARGETS
    steps: int = 60
    batch_size: int = 16
    lr: float = 5e-3
    warmup_steps: int = 5
    seed: int = 0
    log_every: int = 10
    extra: dict = field(default_factory=dict)


def add_lora(model, cfg: LoraTrainConfig, *, gradient_checkpointing: bool = False):
    """``model`` wrapped with fresh LoRA weights as ``cfg`` says (the one place a PEFT config is
    built from a LoraTrainConfig). Gradient checkpointing trades compute for activation memory,
    for bf16 weights on a GPU."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                  target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
    if gradient_checkpointing:
        peft_model.gradient_checkpointing_enable()
        peft_model.enable_input_require_grads()
    return peft_model


def train_lora(base_dir: str | Path, samples: Sequence, out_dir: str | Path,
               cfg: LoraTrainConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Train a LoRA adapter on ``samples`` (objects with ``image``, ``question``, ``answer``) and
    save it to ``out_dir`` in PEFT format. Returns the training summary (also in ``training.json``)."""
    import torch

    from vloop.model import load_model
    from vloop.sft import run_sft

    cfg = cfg or LoraTrainConfig()
    torch.manual_seed(cfg.seed)
    lm = load_model(base_dir)
    model = add_lora(lm.model, cfg)
    result = run_sft(model, lm.processor, samples, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     warmup_steps=cfg.warmup_steps, seed=cfg.seed, log_every=cfg.log_every, log=log)
    losses, tokens = result.losses, result.tokens
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    summary = {"base_model": str(base_dir), "samples": len(samples), "config": asdict(cfg),
               "seconds": round(result.seconds, 2), "tokens": tokens,
               "final_loss": losses[-1], "losses": losses}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
