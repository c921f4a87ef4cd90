from __future__ import annotations

from collections import defaultdict

from PIL import Image

from vloop.imagequality import QualityThresholds, assess
from vloop.synth import World


def test_degraded_photos_are_flagged_and_clean_ones_mostly_not():
    flagged = defaultdict(list)
    for s in World(0).samples(300, degraded=0.5):
        flagged[s.degradation].append(assess(s.image).poor)
    rate = {k: sum(v) / len(v) for k, v in flagged.items()}
    assert rate[None] <= 0.10, rate
    for kind in ("blur", "low_light", "glare"):
        assert rate[kind] >= 0.9, (kind, rate)


def test_each_flag_names_its_problem():
    s = World(1).sample(0)
    from vloop.synth import degrade
    import random

    assert "blurry" in assess(degrade(s.image, "blur", random.Random(0))).flags
    assert "dark" in assess(degrade(s.image, "low_light", random.Random(0))).flags
    assert "low_resolution" in assess(Image.new("RGB", (32, 32), "red")).flags
    assert "glare" in assess(Image.new("RGB", (100, 100), "white")).flags
    assert assess(s.image, QualityThresholds(min_sharpness=0, min_brightness=0)).flags == []
