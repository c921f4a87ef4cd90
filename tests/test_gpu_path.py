"""The GPU training path, checked on a CPU.

What these tests can show without a GPU: that every training batch goes through
``vloop.learn.sft.batch_to_model`` and lands on the device and in the dtype of the model's input
embeddings, whatever they are (the ``meta`` device stands in for "a device other than the CPU",
float64 for "a dtype other than the processor's float32"); that the flags resolve to bf16 +
gradient checkpointing for CUDA and to the old fp32 behaviour for a CPU; that the bf16-autocast +
gradient-checkpointing code path trains the tiny Qwen3-VL (on the CPU's autocast); and that
``bench/gpu_check.py`` refuses cleanly without CUDA.

What they cannot show: CUDA kernels, real bf16 numerics on a GPU, memory, speed, or
``device_map="auto"`` placement. ``bench/gpu_check.py`` on a lent GPU covers those.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.lora import LoraTrainConfig, add_lora
from vloop.learn.sft import batch_to_model, run_sft, train_step, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]


class TwoDevices(torch.nn.Module):
    """Input embeddings on ``meta`` in float64, another layer on the CPU in float32: a model split
    over two devices, like ``device_map="auto"`` over two GPUs."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 4)  # CPU, float32, registered first
        self.embed = torch.nn.Embedding(10, 4, device="meta", dtype=torch.float64)

    def get_input_embeddings(self):
        return self.embed


def test_batch_goes_to_the_input_embeddings_device_and_dtype():
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 2, 3]]), "pixel_values": torch.randn(4, 6),
             "image_grid_thw": torch.tensor([[1, 2, 2]]), "note": "not a tensor"}
    moved = batch_to_model(batch, TwoDevices())
    for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
        assert moved[k].device.type == "meta", k  # not left on the CPU, not sent to the first parameter
    assert moved["pixel_values"].dtype == torch.float64  # floats take the embeddings' dtype
    assert moved["input_ids"].dtype == moved["labels"].dtype == moved["image_grid_thw"].dtype == torch.int64
    assert moved["note"] == "not a tensor"
    assert batch["pixel_values"].device.type == "cpu"  # the caller's batch is not modified


def test_a_model_without_get_input_embeddings_uses_its_first_parameter():
    model = torch.nn.Linear(2, 2, device="meta", dtype=torch.float16)
    moved = batch_to_model({"x": torch.zeros(2, 2), "ids": torch.zeros(2, dtype=torch.long)}, model)
    assert (moved["x"].device.type, moved["x"].dtype) == ("meta", torch.float16)
    assert moved["ids"].dtype == torch.long


def test_flags_resolve_by_device():
    cpu = LoraTrainConfig(device="cpu").resolved()
    assert (cpu.bf16, cpu.gradient_checkpointing, cpu.dtype, cpu.autocast_dtype) == (False, False, torch.float32, None)
    cuda = LoraTrainConfig(device="cuda:0").resolved()  # resolving does not touch a GPU
    assert (cuda.bf16, cuda.gradient_checkpointing, cuda.dtype, cuda.autocast_dtype) == (
        True, True, torch.bfloat16, torch.bfloat16)
    forced = LoraTrainConfig(device="cuda", bf16=False, gradient_checkpointing=False).resolved()
    assert (forced.bf16, forced.gradient_checkpointing) == (False, False)  # explicit choices are kept
    auto = LoraTrainConfig().resolved()
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert LoraTrainConfig().device is None  # resolved() returns a copy


class Spy(torch.nn.Module):
    """Delegates to a model and records the device and dtype of every tensor it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kw):
        self.seen.append({k: (v.device.type, v.dtype) for k, v in kw.items() if isinstance(v, torch.Tensor)})
        return self.model(**kw)


def test_run_sft_feeds_the_model_moved_batches(tiny_model_dir):
    """The processor makes float32 pixels; a float64 model must receive float64 ones, which only
    happens if run_sft moves each batch with batch_to_model (Qwen3-VL would cast the pixels itself,
    so without the spy this could not be told apart)."""
    from vloop.vlm.model import load_model
    from vloop.sim.synth import World

    lm = load_model(tiny_model_dir, device="cpu", dtype=torch.float64)
    spy = Spy(lm.model)
    run_sft(spy, lm.processor, World(3).samples(8), steps=2, batch_size=4, lr=1e-3, warmup_steps=1, seed=0,
            log=lambda line: None)
    assert len(spy.seen) == 2
    for seen in spy.seen:
        assert seen["pixel_values"] == ("cpu", torch.float64)
        assert seen["input_ids"][1] == seen["labels"][1] == torch.int64


def test_bf16_autocast_and_gradient_checkpointing_train_the_tiny_model(tiny_model_dir):
    """The flags CUDA gets, run on the CPU's bf16 autocast: bf16 base, fp32 LoRA weights that the
    optimiser moves, finite losses; and the forward really ran in bf16 (logits dtype)."""
    from vloop.vlm.model import encode, load_model
    from vloop.sim.synth import World

    run = LoraTrainConfig(rank=4, device="cpu", bf16=True, gradient_checkpointing=True).resolved()
    lm = load_model(tiny_model_dir, device=run.device, dtype=run.dtype)
    model = add_lora(lm.model, run, gradient_checkpointing=run.gradient_checkpointing)
    assert model.base_model.model.is_activation_checkpointing
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert lora and all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    samples = World(5).samples(8)
    result = run_sft(model, lm.processor, samples, steps=3, batch_size=4, lr=1e-2, warmup_steps=1, seed=0,
                     log=lambda line: None, autocast_dtype=run.autocast_dtype)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n].detach(), v) for n, v in lora.items())  # LoRA B moved off zero
    # The same step outside autocast would compute in fp32; under it the logits come out bf16.
    model.train()
    batch = encode(lm.processor, [s.image for s in samples[:2]], [s.question for s in samples[:2]],
                   [s.answer for s in samples[:2]])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(1, 0))
    dtypes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        loss = train_step(model, batch, params, opt, sched, autocast_dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert dtypes == [torch.bfloat16] and loss == loss


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when no CUDA device is present")
def test_gpu_check_refuses_without_cuda():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr and "--tiny" in out.stderr
    assert "RESULT" not in out.stdout
