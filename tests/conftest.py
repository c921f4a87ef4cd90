"""Shared fixtures. The S3 backend is tested against moto's S3 server on loopback (a real
S3-protocol HTTP server; no MinIO server can be installed here), through the same `minio` client
that talks to MinIO in production."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Airflow keeps its home (config, SQLite DB) under var/, never in the user's ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / "var" / "airflow-test"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from vloop.config import load_settings  # noqa: E402
from vloop.lake import LocalLake, S3Lake  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the whole session; yields its http:// endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


S3_KEYS = {"access_key": "test-access", "secret_key": "test-secret"}


@pytest.fixture
def s3_lake(s3_endpoint):
    """A fresh bucket per test, so tests never see each other's objects."""
    limits = dict(max_image_bytes=2 * 2**20, max_image_pixels=1024 * 1024)
    return S3Lake(f"vloop-{uuid.uuid4().hex[:12]}", "lake", endpoint=s3_endpoint, **S3_KEYS, **limits)


@pytest.fixture
def local_lake(tmp_path):
    return LocalLake(tmp_path / "lake", max_image_bytes=2 * 2**20, max_image_pixels=1024 * 1024)


@pytest.fixture(params=["local", "s3"])
def lake(request):
    """The lake suite runs once per backend."""
    return request.getfixturevalue(f"{request.param}_lake")


@pytest.fixture
def settings():
    return load_settings({})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Qwen3-VL, built once per session (a few seconds)."""
    from vloop.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model pretrained into the mediocre champion (about 2 minutes on 2 cores)."""
    from vloop.pretrain import pretrain_base

    out = tmp_path_factory.mktemp("base") / "model"
    pretrain_base(tiny_model_dir, out, log=lambda line: None)
    return out
