"""The supervised fine-tuning loop shared by base pretraining and LoRA training.

Chat-format batches from :func:`vloop.vlm.model.encode` (loss on the answer tokens), AdamW over the
trainable parameters, linear warm-up then cosine decay, gradient clipping, a seeded sample order,
and a progress line every ``log_every`` steps with loss, tokens/s and ETA.

Device-agnostic: each batch is built on the CPU by the processor and moved to the model's device
(:func:`batch_to_model`) before the forward pass, so the same loop trains on a CPU or on a GPU; on
a GPU the caller passes ``autocast_dtype=torch.bfloat16`` (see ``training.lora.LoraTrainConfig``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
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


def _input_weight(model):
    """The weight the batch meets first: the input embeddings (where ``input_ids`` go). With
    ``device_map="auto"`` over several GPUs the model's layers sit on different devices, and the
    batch belongs with the embeddings, not with an arbitrary first parameter."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if weight is not None:
        return weight
    return next(model.parameters())


def batch_to_model(batch, model) -> dict:
    """``batch`` (a dict of tensors, e.g. from :func:`vloop.vlm.model.encode`) on the device of the
    model's input embeddings; floating-point tensors (``pixel_values``) also in their dtype, so
    bf16 weights get bf16 pixels. Integer tensors (ids, masks, labels, grid sizes) keep their
    dtype. Non-tensors pass through."""
    import torch

    weight = _input_weight(model)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(weight.device, dtype=weight.dtype if v.is_floating_point() else None)
        out[k] = v
    return out


def autocast_context(model, dtype):
    """``torch.autocast`` on the model's device type for ``dtype``; a no-op when ``dtype`` is None
    (fp32 training on a CPU stays exactly what it was)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_input_weight(model).device.type, dtype=dtype)


def train_step(model, batch, params, opt, sched, *, autocast_dtype=None) -> float:
    """One optimiser step on ``batch`` (moved to the model first): forward under autocast, backward,
    clip to norm 1, step, zero the gradients. Returns the loss. The one training step that
    :func:`run_sft` and ``bench/gpu_check.py`` share."""
    import torch

    batch = batch_to_model(batch, model)
    with autocast_context(model, autocast_dtype):
        loss = model(**batch).loss
    loss.backward()  # outside autocast, as torch recommends: backward ops run in the forward's dtypes
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _save_checkpoint(path: Path, model, opt, sched, step: int, losses: list[float], tokens: int) -> None:
    """Trainable weights + optimizer + scheduler + progress, written then renamed (atomic)."""
    import torch

    state = {"step": step, "losses": losses, "tokens": tokens, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(),
             "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_sft(model, processor, samples: Sequence, *, steps: int, batch_size: int, lr: float,
            warmup_steps: int, seed: int, weight_decay: float = 0.0, log_every: int = 10,
            log: Callable[[str], None] = print, checkpoint: str | Path | None = None,
            checkpoint_every: int = 0, autocast_dtype=None) -> SFTResult:
    """Train ``model`` in place on ``samples`` (objects with ``image``, ``question``, ``answer``).

    With ``checkpoint`` (a file path), the state is saved there every ``checkpoint_every`` steps
    and a later call with the same arguments resumes from it: the sample order depends only on
    the seed and the step, so a resumed run sees the same batches an uninterrupted one would.
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs the forward pass under autocast."""
    import torch

    from vloop.vlm.model import encode

    if not samples:
        raise ValueError("no training samples")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup_steps))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    t0, tokens, losses, start = time.perf_counter(), 0, [], 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        trainable = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state["trainable"].items():
                trainable[n].copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses, tokens = state["step"], state["losses"], state["tokens"]
        log(f"resumed from the checkpoint at step {start}/{steps}")
    resumed_tokens = tokens
    for step in range(start, steps):
        idx = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        batch = encode(processor, [samples[i].image for i in idx], [samples[i].question for i in idx],
                       [samples[i].answer for i in idx])
        tokens += int(batch["attention_mask"].sum())
        losses.append(train_step(model, batch, params, opt, sched, autocast_dtype=autocast_dtype))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            recent = losses[-log_every:]
            done = step + 1 - start
            log(f"step {step + 1}/{steps} loss {sum(recent) / len(recent):.3f} "
                f"{done * batch_size / el:.0f} samples/s {(tokens - resumed_tokens) / el:.0f} tokens/s "
                f"eta {(steps - step - 1) * el / done:.0f}s")
        if ckpt is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, model, opt, sched, step + 1, losses, tokens)
    model.eval()
    return SFTResult(losses, tokens, time.perf_counter() - t0)
