"""Retraining parts without Airflow: the registry (lineage, aliases, history, two writers at
once), the dataset builder, evaluation metrics, and the training job on the tiny Qwen3-VL —
including a run killed mid-way (SIGKILL) that resumes from its checkpoint."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from vloop.curate import daily
from vloop.learn.dataset import DatasetConfig, build_dataset, ensure_golden, load_split
from vloop.learn.registry import AdapterVersion, Registry, RegistryError, new_version
from vloop.sim.synth import GOLDEN_SEED, World, golden_samples

DAY = dt.date(2026, 11, 20)


def test_registry_lineage_aliases_history_and_concurrent_writers(lake):
    reg = Registry(lake)
    a = reg.register(AdapterVersion("vqa", new_version(), "adapters/vqa/a/", "base", dataset_id="ds-1",
                                    metrics={"em": 0.7}), actor="test")
    b = reg.register(AdapterVersion("vqa", new_version(), "adapters/vqa/b/", "base", dataset_id="ds-2"), actor="test")
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(AdapterVersion("vqa", a.version, "x", "base"), actor="test")
    assert reg.get(a.ref).dataset_id == "ds-1" and reg.state().statuses[a.ref] == "candidate"
    reg.set_alias("champion", a.ref, actor="dag", reason="first champion")
    t_a = dt.datetime.now(dt.timezone.utc)
    time.sleep(0.01)
    reg.set_alias("champion", b.ref, actor="dag", reason="promoted after canary")
    st = reg.state()
    assert st.aliases["champion"] == b.ref and st.statuses[a.ref] == "retired" and st.statuses[b.ref] == "champion"
    assert reg.served_at(t_a)["champion"] == a.ref  # what served at a given time
    assert reg.served_at(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))["champion"] is None
    with pytest.raises(RegistryError):
        reg.set_alias("champion", "vqa@nope", actor="x", reason="y")
    with pytest.raises(RegistryError):
        reg.set_status(a.ref, "great", actor="x", reason="y")

    # Two writers at once: every update lands, nothing is overwritten.
    refs = []

    def writer(i):
        v = reg.register(AdapterVersion("vqa", new_version(), f"p{i}", "base"), actor=f"w{i}")
        reg.set_status(v.ref, "rejected", actor=f"w{i}", reason=f"test {i}")
        refs.append(v.ref)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    st = reg.state()
    assert len(reg.versions("vqa")) == 10 and all(st.statuses[r] == "rejected" for r in refs)
    assert len(reg.history()) == 2 + 2 + 3 + 16  # registered, alias moves with status/retire events


def test_evaluation_metrics():
    from vloop.learn.evaluation import scores, token_f1

    assert token_f1("a red shoe", "red shoe") == pytest.approx(0.8)
    assert token_f1("红色", "红色") == 1.0 and token_f1("蓝色", "红色") == pytest.approx(0.5)
    s = scores(["red", "blue", "红色"], ["red", "green", "红色"])
    assert s["exact_match"] == pytest.approx(2 / 3) and s["rouge_l"] == pytest.approx(2 / 3)
    assert 0 < s["bleu"] <= 1


def write_labels(lake, day, samples, answers=None, verdict="wrong", **extra) -> pd.DataFrame:
    """What the daily DAG's pull would have written: finished annotations of ``samples``."""
    rows = []
    for i, s in enumerate(samples):
        img = lake.put_image(s.image_bytes())
        rows.append({"request_id": f"{day}-{s.id}", "task_id": i, "annotation_id": i, "image_key": img.key,
                     "question": s.question, "model_answer": "?", "corrected_answer": (answers or {}).get(i, s.answer),
                     "verdict": verdict, "image_quality": "good", "annotator": "1", "lead_time_s": 5.0,
                     "created_at": pd.Timestamp.now(tz="UTC"), "updated_at": pd.Timestamp.now(tz="UTC"),
                     "category": s.category, "model_version": "base", "base_model": "base", "adapter": None,
                     "arm": "champion", "confidence": 0.3, "weak_label": "negative", "selected_on": str(day), **extra})
    df = pd.DataFrame(rows)
    daily.put_frame(lake, daily.key(daily.LABELED, day, daily.LABELED_FILE), df)
    # The users of the labelled requests, where the dataset builder looks them up (the day's
    # curated interactions); without them the labels would be dropped as of unknown users.
    parts = daily.part_keys(lake, daily.CURATED, day, "interactions.parquet")  # a day processed by slices
    k = parts[min(parts)] if parts else daily.key(daily.CURATED, day, "interactions.parquet")
    users = pd.DataFrame({"request_id": df["request_id"], "user_key": [f"shopper-{i % 7}" for i in range(len(df))]})
    if lake.exists(k):
        users = pd.concat([daily.get_frame(lake, k), users], ignore_index=True)
    daily.put_frame(lake, k, users)
    return df


def test_dataset_builder(local_lake):
    from vloop.sim.traffic import simulated_day
    from vloop.privacy import record_opt_out

    lake = local_lake
    simulated_day(lake, DAY, 400, seed=11)
    for step in (lambda: daily.ingest(lake, DAY, dt.datetime(2026, 11, 21, 1, tzinfo=dt.timezone.utc)),
                 lambda: daily.validate(lake, DAY), lambda: daily.mine_feedback(lake, DAY),
                 lambda: daily.score_confidence(lake, DAY), lambda: daily.check_images(lake, DAY)):
        step()
    samples = World(5).samples(60, colours=("white", "yellow"), intents=("colour",))
    labels = write_labels(lake, DAY, samples[:50])
    write_labels(lake, DAY + dt.timedelta(days=1), samples[50:], verdict="unclear")
    golden = ensure_golden(lake, samples=golden_samples(50))  # the simulation's golden set
    # A label that duplicates a golden example must never reach training.
    g = World(GOLDEN_SEED).sample(0)
    write_labels(lake, DAY + dt.timedelta(days=2), [g])
    record_opt_out(lake, "someone")  # nobody in this data: excludes nothing

    m = build_dataset(lake, DatasetConfig(replay_ratio=1.0, golden_size=50), today=DAY + dt.timedelta(days=2))
    train = daily.get_frame(lake, f"datasets/{m['id']}/train.parquet")
    held = daily.get_frame(lake, f"datasets/{m['id']}/heldout.parquet")
    assert m["examples"]["golden"] == len(golden) == 50
    assert m["dropped"]["unclear or empty label"] == 10 and m["dropped"]["in the golden set"] == 1
    labelled = set(labels["request_id"])
    assert len(held) + (train["source"] == "label_corrected").sum() == 50
    assert 3 <= len(held) <= 20 and set(held["request_id"]) <= labelled
    replay = train[train["source"] == "replay"]
    assert 30 <= len(replay) <= 50  # ~1 replay example per label
    assert not (train["image_sha256"] + train["question"]).duplicated().any()
    assert set(train["example_id"]).isdisjoint(golden["example_id"])
    assert m["by_intent"]["('train', 'colour')"] >= 30 and m["content_sha256"]
    # Same inputs, same dataset.
    assert build_dataset(lake, DatasetConfig(replay_ratio=1.0, golden_size=50), today=DAY + dt.timedelta(days=2))["id"] == m["id"]


def test_training_job_killed_midway_resumes(local_lake, base_model_dir, tmp_path):
    lake = local_lake
    samples = World(5).samples(64, colours=("white", "yellow"), intents=("colour",))
    write_labels(lake, DAY, samples)
    m = build_dataset(lake, DatasetConfig(replay_ratio=0, golden_size=40), today=DAY, golden_samples=golden_samples(40))
    cfg = {"dataset_id": m["id"], "base_model": str(base_model_dir), "version": "v1", "adapter_name": "vqa",
           "lake_url": lake.root.as_uri(), "work_dir": str(tmp_path / "work"), "checkpoint_every": 5,
           "lora": {"steps": 40, "batch_size": 8, "log_every": 5}}
    (tmp_path / "job.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "training", "--config", str(tmp_path / "job.json")]
    ckpt = tmp_path / "work" / "vqa" / "v1" / "checkpoint.pt"
    from vloop.services import Service

    # Up once its first checkpoint is written; then killed, as a preempted GPU node would be.
    job = Service("train", cmd + ["--stage", "train"], log_file=tmp_path / "train.log")
    job.start(health=ckpt.exists, timeout=300, poll=0.2)
    job.stop(signal.SIGKILL)
    assert not lake.exists("adapters/vqa/v1/adapter_config.json")  # nothing published by the killed run
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from the checkpoint at step" in done.stderr
    for f in ("adapter_config.json", "adapter_model.safetensors", "training.json", "loss.png", "metrics.json", "README.md"):
        assert lake.exists(f"adapters/vqa/v1/{f}"), f
    metrics = lake.get_json("adapters/vqa/v1/metrics.json")
    held = metrics["sets"]["heldout"]
    # The labels teach the unseen colours: the candidate beats the base on them.
    assert held["candidate"]["overall"]["exact_match"] > held["champion"]["overall"]["exact_match"] + 0.3
    assert set(metrics["sets"]["golden"]["candidate"]["by_intent"]) >= {"colour"}
    # Per-item results for the gate's paired test, aligned by example_id, agreeing with the scores.
    for name, by_who in metrics["sets"].items():
        paired = metrics["paired"][name]
        assert len(paired["example_id"]) == len(paired["candidate_correct"]) == len(paired["champion_correct"]) \
            == by_who["candidate"]["overall"]["n"]
        for who in ("candidate", "champion"):
            assert sum(paired[f"{who}_correct"]) / len(paired["example_id"]) == \
                pytest.approx(by_who[who]["overall"]["exact_match"])
    assert sorted(metrics["paired"]["golden"]["example_id"]) == sorted(load_split(lake, m["id"], "golden")["example_id"])
    card = lake.get_bytes("adapters/vqa/v1/README.md").decode()
    assert m["id"] in card and "exact match" in card
    # The published adapter loads with PEFT.
    from peft import PeftConfig

    from vloop.store.lake import fetch_files

    local = fetch_files(lake, lake.list("adapters/vqa/v1/"), tmp_path / "check")
    assert PeftConfig.from_pretrained(local).r == 8
    # A retry of the train stage after its upload succeeded reuses the upload.
    weights = lake.get_bytes("adapters/vqa/v1/adapter_model.safetensors")
    again = subprocess.run(cmd + ["--stage", "train"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reusing it" in again.stderr, again.stderr[-2000:]
    assert lake.get_bytes("adapters/vqa/v1/adapter_model.safetensors") == weights
