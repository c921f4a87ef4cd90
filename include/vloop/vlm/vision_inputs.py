"""Qwen2-VL/Qwen3-VL image preprocessing for a whole batch at once, pixel-identical to the stock one.

transformers' stock image processor for these models (the PIL/NumPy backend,
``Qwen2VLImageProcessorPil``) works image by image: convert to an array, resize through PIL, rescale
and normalise in several NumPy passes, cut into patches, about 0.6 ms per image here, which was a
third of batched scoring's time. Its torchvision ("fast") backend would batch these steps, but the
torchvision wheels on this package index link CUDA and do not import with the CPU torch the project
runs on. :func:`preprocess_images` does the same steps for a batch instead:

* each image is resized by exactly the PIL call the stock processor makes (same target size from
  the same ``smart_resize``, same filter); when the size does not change, PIL would return a copy,
  so the call is skipped;
* rescaling and normalising is the stock arithmetic, in the same order and precision, on the
  whole batch in one pass (element-wise, so bit-identical);
* all images that end at the same size are cut into patches with one reshape and transpose.

Measured on 64 synthetic product photos (96-224 px, all resized to 128x128): 0.44 ms per image
against the stock 0.70, of which 0.19 is the PIL resize itself (best of 7, one process).

It applies to the stock PIL processor with its own settings and RGB PIL images; anything else
(another processor class, per-call overrides, other image types) returns None and the caller uses
the stock processor.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Per-call options the batch path honours; any other option makes it step aside.
_HONOURED_KWARGS = {"return_tensors"}


def _is_stock_pil_qwen2vl(image_processor) -> bool:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return type(image_processor) is Qwen2VLImageProcessorPil


def _rescale_normalise(image_processor, pixels: np.ndarray, chunk: int = 16) -> np.ndarray:
    """(n, c, h, w) uint8 -> float32 by the stock processor's arithmetic in the same order and
    precision: ``float64(v) * scale`` cast to float32, then ``(x - mean) / std`` in float32.
    Element-wise NumPy arithmetic gives each element the same IEEE result whatever the array's
    shape (and in place or not), so doing it for a batch is bit-identical to doing it image by
    image. The float64 step goes ``chunk`` images at a time: a whole batch's float64 copy (50 MB
    for 128 images) is fresh memory on every call and cost more than the arithmetic."""
    ip = image_processor
    out = np.empty(pixels.shape, dtype=np.float32)
    for s in range(0, len(pixels), chunk):
        out[s:s + chunk] = pixels[s:s + chunk].astype(np.float64) * ip.rescale_factor if ip.do_rescale \
            else pixels[s:s + chunk]
    if ip.do_normalize:
        channels = pixels.shape[1]
        mean, std = ([v] * channels if np.isscalar(v) else v for v in (ip.image_mean, ip.image_std))
        out -= np.asarray(mean, dtype=np.float32)[:, None, None]
        out /= np.asarray(std, dtype=np.float32)[:, None, None]
    return out


def _patches(values: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """(n, c, h, w) float32 -> (n * gh * gw, c * temporal * patch * patch), the stock layout:
    patches in merge-window order, each patch channel-major, every frame repeated ``temporal`` times.
    Channel-first keeps each patch row contiguous, which makes the final copy ~7x faster than from
    channel-last."""
    n, c, h, w = values.shape
    gh, gw = h // patch, w // patch
    # h = (gh/merge, merge, patch), w = (gw/merge, merge, patch)
    values = values.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # -> (n, gh/merge, gw/merge, merge_h, merge_w, c, patch_h, patch_w)
    values = values.transpose(0, 2, 5, 3, 6, 1, 4, 7)
    values = np.broadcast_to(values[:, :, :, :, :, :, None], (*values.shape[:6], temporal, patch, patch))
    return values.reshape(n * gh * gw, c * temporal * patch * patch)


def preprocess_images(image_processor, images, **kwargs):
    """The stock processor's ``{"pixel_values", "image_grid_thw"}`` for ``images`` (a list of PIL
    images), computed for the whole batch at once; None where this path does not apply."""
    from transformers.image_processing_utils import BatchFeature
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if set(kwargs) - _HONOURED_KWARGS or not _is_stock_pil_qwen2vl(image_processor):
        return None
    if not isinstance(images, (list, tuple)) or not images:
        return None
    if not all(isinstance(im, Image.Image) and im.mode == "RGB" and "transparency" not in im.info
               for im in images):
        return None  # the stock conversion composites transparency and converts modes: its job
    ip = image_processor
    if not ip.do_convert_rgb or ip.size.get("shortest_edge") is None or ip.size.get("longest_edge") is None:
        return None
    patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size

    by_size: dict[tuple[int, int], list[int]] = {}
    resized = []
    for i, im in enumerate(images):
        if ip.do_resize:
            h, w = smart_resize(im.height, im.width, factor=patch * merge,
                                min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
            if (w, h) != im.size:
                im = im.resize((w, h), resample=ip.resample)
        elif im.height % (patch * merge) or im.width % (patch * merge):
            return None  # the stock processor would fail on it: let it say so
        resized.append(im)
        by_size.setdefault((im.height, im.width), []).append(i)

    per_image: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
    grids = np.empty((len(images), 3), dtype=np.int64)
    for (h, w), idx in by_size.items():
        # (n, c, h, w), in that memory order: astype keeps the layout, and _patches wants it.
        pixels = np.ascontiguousarray(np.stack([np.asarray(resized[i]) for i in idx]).transpose(0, 3, 1, 2))
        flat = _patches(_rescale_normalise(ip, pixels), patch, merge, temporal)
        per = (h // patch) * (w // patch)
        for k, i in enumerate(idx):
            per_image[i] = flat[k * per:(k + 1) * per]
            grids[i] = (1, h // patch, w // patch)
    # One size: ``flat`` already holds the images in order.
    pixel_values = flat if len(by_size) == 1 else np.concatenate(per_image)
    return BatchFeature(data={"pixel_values": pixel_values, "image_grid_thw": grids},
                        tensor_type=kwargs.get("return_tensors"))
