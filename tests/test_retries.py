"""Retries are safe: a training job retried after its upload succeeded reuses it, and registering
the same version again is a no-op (on the S3 lake, a real SeaweedFS server)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.test_training import DAY, write_labels
from training.job import TrainJob, train
from training.lora import LoraTrainConfig
from vloop.learn.dataset import DatasetConfig, build_dataset
from vloop.learn.registry import AdapterVersion, Registry, RegistryError
from vloop.sim.synth import World, golden_samples


def test_train_retried_after_its_upload_reuses_it(s3_lake, s3_endpoint, tiny_model_dir, tmp_path, monkeypatch):
    from tests.conftest import S3_KEYS

    lake = s3_lake
    # The training job opens the lake from its URL and the VLOOP_S3_* settings, as in the DAG.
    monkeypatch.setenv("VLOOP_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("VLOOP_S3_ACCESS_KEY", S3_KEYS["access_key"])
    monkeypatch.setenv("VLOOP_S3_SECRET_KEY", S3_KEYS["secret_key"])
    write_labels(lake, DAY, World(5).samples(16, colours=("white",), intents=("colour",)))
    m = build_dataset(lake, DatasetConfig(replay_ratio=0, golden_size=8), today=DAY, golden_samples=golden_samples(8))
    job = TrainJob(dataset_id=m["id"], base_model=str(tiny_model_dir), version="v1", lake_url=lake.url,
                   work_dir=str(tmp_path / "work"), lora=LoraTrainConfig(steps=2, batch_size=4, log_every=1))
    first = train(job)
    assert "reused" not in first and lake.exists("adapters/vqa/v1/adapter_config.json")
    published = {k: lake.get_bytes(k) for k in lake.list("adapters/vqa/v1/")}
    again = train(job)  # the task retried: its first try's answer was lost after the upload
    assert again["reused"] and again["adapter"] == first["adapter"] == "vqa@v1"
    assert {k: lake.get_bytes(k) for k in lake.list("adapters/vqa/v1/")} == published
    other = dataclasses.replace(job, lora=LoraTrainConfig(steps=3, batch_size=4))
    with pytest.raises(FileExistsError, match="another training job"):
        train(other)


def test_register_retried_is_a_no_op(s3_lake):
    reg = Registry(s3_lake)
    v = AdapterVersion("vqa", "v20261120T000000-abcdef", "adapters/vqa/v20261120T000000-abcdef/", "base",
                       dataset_id="ds-1", dataset_hash="h1", metrics={"em": 0.7})
    first = reg.register(dataclasses.replace(v), actor="retrain_biweekly", reason="trained")
    events = reg.history()
    again = reg.register(dataclasses.replace(v), actor="retrain_biweekly", reason="trained")
    assert again == first and reg.history() == events  # nothing new: no second candidate event
    assert [e["status"] for e in events if e.get("ref") == v.ref] == ["candidate"]
    with pytest.raises(RegistryError, match="another adapter"):
        reg.register(dataclasses.replace(v, path="adapters/vqa/elsewhere/", created_at=""), actor="x")
