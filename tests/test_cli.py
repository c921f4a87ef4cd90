"""The `vloop` command and the demo, run as a user would (subprocess, real lake)."""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.simdays import model_answered_day, verify_day
from vloop.store.lake import FEEDBACK_DATASET, partition_prefix
from vloop.store.lake import INTERACTIONS_DATASET as INTERACTIONS
from vloop.store.schema import INTERACTION

ROOT = Path(__file__).resolve().parents[1]


def vloop(*args, env=None, check=True, timeout=300):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("VLOOP_", "AIRFLOW"))}
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "vloop.cli", *args], capture_output=True, text=True,
                       env=e, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_help_lists_the_commands_that_exist():
    out = vloop("--help").stdout
    for cmd in ("config", "lake", "tiny-model", "pretrain-base", "serve", "demo"):
        assert f"    {cmd}" in out


def test_demo_help_states_the_demo_defaults():
    """`vloop demo --help` names the defaults LoopConfig has (the CLI does not import it for --help)."""
    from vloop.sim.demo_loop import LoopConfig

    out = " ".join(vloop("demo", "--help").stdout.split())
    for flag, default in (("--rounds ROUNDS", LoopConfig.rounds), ("--users-per-day USERS_PER_DAY", LoopConfig.users_per_day),
                          ("--label-days LABEL_DAYS", LoopConfig.label_days), ("--seed SEED", LoopConfig.seed)):
        assert re.search(rf"{flag} [^-]*\(default {default}\)", out), (flag, out)


@pytest.mark.parametrize("args, says", [(["--users-per-day", "0"], "must be at least 1"),
                                        (["--rounds", "-1"], "must be at least 1"),
                                        (["--users-per-day", "601"], "users_per_day must be 1..600")])
def test_demo_refuses_impossible_sizes_before_starting_anything(tmp_path, args, says):
    r = vloop("demo", *args, env={"VLOOP_HOME": str(tmp_path)}, check=False)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "models").exists()  # nothing started or built


def test_config_masks_secrets(tmp_path):
    out = vloop("config", env={"VLOOP_HOME": str(tmp_path), "VLOOP_ADMIN_TOKEN": "s3cret-value"}).stdout
    assert "s3cret-value" not in out and "VLOOP_ADMIN_TOKEN" in out
    assert (tmp_path / "lake").as_uri() in out


def test_bad_lake_url_is_a_clear_error():
    r = vloop("lake", "ls", env={"VLOOP_LAKE_URL": "gs://bucket/x"}, check=False)
    assert r.returncode == 2
    assert "'gs://bucket/x' is not supported" in r.stderr and "Traceback" not in r.stderr


def test_lake_check_and_ls(tmp_path, s3_endpoint):
    from tests.conftest import S3_KEYS

    env = {"VLOOP_LAKE_URL": "s3://vloop-cli/x", "VLOOP_S3_ENDPOINT": s3_endpoint,
           "VLOOP_S3_ACCESS_KEY": S3_KEYS["access_key"], "VLOOP_S3_SECRET_KEY": S3_KEYS["secret_key"]}
    assert "s3://vloop-cli/x/: ok" in vloop("lake", "check", env=env).stdout
    assert vloop("lake", "ls", env=env).stdout == ""  # the probe was removed


@pytest.mark.timeout(1800)  # the base model's pretraining (a session fixture) may run inside it
def test_demo_runs_the_whole_loop_on_real_services(tmp_path, base_model_dir):
    """`vloop demo`, shortened (one round, small numbers), as a user runs it: real Label Studio and
    serving started and stopped by the demo, the DAGs with dag.test(), simulated shoppers through
    the gateway, a simulated annotator through Label Studio's API."""
    env = {"VLOOP_HOME": str(tmp_path), "VLOOP_BASE_MODEL": str(base_model_dir),
           "VLOOP_LABEL_STUDIO_PORT": str(free_port()), "VLOOP_SERVING_PORT": str(free_port())}
    out = vloop("demo", "--rounds", "1", "--users-per-day", "60", "--label-days", "1", env=env, timeout=1500).stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT rounds=1 promoted="), out[-3000:]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert 0 <= float(fields["accept_before"]) <= 1 and 0 <= float(fields["accept_after"]) <= 1
    for step in ("traffic via gateway", "feedback_daily (dag.test)", "simulated annotator (LS API)",
                 "retrain_biweekly (dag.test)", "held-out exact match"):
        assert step in out, step
    # The last labelling day's annotations were pulled (feedback_daily's pull task alone) before training.
    assert re.search(r"pull the last annotations .*tasks=success:1$", out, re.MULTILINE), out[-3000:]
    assert "Calculating Metrics" not in out  # no third-party progress bars
    from vloop.store.lake import LocalLake

    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**22, max_image_pixels=2**22)
    assert lake.list("reports/loop/") and lake.list("labeled/")  # the annotator's work came back
    from vloop.learn.registry import Registry

    assert Registry(lake).versions()  # an adapter was trained and registered
    assert not list((tmp_path / "run").glob("*.pid"))  # the demo stopped what it started
    # Simulated traffic went through the gateway: every interaction has a spool-shipped segment file.
    assert all("/hour=" in k for k in lake.list("raw/interactions/"))


def test_a_model_answered_day_reads_back_from_the_lake(local_lake, base_model_dir):
    """The base model's answers to a day of users go to the lake and come back whole; the figures
    (acceptance, arms, files) are computed from what was read back, and a lost partition is caught."""
    from vloop.vlm.model import load_model

    day = dt.date(2026, 11, 4)
    written = model_answered_day(local_lake, load_model(str(base_model_dir)), day, n=40, seed=3, log=lambda line: None)
    figures = verify_day(local_lake, day, written["request_ids"], out=lambda line: None)
    table = local_lake.read_partitions(INTERACTIONS, day, schema=INTERACTION.arrow)
    assert figures["interactions"] == table.num_rows == 40
    assert sum(figures["arms"].values()) == 40
    assert figures["files"] == len(local_lake.list(partition_prefix(INTERACTIONS, day)))
    fb = local_lake.read_partitions(FEEDBACK_DATASET, day)
    assert figures["feedback"] == fb.num_rows
    accepted = set(r for r, t in zip(fb.column("request_id").to_pylist(), fb.column("type").to_pylist())
                   if t == "accept")  # acceptance is an accept event (vloop.curate.report.outcome_flags), not dwell
    assert figures["acceptance"] == pytest.approx(len(accepted) / 40)
    # The answers are the model's own: their logprobs are stored and confidence follows from them.
    t = local_lake.read_partitions(INTERACTIONS, day, columns=["token_logprobs", "confidence"])
    for lps, c in zip(t.column("token_logprobs").to_pylist(), t.column("confidence").to_pylist()):
        assert lps and all(lp <= 0 for lp in lps)
        assert c == pytest.approx(math.exp(sum(lps) / len(lps)), rel=1e-5)
    ids = table.column("request_id").to_pylist()
    # Lose an hour's partition: the read-back check must say so, not report success.
    local_lake.delete(local_lake.list(partition_prefix(INTERACTIONS, day))[0])
    with pytest.raises(RuntimeError, match="expected 40"):
        verify_day(local_lake, day, ids, out=lambda line: None)


def test_secrets_ensure_generates_once_privately_and_the_environment_wins(tmp_path):
    from vloop.store.secretfile import STACK_SECRETS, read_secrets

    f = tmp_path / "home" / "secrets.env"
    unset = {name: "" for name in STACK_SECRETS}  # an empty variable counts as unset
    first = vloop("secrets", "ensure", "--file", str(f), env=unset).stdout
    values = read_secrets(f)
    assert set(values) == set(STACK_SECRETS) and all(len(v) >= 40 for v in values.values())
    assert f.stat().st_mode & 0o777 == 0o600
    assert str(f) in first and not any(v in first for v in values.values())  # where, never what
    f.chmod(0o644)
    again = vloop("secrets", "ensure", "--file", str(f), env=unset).stdout
    assert read_secrets(f) == values and "generated" not in again  # reused on the next start
    assert f.stat().st_mode & 0o777 == 0o600
    # A value set in the environment wins and is not written to the file.
    g = tmp_path / "other.env"
    out = vloop("secrets", "ensure", "--file", str(g), env={**unset, "VLOOP_ADMIN_TOKEN": "mine"}).stdout
    assert "VLOOP_ADMIN_TOKEN from the environment" in out
    assert "VLOOP_ADMIN_TOKEN" not in read_secrets(g) and "mine" not in g.read_text()


def test_stack_secrets_step_writes_under_vloop_home(tmp_path):
    """`bin/stack up` runs this step before starting anything (`bin/stack secrets` runs only it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLOOP_", "LABEL_STUDIO_"))}
    r = subprocess.run([str(ROOT / "bin" / "stack"), "secrets"], capture_output=True, text=True, timeout=120,
                       env={**env, "VLOOP_HOME": str(tmp_path), "LABEL_STUDIO_PASSWORD": "chosen-by-me"})
    assert r.returncode == 0, r.stderr
    f = tmp_path / "secrets.env"
    assert f.stat().st_mode & 0o777 == 0o600 and str(f) in r.stdout
    assert "LABEL_STUDIO_PASSWORD from the environment" in r.stdout and "chosen-by-me" not in f.read_text()
