"""GPU check: LoRA training and batched generation of a Qwen3-VL with Qwen3-VL-8B's shapes on one GPU.

No weights are downloaded: the model is randomly initialised from ``bench/qwen3_vl_8b_config.json``
(the shapes of Qwen/Qwen3-VL-8B-Instruct's public config.json: 36 layers of 4096, 32 query / 8 KV
heads of 128, MLP 12288, vocabulary 151936; vision tower 27 layers of 1152; 8.77B parameters).
Random weights compute exactly as many FLOPs and hold exactly as much memory as the real ones, so
speed and memory are the production figures; the losses and the generated text mean nothing.

What runs is the training path of ``python -m training``: ``LoraTrainConfig.resolved()`` picks
bf16 weights + autocast and gradient checkpointing on CUDA, ``training.lora.add_lora`` wraps the
model with PEFT, and every step is ``vloop.learn.sft.train_step`` (batch moved to the model's device,
forward under autocast, backward, clip, AdamW). Batches are synthetic: random text tokens around
one image (``--image-side`` pixels square, random pixels) per sample, the loss on the last
``--answer-tokens`` tokens. Then a batched greedy ``generate`` of ``--new-tokens`` tokens for
``--gen-batch`` prompts, timed as prefill (one token) and decode.

Printed: training tokens/s and MFU, generation tokens/s (decode) and MFU, peak GPU memory of each,
ending with one ``RESULT key=value ...`` line.

MFU counts model FLOPs, not hardware FLOPs: the language model's matmuls (embeddings excluded,
the LM head included) at 2 FLOPs per parameter per token forward and 2 more backward (the base is
frozen, so backward computes input gradients only, no weight gradients; LoRA's own matmuls are
under 1% and left out), causal attention (QK^T and AV, fwd 1x, bwd 2x), and the vision tower's
forward only (frozen, and no gradient flows into it). Gradient checkpointing's recompute is not
counted (that would be HFU). Peak: the GPU's dense bf16 tensor-core figure without sparsity —
989 TFLOP/s for H100 SXM and H200 (same compute), 756 for H100 PCIe, 312 for A100 — or
``--peak-tflops``.

    python bench/gpu_check.py                 # one GPU; exits 2 if there is no CUDA device
    python bench/gpu_check.py --tiny          # the same code on the CPU with the tiny model's config
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG = Path(__file__).with_name("qwen3_vl_8b_config.json")

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]


@dataclass
class GpuCheckConfig:
    config: str = str(CONFIG)
    tiny: bool = False  # the tiny model's config on the CPU: a smoke test of this script
    steps: int = 6  # LoRA steps; the first is a warm-up and is not timed
    batch_size: int = 8
    image_side: int = 448  # pixels; 448 -> 28x28 patches of 16 -> 196 image tokens after the 2x2 merge
    text_tokens: int = 96  # prompt text tokens around the image
    answer_tokens: int = 32  # tokens the loss is taken on
    gen_batch: int = 32
    new_tokens: int = 64
    rank: int = 16
    alpha: int = 32
    lr: float = 2e-4
    bf16: bool | None = None  # None: by device (on CUDA), as in training
    gradient_checkpointing: bool | None = None  # None: by device (on CUDA)
    peak_tflops: float | None = None  # None: from the GPU's name
    seed: int = 0

    @classmethod
    def tiny_defaults(cls, **kw) -> "GpuCheckConfig":
        """Sizes for the tiny model on a CPU: same code, seconds instead of minutes."""
        base = dict(tiny=True, steps=3, batch_size=4, image_side=128, text_tokens=24, answer_tokens=8,
                    gen_batch=4, new_tokens=8)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_config(cfg: GpuCheckConfig):
    from transformers import Qwen3VLConfig

    if cfg.tiny:
        from vloop.sim.synth import corpus
        from vloop.sim.tiny import tiny_config, train_tokenizer

        return tiny_config(train_tokenizer(corpus() + ["user", "assistant"], seed=cfg.seed))
    return Qwen3VLConfig(**json.loads(Path(cfg.config).read_text()))


def flops_per_token(mc, model, seq: int) -> dict:
    """Forward FLOPs per token: language-model matmuls, causal attention at context ``seq``, and
    the vision tower per patch (see the module docstring for what counts)."""
    lm = model.model.language_model
    t = mc.text_config
    lm_params = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    lm_params += model.lm_head.weight.numel()
    d_attn = t.num_attention_heads * t.head_dim
    attn = 2 * t.num_hidden_layers * seq * d_attn  # QK^T + AV = 4*s*d per layer, halved for causal
    v = mc.vision_config
    vis_params = sum(p.numel() for p in model.model.visual.parameters())
    return {"lm_matmul": 2 * lm_params, "attn": attn, "vision_per_patch": 2 * vis_params,
            "vision_attn_per_patch_per_ctx": 4 * v.depth * v.hidden_size, "lm_params": lm_params,
            "vision_params": vis_params}


class Inputs:
    """Synthetic Qwen3-VL batches: [text][vision_start][image_pad x n][vision_end][text][answer]."""

    def __init__(self, mc, cfg: GpuCheckConfig):
        import torch

        self.mc, self.cfg = mc, cfg
        v = mc.vision_config
        self.grid = cfg.image_side // v.patch_size  # patches per side
        if self.grid % v.spatial_merge_size:
            raise SystemExit(f"--image-side must be a multiple of {v.patch_size * v.spatial_merge_size}")
        self.patches = self.grid * self.grid
        self.image_tokens = self.patches // v.spatial_merge_size ** 2
        self.patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        t = mc.text_config
        ids = [mc.image_token_id, mc.video_token_id, mc.vision_start_token_id, mc.vision_end_token_id]
        ids += [getattr(c, k, None) for c in (mc, t) for k in ("eos_token_id", "pad_token_id")]
        self.special = torch.tensor(sorted({i for i in ids if isinstance(i, int)}))
        self.safe = next(i for i in range(t.vocab_size) if i not in set(self.special.tolist()))
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _text(self, n: int, rows: int):
        import torch

        ids = torch.randint(0, self.mc.text_config.vocab_size, (rows, n), generator=self.gen)
        ids[torch.isin(ids, self.special)] = self.safe  # plain text only: no stray image/vision tokens
        return ids

    def batch(self, rows: int, answer_tokens: int) -> dict:
        """On the CPU, as the processor builds them; training moves them (``batch_to_model``)."""
        import torch

        mc, half = self.mc, self.cfg.text_tokens // 2
        image = torch.cat([torch.full((rows, 1), mc.vision_start_token_id),
                           torch.full((rows, self.image_tokens), mc.image_token_id),
                           torch.full((rows, 1), mc.vision_end_token_id)], dim=1)
        parts = [self._text(half, rows), image, self._text(self.cfg.text_tokens - half, rows)]
        if answer_tokens:
            parts.append(self._text(answer_tokens, rows))
        ids = torch.cat(parts, dim=1)
        # What Qwen3VLProcessor returns beside input_ids: 1 marks image tokens, 0 text (M-RoPE needs it).
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "mm_token_type_ids": (ids == mc.image_token_id).long(),
               "pixel_values": torch.randn(rows * self.patches, self.patch_dim, generator=self.gen),
               "image_grid_thw": torch.tensor([[1, self.grid, self.grid]] * rows)}
        if answer_tokens:
            labels = torch.full_like(ids, -100)
            labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
            out["labels"] = labels
        return out


class Memory:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        """Peak GPU memory allocated by tensors since reset (CUDA), or the process's peak RSS (CPU)."""
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_flops(cfg: GpuCheckConfig, cuda: bool) -> tuple[float | None, str]:
    import torch

    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12, f"{cfg.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if not cuda:
        return None, "none (CPU: no peak assumed, MFU not reported)"
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_BF16_TFLOPS:
        if key in name:
            return tf * 1e12, f"{tf:g} TFLOP/s dense bf16 ({name})"
    return None, f"unknown for {name}: pass --peak-tflops"


def run(cfg: GpuCheckConfig) -> dict:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from training.lora import LoraTrainConfig, add_lora
    from vloop.learn.sft import batch_to_model, train_step, warmup_cosine

    device = "cpu" if cfg.tiny else "cuda"
    cuda = device == "cuda"
    run_cfg = LoraTrainConfig(rank=cfg.rank, alpha=cfg.alpha, lr=cfg.lr, steps=cfg.steps, seed=cfg.seed,
                              device=device, bf16=cfg.bf16,
                              gradient_checkpointing=cfg.gradient_checkpointing).resolved()
    torch.manual_seed(cfg.seed)
    mc = model_config(cfg)
    mem = Memory(cuda)
    log(f"building a random Qwen3-VL ({'tiny config' if cfg.tiny else Path(cfg.config).name}) on {device}, "
        f"{'bf16' if run_cfg.bf16 else 'fp32'}, gradient checkpointing {'on' if run_cfg.gradient_checkpointing else 'off'}")
    t0 = time.perf_counter()
    with torch.device(device):  # initialise in place: an 8B fp32 copy on the host would take 35 GB
        model = Qwen3VLForConditionalGeneration._from_config(mc, dtype=run_cfg.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e9:.3f}B parameters in {time.perf_counter() - t0:.1f}s")
    inputs = Inputs(mc, cfg)
    seq = cfg.text_tokens + inputs.image_tokens + 2 + cfg.answer_tokens
    f = flops_per_token(mc, model, seq)

    # -- LoRA training ------------------------------------------------------------------------
    model = add_lora(model, run_cfg, gradient_checkpointing=run_cfg.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, 1))
    mem.reset()
    timed, losses = 0.0, []
    for step in range(cfg.steps):
        batch = inputs.batch(cfg.batch_size, cfg.answer_tokens)
        s0 = time.perf_counter()
        losses.append(train_step(model, batch, params, opt, sched, autocast_dtype=run_cfg.autocast_dtype))
        # .item() in train_step synchronises, so the wall time covers the GPU's work
        dt = time.perf_counter() - s0
        if step:  # the first step pays for kernel selection and allocator growth
            timed += dt
        log(f"train step {step + 1}/{cfg.steps} loss {losses[-1]:.3f} {dt:.2f}s"
            f"{' (warm-up, not timed)' if not step else ''}")
    train_steps = max(cfg.steps - 1, 1)
    train_tokens = train_steps * cfg.batch_size * seq
    train_tps = train_tokens / timed if timed else float("nan")
    # Per step: LM linear fwd 2N + bwd 2N per token; attention fwd 1x + bwd 2x; vision fwd only.
    vis = cfg.batch_size * inputs.patches * (f["vision_per_patch"] + f["vision_attn_per_patch_per_ctx"] * inputs.patches)
    step_flops = cfg.batch_size * seq * (2 * f["lm_matmul"] + 3 * f["attn"]) + vis
    train_peak = mem.peak_gib()
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite training loss: {losses}")

    # -- batched generation -------------------------------------------------------------------
    model.eval()
    prompt = inputs.batch(cfg.gen_batch, 0)
    p_seq = prompt["input_ids"].shape[1]
    prompt = batch_to_model(prompt, model)
    eos = getattr(mc.text_config, "eos_token_id", None) or mc.eos_token_id
    gen_kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=eos, eos_token_id=eos)

    def generate(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        g0 = time.perf_counter()
        with torch.inference_mode():
            # min_new_tokens = max: random weights must not stop early, every row makes n tokens
            out = model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, **gen_kw)
        if cuda:
            torch.cuda.synchronize()
        assert out.shape == (cfg.gen_batch, p_seq + n), out.shape
        return time.perf_counter() - g0

    log(f"generation: {cfg.gen_batch} prompts of {p_seq} tokens, {cfg.new_tokens} new tokens each")
    generate(2)  # warm-up
    mem.reset()
    prefill_s = generate(1)
    total_s = generate(cfg.new_tokens)
    gen_peak = mem.peak_gib()
    decode_s = max(total_s - prefill_s, 1e-9)
    decode_tps = cfg.gen_batch * (cfg.new_tokens - 1) / decode_s
    gen_tps = cfg.gen_batch * cfg.new_tokens / total_s
    # Decoding: each new token costs 2N (LM) plus attention over its context (prompt + half the new).
    decode_flops = cfg.gen_batch * (cfg.new_tokens - 1) * (
        f["lm_matmul"] + 2 * f["attn"] * (p_seq + cfg.new_tokens / 2) / seq)
    log(f"prefill {prefill_s:.3f}s, {cfg.new_tokens} tokens in {total_s:.3f}s")

    peak, peak_note = peak_flops(cfg, cuda)
    train_mfu = step_flops * train_steps / timed / peak if peak and timed else None
    decode_mfu = decode_flops / decode_s / peak if peak else None
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": "tiny" if cfg.tiny else "qwen3-vl-8b-shapes", "params_b": round(n_params / 1e9, 3),
        "lora_params_m": round(trainable / 1e6, 2), "dtype": "bf16" if run_cfg.bf16 else "fp32",
        "grad_ckpt": run_cfg.gradient_checkpointing, "batch": cfg.batch_size, "seq": seq,
        "train_tokens_s": round(train_tps, 1), "train_step_s": round(timed / train_steps, 3),
        "train_mfu": None if train_mfu is None else round(train_mfu, 4),
        "train_peak_gib": round(train_peak, 2), "final_loss": round(losses[-1], 4),
        "gen_batch": cfg.gen_batch, "prompt_tokens": p_seq, "new_tokens": cfg.new_tokens,
        "gen_tokens_s": round(gen_tps, 1), "decode_tokens_s": round(decode_tps, 1),
        "prefill_s": round(prefill_s, 3),
        "decode_mfu": None if decode_mfu is None else round(decode_mfu, 4),
        "gen_peak_gib": round(gen_peak, 2), "peak_flops": peak_note,
        "peak_mem_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny model's config on the CPU (smoke test)")
    ap.add_argument("--config", help=f"model config JSON (default {CONFIG.name})")
    for name in ("steps", "batch-size", "image-side", "text-tokens", "answer-tokens", "gen-batch", "new-tokens",
                 "rank", "alpha"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when its name is not known")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k != "tiny" and v is not None}
    cfg = GpuCheckConfig.tiny_defaults(**kw) if args.tiny else GpuCheckConfig(**kw)

    import torch

    if not cfg.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this check needs "
              "one GPU. Run it where a GPU is lent, or use --tiny for the CPU smoke test.", file=sys.stderr)
        return 2
    log(f"config {json.dumps(asdict(cfg))}")
    t0 = time.perf_counter()
    res = run(cfg)
    for k, v in res.items():
        log(f"{k:16s} {v}")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + " ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
