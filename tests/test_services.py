"""vloop.services, the one service runner, on real processes: a tiny HTTP server on a free
loopback port, a parent that forks a child which ignores SIGINT, processes that die or hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port
from vloop.services import AlreadyRunning, Service, ServiceError, _env_default_sigint, http_ok, run_streaming


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting to be reaped has ended), judged by psutil, not by
    the module under test."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def services_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vloop.services", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture
def web(tmp_path):
    """A python http.server under tmp_path/home, started by the runner and stopped after the test."""
    port = free_port()
    service = Service.under_home("web", http_server(port), tmp_path / "home", cwd=tmp_path)
    service.url = f"http://127.0.0.1:{port}/"
    yield service
    service.stop(grace=2)


def test_start_waits_for_health_and_records_the_pid(web, tmp_path):
    assert not http_ok(web.url)
    web.start(health_url=web.url, timeout=30)
    assert http_ok(web.url)  # start() returned only once it answered
    pid_file = tmp_path / "home" / "run" / "web.pid"
    assert int(pid_file.read_text().split()[0]) == web.proc.pid == web.pid
    assert os.getpgid(web.proc.pid) == web.proc.pid  # its own process group
    assert os.getpgid(web.proc.pid) != os.getpgrp()
    assert (tmp_path / "home" / "log" / "web.log").exists()

    # A second copy under the same name is refused while the first runs, and leaves it running.
    again = Service.under_home("web", http_server(free_port()), tmp_path / "home")
    with pytest.raises(AlreadyRunning, match=str(web.proc.pid)):
        again.start(timeout=5)
    assert again.proc is None and http_ok(web.url)
    assert int(pid_file.read_text().split()[0]) == web.proc.pid

    assert web.stop(grace=5) is True
    assert gone(web.proc.pid) and not pid_file.exists() and not http_ok(web.url)


def test_a_stale_pid_file_does_not_block_a_start(web, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = tmp_path / "home" / "run" / "web.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{dead.pid}\n")
    web.start(health_url=web.url, timeout=30)
    assert int(pid_file.read_text().split()[0]) == web.proc.pid != dead.pid


def test_a_pid_file_naming_another_process_now_is_stale(web, tmp_path):
    """After a reboot the PID in a PID file may be some unrelated process: its start time differs
    from the recorded one, so it is neither signalled nor taken for the service."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pid_file = tmp_path / "home" / "run" / "web.pid"
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{other.pid} 1\n")  # its PID, but a start time from another boot
        assert web.pid is None and web.stop(grace=1) is False
        assert not gone(other.pid)  # not signalled
        web.start(health_url=web.url, timeout=30)
        ticks = Path(f"/proc/{web.proc.pid}/stat").read_text().rpartition(")")[2].split()[19]  # field 22
        assert pid_file.read_text().split() == [str(web.proc.pid), ticks]
    finally:
        other.kill()
        other.wait()


def test_a_port_already_answering_fails_the_start_instead_of_passing_its_check(web, tmp_path):
    """An earlier instance left on the port (or another program) would answer the new one's health
    check: the start is refused with a clear error, and nothing is left running."""
    web.start(health_url=web.url, timeout=30)
    port = web.url.rsplit(":", 1)[1].strip("/")
    second = Service.under_home("web-copy", http_server(int(port)), tmp_path / "home2")
    with pytest.raises(ServiceError, match="already answers at"):
        second.start(health_url=web.url, timeout=10)
    assert second.proc is None and not (tmp_path / "home2" / "run" / "web-copy.pid").exists()
    assert http_ok(web.url)


def test_stop_by_pid_file_ends_the_whole_group_even_a_child_ignoring_sigint(tmp_path):
    """Started here, stopped from another process that only has the PID file (as `bin/stack down`
    does): SIGINT, then SIGKILL for the child that ignores it."""
    child_pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)"])
        open({str(child_pid_file)!r}, "w").write(str(child.pid))
        print("ready", flush=True)
        time.sleep(300)
    """)
    home = tmp_path / "home"
    service = Service.under_home("family", [sys.executable, "-c", parent], home)
    try:
        service.start(health_log=r"^ready$", timeout=30)
        child = int(child_pid_file.read_text())
        assert not gone(child) and os.getpgid(child) == service.proc.pid  # the child is in the group

        t0 = time.monotonic()
        r = services_cli("stop", "family", "--home", str(home), "--grace", "1")
        assert r.returncode == 0 and r.stdout.strip() == "family: stopped", r.stdout + r.stderr
        assert gone(service.proc.pid) and gone(child)
        assert time.monotonic() - t0 < 30
        assert not (home / "run" / "family.pid").exists()
        assert service.proc.wait(5) is not None  # the parent ended (on SIGINT)
    finally:
        service.stop(grace=1)


@pytest.mark.skipif(not _env_default_sigint(), reason="needs GNU env --default-signal (coreutils >= 8.31)")
def test_a_service_started_from_a_background_job_still_stops_on_sigint(tmp_path):
    """A shell's background job (CI, nohup, `make up &`) runs with SIGINT ignored, and a child
    inherits that: the service is started with SIGINT at its default again, so stop() ends it with
    SIGINT at once, not with SIGKILL after the grace period."""
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        service = Service("bg", [sys.executable, "-c", "import signal, time; print(signal.getsignal(signal.SIGINT), "
                                 "flush=True); time.sleep(300)"], log_file=tmp_path / "bg.log", grace=30)
        service.start(health_log=r"default_int_handler", timeout=30)
    finally:
        signal.signal(signal.SIGINT, saved)
    t0 = time.monotonic()
    assert service.stop()
    assert time.monotonic() - t0 < 10  # the grace period (30 s) was not waited out
    assert service.proc.wait(5) == -signal.SIGINT  # ended by SIGINT (an uncaught KeyboardInterrupt), not SIGKILL


def test_a_process_that_exits_early_fails_naming_its_log(tmp_path):
    home = tmp_path / "home"
    # An old run's lines in the (appended) log are not this start's tail.
    (home / "log").mkdir(parents=True)
    (home / "log" / "broken.log").write_text("an earlier run\n")
    service = Service.under_home("broken", [sys.executable, "-c",
                                            "import sys; print('boom: no config file'); sys.exit(3)"], home)
    with pytest.raises(ServiceError) as e:
        service.start(health_url=f"http://127.0.0.1:{free_port()}/", timeout=30)
    message = str(e.value)
    assert "broken failed (exit code 3)" in message
    assert str(home / "log" / "broken.log") in message and "boom: no config file" in message
    assert "an earlier run" not in message
    assert not (home / "run" / "broken.pid").exists()


def test_a_process_that_never_gets_healthy_times_out_and_is_stopped(tmp_path):
    calls = []

    def never() -> bool:
        calls.append(1)
        return False

    service = Service("hang", [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(300)"],
                      log_file=tmp_path / "hang.log")
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match=r"hang did not answer in 1 s; see .*hang\.log"):
        service.start(health=never, timeout=1, poll=0.1)
    assert 1 <= time.monotonic() - t0 < 20 and len(calls) >= 3
    assert gone(service.proc.pid)  # not left running after the failed start


def test_a_callable_health_check_decides_when_it_is_up(tmp_path):
    answers = iter([False, False, True])
    service = Service("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], log_file=tmp_path / "s.log")
    try:
        service.start(health=lambda: next(answers), timeout=30, poll=0.05)
        assert next(answers, "used up") == "used up" and service.running()
    finally:
        service.stop(grace=2)
    assert not service.running()


def test_the_command_line_round_trip(tmp_path):
    home, port = tmp_path / "home", free_port()
    url = f"http://127.0.0.1:{port}/"
    start = ["start", "web", "--home", str(home), "--health-url", url, "--timeout", "30", "--", *http_server(port)]
    try:
        r = services_cli(*start)
        assert r.returncode == 0, r.stderr
        pid = int(r.stdout)
        assert http_ok(url) and int((home / "run" / "web.pid").read_text().split()[0]) == pid

        r = services_cli("status", "web", "--home", str(home))
        assert r.returncode == 0 and f"pid {pid}" in r.stdout
        r = services_cli(*start)
        assert r.returncode == 1 and "web already runs" in r.stderr

        r = services_cli("stop", "web", "--home", str(home), "--grace", "5")
        assert r.stdout.strip() == "web: stopped" and gone(pid) and not http_ok(url)
        r = services_cli("status", "web", "--home", str(home))
        assert r.returncode == 1 and r.stdout.strip() == "web: not running"
        assert services_cli("stop", "web", "--home", str(home)).stdout.strip() == "web: not running"

        # A health line in the log, and a failure reported with the log's end, exit code 1.
        r = services_cli("start", "echo", "--home", str(home), "--health-log", "^up on", "--", sys.executable, "-c",
                         "import time; print('up on 1234', flush=True); time.sleep(300)")
        assert r.returncode == 0, r.stderr
        assert services_cli("stop", "echo", "--home", str(home), "--grace", "2").stdout.strip() == "echo: stopped"
        r = services_cli("start", "bad", "--home", str(home), "--health-log", "^up on", "--", sys.executable, "-c",
                         "raise SystemExit('cannot bind')")
        assert r.returncode == 1 and "bad failed (exit code 1)" in r.stderr and "cannot bind" in r.stderr
    finally:
        for name in ("web", "echo"):
            services_cli("stop", name, "--home", str(home), "--grace", "2")


def test_run_streaming_echoes_stderr_while_the_child_runs(tmp_path):
    """The child writes a line to stderr, then waits for the echo of that line (a file the echo
    creates) before it finishes: it exits 0 only if its stderr was passed on while it ran."""
    seen = tmp_path / "seen"
    child = textwrap.dedent(f"""
        import os, sys, time
        print("step 1 loss 0.5", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 20
        while not os.path.exists({str(seen)!r}):
            if time.monotonic() > deadline:
                sys.exit(7)
            time.sleep(0.05)
        print("step 2 loss 0.4", file=sys.stderr)
        print("x" * 300000)
        sys.exit(4)
    """)
    lines = []

    def echo(line: str) -> None:
        lines.append(line)
        seen.touch()

    code, out = run_streaming([sys.executable, "-c", child], echo=echo)
    assert code == 4  # its own exit code, not the deadline's 7
    assert lines == ["step 1 loss 0.5", "step 2 loss 0.4"]
    assert out == "x" * 300000 + "\n"  # a stdout bigger than a pipe's buffer does not stall it
