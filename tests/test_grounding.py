"""Image-text grounding with the served model (the tiny Qwen3-VL, real PEFT adapters): the score,
its batching, per-adapter scoring, the daily confidence step, selection and the report."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from vloop.curate.grounding import GroundingConfig, grounding_scores, neutral_like, score_rows
from vloop.sim.synth import World

DAY = dt.date(2026, 11, 20)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from vloop.vlm.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def samples():
    return World(11).samples(6)


def test_grounding_is_the_log_likelihood_gain_from_the_image(lm, samples):
    from vloop.vlm.model import score_answers

    imgs = [s.image for s in samples]
    qs, ans = [s.question for s in samples], [s.answer for s in samples]
    g = grounding_scores(lm, imgs, qs, ans, GroundingConfig(batch_size=4))
    seen = score_answers(lm, imgs, qs, ans)
    blind = score_answers(lm, [neutral_like(im) for im in imgs], qs, ans)
    expected = [sum(a.token_logprobs) - sum(b.token_logprobs) for a, b in zip(seen, blind)]
    assert g == pytest.approx(expected, abs=1e-4)
    assert any(abs(x) > 1e-4 for x in g)  # the image does move the model
    # Batched or one by one: the same scores (padding is masked).
    assert grounding_scores(lm, imgs, qs, ans, GroundingConfig(batch_size=1)) == pytest.approx(g, abs=1e-4)
    # The neutral image itself gains nothing over the neutral image.
    grey = [neutral_like(imgs[0])]
    assert grounding_scores(lm, grey, qs[:1], ans[:1]) == pytest.approx([0.0], abs=1e-5)


def _register_random_adapter(lake, lm, tmp_path, name="vqa", version="v1"):
    """A real PEFT adapter with non-zero LoRA weights (a fresh one is a no-op), in the registry."""
    import copy

    import torch

    from training.lora import LoraTrainConfig, add_lora
    from vloop.learn.registry import AdapterVersion, Registry

    model = add_lora(copy.deepcopy(lm.model), LoraTrainConfig(rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    prefix = f"adapters/{name}/{version}/"
    for f in out.iterdir():
        lake.put_bytes(prefix + f.name, f.read_bytes())
    Registry(lake).register(AdapterVersion(name=name, version=version, path=prefix, base_model="tiny"),
                            actor="test")
    return f"{name}@{version}", out


def test_each_answer_is_grounded_by_the_model_version_that_gave_it(lm, samples, local_lake, tmp_path):
    from peft import PeftModel

    ref, local = _register_random_adapter(local_lake, lm, tmp_path)
    keys = [local_lake.put_image(s.image_bytes()).key for s in samples[:3]]
    rows = pd.DataFrame({"request_id": ["base", "adapted", "unknown"], "image_key": keys,
                         "question": [s.question for s in samples[:3]], "answer": [s.answer for s in samples[:3]],
                         "adapter": [None, ref, "gone@v9"]})
    got = score_rows(lm, local_lake, rows)
    imgs = [s.image for s in samples[:3]]
    base = grounding_scores(lm, imgs, rows["question"].tolist(), rows["answer"].tolist())
    assert got["base"] == pytest.approx(base[0], abs=1e-4)
    assert got["unknown"] == pytest.approx(base[2], abs=1e-4)  # not in the registry: the base scores it
    # The base model is left as it was: no LoRA layers remain in it.
    assert not any("lora" in n for n, _ in lm.model.named_modules())
    peft = PeftModel.from_pretrained(lm.model, local)
    try:
        import dataclasses

        adapted = grounding_scores(dataclasses.replace(lm, model=peft), imgs[1:2], rows["question"].tolist()[1:2],
                                   rows["answer"].tolist()[1:2])
    finally:
        peft.unload()
    assert got["adapted"] == pytest.approx(adapted[0], abs=1e-4)
    assert abs(got["adapted"] - base[1]) > 1e-4  # the adapter, not the base, scored it


def test_daily_confidence_step_grounds_answers_and_selection_uses_it(lm, local_lake):
    from vloop.curate import daily
    from vloop.sim.traffic import simulated_day
    from vloop.curate.selection import SelectionConfig

    simulated_day(local_lake, DAY, 30, seed=3, pool=10)
    daily.ingest(local_lake, DAY, dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(1), dt.timezone.utc))
    daily.validate(local_lake, DAY)
    daily.mine_feedback(local_lake, DAY)
    summary = daily.score_confidence(local_lake, DAY, lambda: lm, batch_size=8)
    conf = daily.read_table(local_lake, daily.CURATED, DAY, "confidence.parquet")
    inter, _ = daily.curated(local_lake, DAY)
    answered = inter["image_key"].notna() & inter["answer"].notna()
    assert summary["grounded"] == int(answered.sum()) > 0
    assert np.isfinite(conf.loc[answered.to_numpy(), "grounding"]).all()
    # Without a model the column is there, empty.
    daily.score_confidence(local_lake, DAY)
    assert daily.read_table(local_lake, daily.CURATED, DAY, "confidence.parquet")["grounding"].isna().all()
    daily.score_confidence(local_lake, DAY, lambda: lm, batch_size=8)
    daily.check_images(local_lake, DAY)
    # Every accepted answer counts as weakly grounded under an absurd threshold: each is chosen, saying why.
    daily.select_for_labelling(local_lake, DAY, SelectionConfig(budget=1000, low_grounding=1e9, w_category=0))
    chosen = daily.get_frame(local_lake, daily.key("labeling", DAY, "selected.parquet"))
    accepted = chosen[(chosen["weak_label"] == "positive") & chosen["pick"].isin(["priority", "both"])]  # audits say why they were drawn
    assert len(accepted) and accepted["why"].str.contains("accepted but weakly grounded").all()


def test_selection_picks_accepted_answers_with_low_grounding():
    from vloop.curate.selection import select

    cands = pd.DataFrame({"request_id": ["a", "b", "c", "d"], "user_key": "u", "image_key": None,
                          "image_sha256": ["1", "2", "3", "4"], "question": "q", "category": "shoes",
                          "confidence": 0.9, "grounding": [-2.0, 3.0, np.nan, -1.0]})
    mined = pd.DataFrame({"request_id": ["a", "b", "c", "d"], "weak_label": ["positive", "positive", "positive",
                                                                             "unknown"], "weight": 0.6})
    chosen = select(cands, mined, category_error_rate={})
    picked = chosen[chosen["pick"].isin(["priority", "both"])]
    assert picked["request_id"].tolist() == ["a"]  # grounded, ungrounded-but-unaccepted and unknown left
    assert set(chosen.loc[chosen["pick"] == "audit", "request_id"]) <= {"b", "c", "d"}  # the random audit
    assert "accepted but weakly grounded in the image (-2.00)" in chosen["why"].iloc[0]


def test_report_grounding_auroc_and_wording_against_edits():
    from vloop.curate.report import signal_quality

    labels = pd.DataFrame({"request_id": [f"r{i}" for i in range(6)], "arm": ["champion"] * 4 + ["canary"] * 2,
                           "verdict": ["correct", "correct", "wrong", "wrong", "correct", "wrong"],
                           "confidence": [0.9, 0.2, 0.8, 0.1, 0.5, 0.5]})
    grounding = {"r0": 3.0, "r1": 2.0, "r2": -1.0, "r3": 0.5, "r4": 1.0, "r5": 2.0}
    edits = pd.DataFrame({"arm": ["champion", "champion"], "answer": ["red shoes", "maybe blue"],
                          "correction": ["red shoes", "green"]})
    s = signal_quality(labels, grounding, edits).set_index("arm")
    assert s.loc["champion", "grounding_auroc"] == 1.0  # both right answers better grounded than both wrong
    assert s.loc["champion", "confidence_auroc"] == 0.75  # 3 of the 4 right-wrong pairs ordered
    assert s.loc["canary", "grounding_auroc"] == 0.0 and s.loc["all", "judged"] == 6
    assert s.loc["champion", "edits"] == 2 and 0 < s.loc["champion", "rouge_l_vs_edits"] < 1
    assert s.loc["champion", "bleu_vs_edits"] == pytest.approx(0.5)  # one identical, one disjoint
    assert np.isnan(s.loc["canary", "bleu_vs_edits"]) and s.loc["canary", "edits"] == 0
    assert len(signal_quality(None, {}, edits.iloc[:0])) == 0
    # Per-item scores average to what the evaluation reports.
    from vloop.learn.evaluation import scores, sentence_bleu_rouge

    p, r = ["red shoes", "可能是红色", "a b c d"], ["red shoes", "蓝色", "a b c e"]
    bleu, rouge = sentence_bleu_rouge(p, r)
    assert np.mean(bleu) == pytest.approx(scores(p, r)["bleu"]) and np.mean(rouge) == pytest.approx(scores(p, r)["rouge_l"])
