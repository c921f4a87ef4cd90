"""`make up` (bin/stack) binds every service to loopback unless VLOOP_BIND_HOST says otherwise.

The stack is started as `make up` starts it (Label Studio, serving on the tiny model, Airflow
standalone) in a temporary VLOOP_HOME on free ports, and the listening sockets of every process of
its process groups are listed. On the previous main this failed twice over: Label Studio listened
on 0.0.0.0 (its `--host` names the server in URLs, `--internal-host` is the bind address), and
Airflow's scheduler and triggerer ran their log servers on every interface (:8793, :8794)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def stack_processes(run_dir: Path) -> list[psutil.Process]:
    """Every process in the process groups bin/stack started (setsid: pid = pgid)."""
    groups = {int(p.read_text()) for p in run_dir.glob("*.pid")}
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def listeners(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the processes listen on."""
    found = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((" ".join(p.cmdline()[:3])[-60:], c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return found


def test_make_up_listens_on_loopback_only(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VLOOP_", "LABEL_STUDIO_"))}
    env.update(VLOOP_HOME=str(home), VLOOP_BASE_MODEL=str(tiny_model_dir), VLOOP_LABEL_STUDIO_PORT=str(free_port()),
               VLOOP_SERVING_PORT=str(free_port()), VLOOP_AIRFLOW_PORT=str(free_port()))
    try:
        up = subprocess.run([str(ROOT / "bin" / "stack"), "up"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=480)
        assert up.returncode == 0, up.stdout + up.stderr
        # The API server answering comes before the scheduler and triggerer start (and, on the
        # previous main, their log servers): wait until both run, then a little longer.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            names = " ".join(" ".join(p.cmdline()) for p in stack_processes(home / "run") if p.is_running())
            if "scheduler" in names and "triggerer" in names:
                break
            time.sleep(2)
        time.sleep(20)
        found = listeners(stack_processes(home / "run"))
        ports = {port for _, _, port in found}
        for name in ("VLOOP_LABEL_STUDIO_PORT", "VLOOP_SERVING_PORT", "VLOOP_AIRFLOW_PORT"):
            assert int(env[name]) in ports, (name, found)  # the listing sees every service
        wide = sorted(f for f in found if f[1] not in ("127.0.0.1", "::1"))
        assert not wide, f"listening beyond loopback: {wide}"
    finally:
        subprocess.run([str(ROOT / "bin" / "stack"), "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)
