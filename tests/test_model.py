"""The model layer on the real (tiny) Qwen3-VL: building, loading, generation, scoring, pretraining."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from vloop.vlm.model import (Confidence, InputError, ModelLoadError, auroc, encode, generate, load_model,
                             score_answers)
from vloop.sim.synth import World
from vloop.sim.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def base(base_model_dir):
    return load_model(base_model_dir)


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_for_a_seed(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert digest(again) == digest(tiny_model_dir)
    assert (again / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert digest(other) != digest(tiny_model_dir)


def test_tiny_model_is_a_real_small_qwen3_vl(tiny, tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl"
    assert type(tiny.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert 0.5e6 < tiny.model.num_parameters() < 3e6
    assert tiny.device == "cpu" and tiny.dtype == torch.float32
    tok = tiny.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    # Byte-level: any text round-trips, Chinese included.
    text = "这双鞋能跑步吗? Can I run in these?"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_reloads_offline_in_a_fresh_process(tiny_model_dir):
    code = ("from vloop.vlm.model import load_model; lm = load_model(r'%s'); "
            "print(type(lm.processor).__name__, lm.model.num_parameters())" % tiny_model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("VloopQwen3VLProcessor")


def test_not_a_qwen3_vl_directory_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(empty)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' model, not a Qwen3-VL"):
        load_model(other)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(no_weights)


def test_labels_cover_exactly_the_answer_tokens(tiny):
    ss = World(3).samples(6)
    answers = ["red", "这是一个很长的答案，用来测试填充", "2", "no", "黑色", "shoes"]
    batch = encode(tiny.processor, [s.image for s in ss], [s.question for s in ss], answers)
    tok = tiny.tokenizer
    for i, a in enumerate(answers):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == a + "<|im_end|>"
        # Padding is never a label.
        assert not ((batch["attention_mask"][i] == 0) & (batch["labels"][i] != -100)).any()
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # mixed lengths were padded


def test_generation_logprobs_come_from_raw_logits(tiny):
    ss = World(4).samples(3)
    gens = generate(tiny, [s.image for s in ss], [s.question for s in ss], max_new_tokens=4, top_logprobs=3)
    for g in gens:
        assert len(g.token_logprobs) == len(g.token_ids) == len(g.top_logprobs)
        for lp, tops in zip(g.token_logprobs, g.top_logprobs):
            assert lp <= 0 and len(tops) == 3
            assert lp == pytest.approx(tops[0][1], abs=1e-5)  # greedy: the chosen token is the top one
        assert 0 < g.confidence.geo_mean_prob <= 1
        assert g.confidence.geo_mean_prob == pytest.approx(math.exp(sum(g.token_logprobs) / len(g.token_logprobs)))
    # Sampling at a high temperature changes the tokens drawn, not the reported probabilities:
    # the first step sees the same prompt, so its log-probabilities equal the greedy run's.
    torch.manual_seed(0)
    hot = generate(tiny, [ss[0].image], [ss[0].question], max_new_tokens=4, top_logprobs=3, temperature=5.0)[0]
    assert [t for t, _ in hot.top_logprobs[0]] == [t for t, _ in gens[0].top_logprobs[0]]
    assert [lp for _, lp in hot.top_logprobs[0]] == pytest.approx([lp for _, lp in gens[0].top_logprobs[0]], abs=1e-5)


def test_teacher_forced_scores_match_generation_and_single_scoring(base):
    ss = World(5).samples(12, intents=("colour",))
    gens = generate(base, [s.image for s in ss], [s.question for s in ss], max_new_tokens=6)
    # Score the greedy answers: the same model, so the same per-token log-probabilities.
    batch_scores = score_answers(base, [s.image for s in ss], [s.question for s in ss], [g.text for g in gens],
                                 batch_size=5)
    for g, sc in zip(gens, batch_scores):
        assert sc.token_logprobs == pytest.approx(g.token_logprobs, abs=1e-3)
        assert sc.confidence.geo_mean_prob == pytest.approx(g.confidence.geo_mean_prob, rel=1e-3)
    # Batched scoring (padded, mixed lengths) equals scoring one at a time.
    answers = [s.answer + (" really" * (i % 3)) for i, s in enumerate(ss)]
    batched = score_answers(base, [s.image for s in ss], [s.question for s in ss], answers, batch_size=12)
    single = [score_answers(base, [s.image], [s.question], [a])[0] for s, a in zip(ss, answers)]
    for b, s in zip(batched, single):
        assert b.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-4)


def test_bad_inputs_get_clear_errors(tiny):
    img = World(0).sample(0).image
    with pytest.raises(InputError, match="question is empty"):
        generate(tiny, [img], ["   "])
    with pytest.raises(InputError, match="over the limit"):
        generate(tiny, [img], ["why? " * 1000])
    with pytest.raises(InputError, match="unreadable image"):
        generate(tiny, [b"GIF89a broken"], ["What colour is this?"])
    with pytest.raises(InputError, match="cannot read image file"):
        generate(tiny, ["/nonexistent/picture.png"], ["What colour is this?"])
    with pytest.raises(InputError, match="same length"):
        score_answers(tiny, [img], ["q1", "q2"], ["a"])


def test_text_only_question_works(tiny):
    g = generate(tiny, [None], ["hello?"], max_new_tokens=3)[0]
    assert len(g.token_ids) <= 3


def test_auroc_and_confidence_helpers():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert math.isnan(auroc([0.5], [True]))
    c = Confidence.from_logprobs([math.log(0.5), math.log(0.5)])
    assert c.geo_mean_prob == pytest.approx(0.5) and c.min_prob == pytest.approx(0.5)


def test_pretrained_base_is_a_mediocre_champion_with_useful_confidence(base_model_dir):
    """Right on what it saw, wrong on the rest, and confidence tells which is which."""
    report = json.loads((base_model_dir / "eval.json").read_text())
    held = report["held_out"]
    assert held["by_seen"]["seen"] >= 0.9
    assert held["by_seen"]["unseen"] <= 0.7
    assert 0.3 <= held["exact_match"] <= 0.85  # mediocre, not useless, not perfect
    assert held["confidence_auroc"] >= 0.8
    assert held["mean_confidence_right"] > held["mean_confidence_wrong"]
    assert report["other_intents"]["exact_match"] <= 0.3  # never taught to count or judge suitability
    assert set(held["by_intent"]) == {"colour"} and len(held["by_category"]) == 5
