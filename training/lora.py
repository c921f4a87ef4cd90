"""LoRA fine-tuning of a Qwen3-VL on (image, question, answer) samples with PEFT.

This is the core training step: chat-format batches from :func:`vloop.vlm.model.encode` (loss on the
answer tokens only), LoRA on the language model's attention and MLP projections, the vision tower
frozen (vLLM applies LoRA to the language model), AdamW with warm-up and cosine decay, seeded,
progress logged with loss and tokens/s. The output is a standard PEFT adapter directory.

Where it runs is part of the config (``device``, ``bf16``, ``gradient_checkpointing``), each
``None`` by default, meaning "decide by the device": on CUDA the frozen base is held in bf16, the
forward pass runs under bf16 autocast and gradient checkpointing trades one more forward
pass per step for activation memory, which is what grows with batch and sequence; on a CPU everything stays
fp32 without checkpointing, exactly as before these flags existed. The LoRA weights themselves stay
fp32 (PEFT upcasts adapters on a bf16 base), so the optimiser updates full-precision weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
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
    # None = decide by the device (see the module docstring and :meth:`resolved`).
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: cuda when one is visible
    bf16: bool | None = None  # bf16 base weights + bf16 autocast; None: on CUDA only
    gradient_checkpointing: bool | None = None  # None: on CUDA only
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "LoraTrainConfig":
        """This config with ``device``, ``bf16`` and ``gradient_checkpointing`` decided."""
        from vloop.vlm.model import pick_device_and_dtype

        device, _ = pick_device_and_dtype(self.device)
        on_cuda = device.startswith("cuda")
        return replace(self, device=device,
                       bf16=on_cuda if self.bf16 is None else self.bf16,
                       gradient_checkpointing=on_cuda if self.gradient_checkpointing is None
                       else self.gradient_checkpointing)

    @property
    def dtype(self):
        """The base weights' dtype (of a resolved config)."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def autocast_dtype(self):
        """What :func:`vloop.learn.sft.run_sft` autocasts to: bf16 or nothing (of a resolved config)."""
        import torch

        return torch.bfloat16 if self.bf16 else None


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

    from vloop.vlm.model import load_model
    from vloop.learn.sft import run_sft

    cfg = cfg or LoraTrainConfig()
    run = cfg.resolved()
    torch.manual_seed(cfg.seed)
    lm = load_model(base_dir, device=run.device, dtype=run.dtype)
    model = add_lora(lm.model, cfg, gradient_checkpointing=run.gradient_checkpointing)
    result = run_sft(model, lm.processor, samples, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     warmup_steps=cfg.warmup_steps, seed=cfg.seed, log_every=cfg.log_every, log=log,
                     autocast_dtype=run.autocast_dtype)
    losses, tokens = result.losses, result.tokens
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    summary = {"base_model": str(base_dir), "samples": len(samples), "config": asdict(cfg),
               "device": run.device, "bf16": run.bf16, "gradient_checkpointing": run.gradient_checkpointing,
               "seconds": round(result.seconds, 2), "tokens": tokens,
               "final_loss": losses[-1], "losses": losses}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
