"""LoRA fine-tuning of a Qwen3-VL on (image, question, answer) samples with PEFT.

This is the core training step: chat-format batches from :func:`vloop.model.encode` (loss on the
answer tokens only), LoRA on the language model's attention and MLP projections, the vision tower
frozen (vLLM applies LoRA to the language model), AdamW with warm-up and cosine decay, seeded,
progress logged with loss and tokens/s. The output is a standard PEFT adapter directory.
"""

from __future__ import annotations

import json
import math
import time
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


def train_lora(base_dir: str | Path, samples: Sequence, out_dir: str | Path,
               cfg: LoraTrainConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Train a LoRA adapter on ``samples`` (objects with ``image``, ``question``, ``answer``) and
    save it to ``out_dir`` in PEFT format. Returns the training summary (also in ``training.json``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vloop.model import encode, load_model

    cfg = cfg or LoraTrainConfig()
    if not samples:
        raise ValueError("no training samples")
    torch.manual_seed(cfg.seed)
    lm = load_model(base_dir)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, peft_cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    t0, tokens, losses = time.perf_counter(), 0, []
    for step in range(cfg.steps):
        idx = [order[(step * cfg.batch_size + i) % len(order)] for i in range(cfg.batch_size)]
        batch = encode(lm.processor, [samples[i].image for i in idx], [samples[i].question for i in idx],
                       [samples[i].answer for i in idx])
        tokens += int(batch["attention_mask"].sum())
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t0
            log(f"step {step + 1}/{cfg.steps} loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.3f} "
                f"{tokens / el:.0f} tokens/s eta {(cfg.steps - step - 1) * el / (step + 1):.0f}s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    summary = {"base_model": str(base_dir), "samples": len(samples), "config": asdict(cfg),
               "seconds": round(time.perf_counter() - t0, 2), "tokens": tokens,
               "final_loss": losses[-1], "losses": losses}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
