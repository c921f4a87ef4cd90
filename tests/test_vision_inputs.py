"""Batched image preprocessing (vloop.vlm.vision_inputs) against transformers' stock Qwen2-VL processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vloop.vlm.vision_inputs as vision_inputs
from vloop.vlm.model import encode, load_model
from vloop.sim.synth import World
from vloop.vlm.vision_inputs import preprocess_images


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def noise(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mixed_images():
    """Synthetic product photos (96-224 px, up- and downscaled) and noise of awkward sizes: a phone
    photo, a thin strip, one already at the target size, one with no resize needed at all."""
    return [s.image for s in World(7).samples(12)] + [
        noise(1024, 768, 1), noise(37, 500, 2), noise(128, 128, 3), noise(300, 200, 4), noise(64, 64, 5)]


def test_batch_is_pixel_identical_to_the_stock_processor(tiny):
    stock = tiny.processor.image_processor
    assert type(stock).__name__ == "Qwen2VLImageProcessorPil"  # the reference really is the stock one
    images = mixed_images()
    ours = preprocess_images(stock, images, return_tensors="pt")
    ref = stock(images, return_tensors="pt")
    assert len({tuple(g) for g in ref["image_grid_thw"].tolist()}) > 2  # several sizes in one batch
    assert ours["pixel_values"].dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])  # bit for bit, not approximately
    # One image at a time and NumPy output too.
    for im in images[-3:]:
        one = preprocess_images(stock, [im])
        assert isinstance(one["pixel_values"], np.ndarray)
        assert np.array_equal(one["pixel_values"], stock([im])["pixel_values"])


def test_processor_and_encode_give_the_same_batch_as_the_stock_path(tiny, monkeypatch):
    ss = World(8).samples(6)
    images, questions, answers = [s.image for s in ss], [s.question for s in ss], [s.answer for s in ss]
    images[1] = noise(300, 200, 9)
    fast = encode(tiny.processor, images, questions, answers)
    monkeypatch.setattr(vision_inputs, "preprocess_images", lambda *a, **k: None)  # force the stock path
    stock = encode(tiny.processor, images, questions, answers)
    assert fast.keys() == stock.keys()
    for k in stock:
        assert torch.equal(fast[k], stock[k]), k


def test_cases_it_does_not_cover_go_to_the_stock_processor(tiny):
    stock = tiny.processor.image_processor
    rgb = noise(96, 96, 0)
    assert preprocess_images(stock, [rgb.convert("RGBA")]) is None  # transparency is composited by the stock one
    assert preprocess_images(stock, [rgb.convert("L")]) is None
    assert preprocess_images(stock, [np.asarray(rgb)]) is None
    assert preprocess_images(stock, [rgb], size={"shortest_edge": 4096, "longest_edge": 4096}) is None
    assert preprocess_images(stock, [rgb]) is not None
    # ... and the processor still handles them, through the stock path.
    out = tiny.processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[rgb.convert("RGBA")],
                         return_tensors="pt")
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod())


def test_patch_embedding_runs_as_a_matrix_product_with_the_same_result(tiny):
    proj = tiny.model.model.visual.patch_embed.proj
    assert type(proj).__name__ == "PatchConv3d" and isinstance(proj, torch.nn.Conv3d)
    assert set(dict(proj.named_parameters())) == {"weight", "bias"}  # state dict unchanged
    x = torch.randn(50, *([proj.in_channels] + list(proj.kernel_size)))
    with torch.no_grad():
        ours = proj(x)
        conv = torch.nn.functional.conv3d(x, proj.weight, proj.bias, stride=proj.stride)
    assert ours.shape == conv.shape
    assert torch.allclose(ours, conv, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ours, torch.zeros_like(ours))
