"""The supervised fine-tuning loop shared by base pretraining and LoRA training.

Chat-format batches from :func:`vloop.model.encode` (loss on the answer tokens), AdamW over the
trainable parameters, linear warm-up then cosine decay, gradient clipping, a seeded sample order,
and a progress line every ``log_every`` steps with loss, tokens/s and ETA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class SFTResult:
    losses: list[float]
    tokens: int
    seconds: float


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    def at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * p))
    return at


def run_sft(model, processor, samples: Sequence, *, steps: int, batch_size: int, lr: float,
            warmup_steps: int, seed: int, weight_decay: float = 0.0, log_every: int = 10,
            log: Callable[[str], None] = print) -> SFTResult:
    """Train ``model`` in place on ``samples`` (objects with ``image``, ``question``, ``answer``)."""
    import torch

    from vloop.model import encode

    if not samples:
        raise ValueError("no training samples")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup_steps))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    t0, tokens, losses = time.perf_counter(), 0, []
    for step in range(steps):
        idx = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        batch = encode(processor, [samples[i].image for i in idx], [samples[i].question for i in idx],
                       [samples[i].answer for i in idx])
        tokens += int(batch["attention_mask"].sum())
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            recent = losses[-log_every:]
            log(f"step {step + 1}/{steps} loss {sum(recent) / len(recent):.3f} "
                f"{(step + 1) * batch_size / el:.0f} samples/s {tokens / el:.0f} tokens/s "
                f"eta {(steps - step - 1) * el / (step + 1):.0f}s")
    model.eval()
    return SFTResult(losses, tokens, time.perf_counter() - t0)
