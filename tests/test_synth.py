from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import ImageStat

from vloop.sim.synth import (CATEGORIES, COLOURS, DEGRADATIONS, INTENTS, QUESTIONS, SUITABLE_QUESTIONS,
                             World, answer_for, degrade, render)

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_deterministic_by_seed():
    a, b = World(7).samples(20, degraded=0.5), World(7).samples(20, degraded=0.5)
    assert [s.image_bytes() for s in a] == [s.image_bytes() for s in b]
    assert [(s.question, s.answer, s.degradation) for s in a] == [(s.question, s.answer, s.degradation) for s in b]
    c = World(8).samples(20, degraded=0.5)
    assert [s.image_bytes() for s in a] != [s.image_bytes() for s in c]


def test_world_covers_categories_intents_languages_and_styles():
    ss = World(0).samples(600, degraded=0.3)
    assert {s.category for s in ss} == set(CATEGORIES)
    assert {s.intent for s in ss} == set(INTENTS)
    assert {s.lang for s in ss} == {"en", "zh"}
    assert {s.style for s in ss if s.category == "shoes"} == {"running", "formal"}
    assert {s.degradation for s in ss} == {None, *DEGRADATIONS}
    assert len({s.image.size for s in ss}) > 1  # random sizes
    for s in ss:
        assert bool(CJK.search(s.question)) == (s.lang == "zh"), s.question
        assert s.answer == answer_for(s.intent, s.lang, s.category, s.style, s.colour, s.count)


def test_several_paraphrases_per_intent_and_language():
    for (intent, lang), qs in QUESTIONS.items():
        assert len(set(qs)) >= 3, (intent, lang)
    for _, by_lang in SUITABLE_QUESTIONS.values():
        assert all(len(set(qs)) >= 2 for qs in by_lang.values())
    assert "这双鞋能跑步吗?" in SUITABLE_QUESTIONS["shoes"][1]["zh"]


def test_ground_truth_follows_the_picture():
    assert answer_for("suitable", "en", "shoes", "running", "red", 1) == "yes"
    assert answer_for("suitable", "zh", "shoes", "formal", "red", 1) == "不能"
    assert answer_for("colour", "zh", "bags", "backpack", "blue", 1) == "蓝色"
    assert answer_for("count", "en", "hats", "cap", "red", 3) == "3"
    with pytest.raises(ValueError, match="unknown intent"):
        answer_for("price", "en", "hats", "cap", "red", 1)


def test_the_item_has_its_colour(rng=None):
    import random

    for colour, rgb in COLOURS.items():
        img = render("bags", "backpack", colour, 1, random.Random(1), size=128)
        pixels = np.asarray(img).reshape(-1, 3)
        assert (np.abs(pixels - np.array(rgb)).sum(axis=1) < 10).mean() > 0.1, colour


def test_filters_restrict_the_slice():
    ss = World(1).samples(100, categories=("shoes",), intents=("colour",), colours=("red", "blue"))
    assert {s.category for s in ss} == {"shoes"} and {s.intent for s in ss} == {"colour"}
    assert {s.colour for s in ss} <= {"red", "blue"}


def test_degradations_change_the_image_measurably():
    import random

    img = render("shoes", "running", "red", 1, random.Random(0), size=128)
    bright = ImageStat.Stat(img.convert("L")).mean[0]
    assert ImageStat.Stat(degrade(img, "low_light", random.Random(0)).convert("L")).mean[0] < bright * 0.4
    blurred = degrade(img, "blur", random.Random(0))
    edges = lambda im: np.abs(np.diff(np.asarray(im.convert("L"), dtype=float), axis=1)).mean()
    assert edges(blurred) < edges(img) * 0.7
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(img, "rain", random.Random(0))
