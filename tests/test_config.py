from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import S3_KEYS
from vloop.store.config import ConfigError, Settings, load_settings
from vloop.store.lake import LakeConfigError, LakeUnavailable, LocalLake, S3Lake, lake_from_connection, open_lake

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_derive_from_home(tmp_path):
    s = load_settings({"VLOOP_HOME": str(tmp_path)})
    assert s.lake_url == (tmp_path / "lake").as_uri()
    assert s.spool_dir == tmp_path / "spool"
    assert s.max_image_pixels == 4096 * 4096
    assert s.admin_token is None


def test_environment_overrides_and_secrets_are_masked():
    s = load_settings({"VLOOP_LAKE_URL": "s3://b/p", "VLOOP_ADMIN_TOKEN": "hunter2-token",
                       "VLOOP_MAX_IMAGE_BYTES": "1024", "VLOOP_SPOOL_DIR": "/tmp/sp"})
    assert s.lake_url == "s3://b/p" and s.max_image_bytes == 1024 and str(s.spool_dir) == "/tmp/sp"
    assert s.admin_token == "hunter2-token"
    assert "hunter2" not in repr(s)
    assert ("VLOOP_ADMIN_TOKEN", "****", "bearer token for serving's admin routes") in s.describe()


@pytest.mark.parametrize("env, message", [
    ({"VLOOP_MAX_IMAGE_BYTES": "ten"}, "not an integer"),
    ({"VLOOP_MAX_IMAGE_PIXELS": "-5"}, "must be positive"),
])
def test_bad_settings_are_named(env, message):
    with pytest.raises(ConfigError, match=f"{list(env)[0]}.*{message}"):
        load_settings(env)


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(VLOOP_[A-Z0-9_]+)`", readme))
    declared = {f.metadata["env"] for f in Settings.__dataclass_fields__.values()}
    assert declared <= documented, f"undocumented: {sorted(declared - documented)}"


@pytest.mark.parametrize("url, message", [
    ("ftp://host/x", "not supported"),
    ("lake", "not supported"),
    ("file://relative/dir", "absolute path"),
    ("s3:///prefix", "needs a bucket"),
    ("s3://Bad_Bucket/x", "not a valid bucket name"),
])
def test_invalid_lake_urls(url, message, tmp_path):
    with pytest.raises(LakeConfigError, match=message):
        open_lake(settings=load_settings({"VLOOP_LAKE_URL": url, "VLOOP_S3_ENDPOINT": "localhost:9000"}))
    assert list(tmp_path.iterdir()) == []


def test_s3_lake_needs_an_endpoint():
    with pytest.raises(LakeConfigError, match="needs an endpoint"):
        open_lake("s3://bucket/x", settings=load_settings({}))
    with pytest.raises(LakeConfigError, match="host:port"):
        open_lake("s3://bucket/x", settings=load_settings({"VLOOP_S3_ENDPOINT": "ftp://h:1/x"}))


def test_open_lake_from_settings(tmp_path, s3_endpoint):
    local = open_lake(settings=load_settings({"VLOOP_LAKE_URL": (tmp_path / "l").as_uri()}))
    assert isinstance(local, LocalLake) and local.root == tmp_path / "l"
    s3 = open_lake(settings=load_settings({
        "VLOOP_LAKE_URL": "s3://vloop-settings/pre/fix", "VLOOP_S3_ENDPOINT": s3_endpoint,
        "VLOOP_S3_ACCESS_KEY": S3_KEYS["access_key"], "VLOOP_S3_SECRET_KEY": S3_KEYS["secret_key"]}))
    assert isinstance(s3, S3Lake) and s3.url == "s3://vloop-settings/pre/fix/"
    s3.put_bytes("x/y", b"1")
    assert s3.client.stat_object("vloop-settings", "pre/fix/x/y").size == 1


def test_unreachable_s3_fails_fast_with_a_clear_error():
    from tests.conftest import free_port

    lake = open_lake("s3://vloop-down/x", settings=load_settings({
        "VLOOP_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(LakeUnavailable, match="cannot reach the lake"):
        lake.put_bytes("a", b"1")


def test_airflow_settings_declare_the_connections_without_secrets():
    cfg = yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]
    conns = {c["conn_id"]: c for c in cfg["connections"]}
    assert set(conns) == {"vloop_lake", "vloop_label_studio", "vloop_serving"}
    assert all(not c.get("conn_password") for c in conns.values()), "secrets belong in the environment"
    variables = {v["variable_name"] for v in cfg["variables"]}
    assert {"vloop_label_budget", "vloop_low_confidence", "vloop_rollout_stages"} <= variables


def test_lake_hook_reads_an_airflow_connection(monkeypatch, s3_endpoint, tmp_path):
    """The plugin's hook resolves AIRFLOW_CONN_VLOOP_LAKE through Airflow's own secrets chain."""
    import json

    from vloop_hooks import LakeHook

    port = s3_endpoint.rsplit(":", 1)[1]
    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({
        "conn_type": "generic", "host": "127.0.0.1", "port": int(port), "login": S3_KEYS["access_key"],
        "password": S3_KEYS["secret_key"], "extra": {"lake_url": "s3://vloop-hook/day", "secure": False}}))
    lake = LakeHook().get_lake()
    assert isinstance(lake, S3Lake) and lake.endpoint == f"127.0.0.1:{port}"
    lake.put_bytes("k", b"v")
    assert lake.get_bytes("k") == b"v"

    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({
        "conn_type": "generic", "extra": {"lake_url": (tmp_path / "lake").as_uri()}}))
    assert isinstance(LakeHook().get_lake(), LocalLake)


def test_connection_without_lake_url_is_refused():
    class Conn:
        conn_id, host, port, login, password, extra_dejson = "c", None, None, None, None, {}

    with pytest.raises(LakeConfigError, match="no 'lake_url'"):
        lake_from_connection(Conn())
