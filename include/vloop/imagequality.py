"""Image quality: blur, exposure and resolution, so poor photos are flagged and not trained on.

* blur — variance of the Laplacian of the grey image, normalised to a 128-pixel side (sharp
  edges give high variance; a blurred photo has little);
* exposure — mean brightness (too dark) and the share of blown-out pixels (glare);
* resolution — the shorter side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class QualityThresholds:
    min_sharpness: float = 5.0
    min_brightness: float = 50.0  # mean grey level, 0..255
    max_blown_out: float = 0.2  # share of pixels at >= 250
    min_side: int = 64


@dataclass
class ImageQuality:
    sharpness: float
    brightness: float
    blown_out: float
    width: int
    height: int
    flags: list[str]

    @property
    def poor(self) -> bool:
        return bool(self.flags)


def assess(img: Image.Image, t: QualityThresholds | None = None) -> ImageQuality:
    t = t or QualityThresholds()
    grey_full = np.asarray(img.convert("L"), dtype=np.float32)
    small = np.asarray(img.convert("L").resize((128, 128)), dtype=np.float32)
    lap = (small[:-2, 1:-1] + small[2:, 1:-1] + small[1:-1, :-2] + small[1:-1, 2:] - 4 * small[1:-1, 1:-1])
    sharpness = float(lap.var())
    brightness = float(grey_full.mean())
    blown = float((grey_full >= 250).mean())
    flags = []
    if sharpness < t.min_sharpness:
        flags.append("blurry")
    if brightness < t.min_brightness:
        flags.append("dark")
    if blown > t.max_blown_out:
        flags.append("glare")
    if min(img.size) < t.min_side:
        flags.append("low_resolution")
    return ImageQuality(sharpness, brightness, blown, img.width, img.height, flags)
