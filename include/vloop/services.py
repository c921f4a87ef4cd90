"""One way to start, watch and stop vloop's processes: the local stack's services, the servers the
tests and the demo start, and training children.

:class:`Service` starts a long-running process in its own process group (so stopping it also stops
whatever it forked), with its output appended to a log file and, when asked, its PID in a PID file
(``$VLOOP_HOME/run/<name>.pid``, next to ``$VLOOP_HOME/log/<name>.log``: where ``bin/stack`` and
``make down`` look). ``start()`` returns once the service is healthy — an HTTP URL answers 200, a
callable returns true, or a line of the log matches a pattern — and raises :class:`ServiceError`
naming the log, with its last lines, if the process exits first or does not get healthy in time.
``stop()`` sends a polite signal to the whole group and SIGKILL to whatever is left after a grace
period. A PID file that names a live process makes ``start()`` refuse: one copy per name.

:func:`run_streaming` runs a child to completion instead, echoing its stderr line by line.

The command line is what ``bin/stack`` uses::

    python -m vloop.services start NAME --home DIR [--health-url URL | --health-log REGEX]
                                 [--timeout S] -- CMD...
    python -m vloop.services stop NAME --home DIR
    python -m vloop.services status NAME --home DIR

Only the standard library is imported: the stack's shell script calls this before anything else.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

TAIL_CHARS = 3000  # how much of the log an error shows


@functools.lru_cache(maxsize=1)
def _env_default_sigint() -> list[str]:
    """A prefix that starts a command with SIGINT at its default: GNU env (coreutils >= 8.31) can
    reset a signal's disposition before it executes the command. Empty where it cannot."""
    env = shutil.which("env")
    try:
        ok = env and subprocess.run([env, "--default-signal=INT", "true"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    return [env, "--default-signal=INT"] if ok else []


class ServiceError(RuntimeError):
    """A service could not be started (it exited, did not get healthy in time, or already runs)."""


class AlreadyRunning(ServiceError):
    """The service's PID file names a live process: one copy per name."""


# -- checks a service's health can be --------------------------------------------------------------
# No proxy for health checks: they go to this machine, and an HTTP_PROXY in the environment must not
# reroute them.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 (a refused connection or any other answer: not yet)."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, non-2xx, half an answer
        return False


# -- processes and process groups ---------------------------------------------------------------
def _state(pid: int) -> str | None:
    """The process's state letter from /proc ('Z' for a zombie), or None when /proc does not know it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]  # the command name, in parentheses, may hold spaces


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one that has exited, waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return _state(pid) != "Z"


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None
    when it does not exist or there is no /proc. With the PID it names one process for good: after
    a reboot or a wrap-around the same PID is another process, with another start time."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still runs (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True  # no /proc to tell zombies apart: the group exists
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rpartition(")")[2].split()[:3]
            # A process whose main thread has exited shows "Z" while its other threads still run
            # and hold its files (a lock, a port): it counts as running until every thread is gone.
            if int(group) == pgid and (state != "Z" or _threads_running(stat.parent)):
                return True
        except (OSError, ValueError):
            continue  # it exited while we looked
    return False


def _threads_running(proc_dir: Path) -> bool:
    """Whether any thread of the process at ``/proc/<pid>`` is not yet a zombie."""
    for stat in (proc_dir / "task").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rpartition(")")[2].split()[0] != "Z":
                return True
        except (OSError, IndexError):
            continue
    return False


def stop_group(pgid: int, sig: int = signal.SIGINT, grace: float = 15.0,
               leader: subprocess.Popen | None = None) -> bool:
    """Send ``sig`` to process group ``pgid``, SIGKILL whatever is left after ``grace`` seconds, and
    return once none of it runs. ``leader``, when this process started it, is reaped as it exits.
    Returns False when nothing of the group was running."""

    def running() -> bool:
        if leader is not None:
            leader.poll()  # reap the leader, so it does not linger as a zombie
        return group_alive(pgid)

    if not running():  # an ended group gets no signal
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while running():
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.1)
    # SIGKILL cannot be refused; the kernel still needs a moment to end the processes.
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def read_log(path: Path, start: int = 0) -> str:
    """The text of ``path`` from byte offset ``start`` on ('' when it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# -- a long-running service ---------------------------------------------------------------------
class Service:
    """A long-running process in its own process group, with its log file and optionally a PID file.

    ``Service.under_home(name, argv, home)`` puts them where ``bin/stack`` keeps them:
    ``home/run/<name>.pid`` and ``home/log/<name>.log``. ``stop_signal`` is the polite signal
    ``stop()`` sends first (SIGINT: what Ctrl-C sends, which every service here handles); SIGKILL
    follows after ``grace`` seconds.
    """

    def __init__(self, name: str, argv: list[str], *, log_file: str | os.PathLike,
                 pid_file: str | os.PathLike | None = None, env: dict | None = None,
                 cwd: str | os.PathLike | None = None, stop_signal: int = signal.SIGINT, grace: float = 15.0):
        self.name, self.argv = name, [str(a) for a in argv]
        self.log_file = Path(log_file)
        self.pid_file = Path(pid_file) if pid_file else None
        self.env, self.cwd = env, cwd
        self.stop_signal, self.grace = stop_signal, grace
        self.proc: subprocess.Popen | None = None
        self._log_start = 0  # where this start's output begins in the (appended) log

    @classmethod
    def under_home(cls, name: str, argv: list[str], home: str | os.PathLike, **kw) -> "Service":
        home = Path(home)
        return cls(name, argv, log_file=home / "log" / f"{name}.log", pid_file=home / "run" / f"{name}.pid", **kw)

    @property
    def pid(self) -> int | None:
        """The PID (= process group) of the running process: the one this object started, else the
        one its PID file names; None when neither runs."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        pid = self.recorded_pid()
        return pid if pid is not None and pid_alive(pid) else None

    def recorded_pid(self) -> int | None:
        """The PID in the PID file, alive or not; None without a readable one, and None when that
        PID is now another process (its start time is not the recorded one: the file outlived a
        reboot), so nothing unrelated is ever signalled."""
        try:
            pid, *started = self.pid_file.read_text().split() if self.pid_file else [None]
            pid = int(pid) if pid is not None else None
        except (OSError, ValueError):
            return None
        if pid is not None and started and pid_alive(pid) and start_time(pid) not in (None, started[0]):
            return None
        return pid

    def running(self) -> bool:
        return self.pid is not None

    def start(self, *, health_url: str | None = None, health_log: str | None = None,
              health: Callable[[], bool] | None = None, timeout: float = 120.0, poll: float = 0.25) -> "Service":
        """Start the process and return once it is healthy (by at most one of ``health_url``: a GET
        answers 200; ``health_log``: a regular expression matches a line this start wrote to the log;
        ``health``: a callable returns true; with none, as soon as it runs). Raises ServiceError if a
        live process holds the PID file, if something already answers at ``health_url`` before the
        start, or when the process exits or is not healthy within ``timeout`` seconds — then what
        it started is stopped again."""
        if sum(x is not None for x in (health_url, health_log, health)) > 1:
            raise ValueError("give one of health_url, health_log, health")
        if self.proc is not None and self.proc.poll() is None:
            raise AlreadyRunning(f"{self.name} already runs (pid {self.proc.pid})")
        if self.pid_file:
            pid = self.recorded_pid()
            if pid is not None and pid_alive(pid):
                raise AlreadyRunning(f"{self.name} already runs (pid {pid}, pid file {self.pid_file})")
            self.pid_file.unlink(missing_ok=True)  # a stale one, from a process that is gone
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        if health_url is not None and http_ok(health_url):  # else the old one would pass the new one's check
            raise ServiceError(f"{self.name}: something already answers at {health_url} (an earlier instance "
                               "not stopped, or another program on its port); stop it or choose another port")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:  # the child keeps its own copy of the descriptor
            self._log_start = log.tell()
            # SIGINT back to its default in the child: started from a background job (CI, nohup, a
            # script's `&`) it would inherit "ignored", and every stop would wait out the grace
            # period and end in SIGKILL instead of the service's orderly shutdown.
            # (env would read a first word with "=" as a variable: such a command goes as it is.)
            prefix = _env_default_sigint() if "=" not in self.argv[0] else []
            self.proc = subprocess.Popen(prefix + self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:  # whatever fails from here on (the PID file's write too) stops what was started
            if self.pid_file:  # the PID and its start time: see recorded_pid
                self.pid_file.write_text(f"{self.proc.pid} {start_time(self.proc.pid) or ''}".rstrip() + "\n")
            self._wait_healthy(self._health_check(health_url, health_log, health), timeout, poll)
        except BaseException:
            self.stop()
            raise
        return self

    def _health_check(self, url: str | None, log_pattern: str | None,
                      check: Callable[[], bool] | None) -> Callable[[], bool]:
        if url is not None:
            return lambda: http_ok(url)
        if log_pattern is not None:
            pattern = re.compile(log_pattern, re.MULTILINE)
            # Only this start's output counts: the log is appended to, an earlier run's line must not.
            return lambda: pattern.search(read_log(self.log_file, self._log_start)) is not None
        return check or (lambda: True)

    def _wait_healthy(self, check: Callable[[], bool], timeout: float, poll: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} failed (exit code {self.proc.returncode}); "
                                   f"see {self.log_file}{self._tail()}")
            # Asked again after the check: a process that answered and then died is not up.
            if check() and self.proc.poll() is None:
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} did not answer in {timeout:.0f} s; see {self.log_file}{self._tail()}")
            time.sleep(poll)

    def _tail(self) -> str:
        tail = read_log(self.log_file, self._log_start)[-TAIL_CHARS:].rstrip()
        return f"\n--- the end of {self.log_file} ---\n{tail}" if tail else " (the log is empty)"

    def stop(self, sig: int | None = None, grace: float | None = None) -> bool:
        """Stop the process group (``sig``, default ``stop_signal``; SIGKILL after ``grace``) and
        remove the PID file. Works from another process too, by the PID file. Returns False when it
        was not running."""
        sig = self.stop_signal if sig is None else sig
        grace = self.grace if grace is None else grace
        if self.proc is not None:
            stopped = stop_group(self.proc.pid, sig, grace, leader=self.proc)
        else:
            pid = self.recorded_pid()  # its group, even if the leader itself has died already
            stopped = pid is not None and stop_group(pid, sig, grace)
        if self.pid_file:
            self.pid_file.unlink(missing_ok=True)
        return stopped


# -- a child run to completion --------------------------------------------------------------------
def run_streaming(argv: list[str], env: dict | None = None, echo: Callable[[str], object] = print) -> tuple[int, str]:
    """Run ``argv`` to completion; return (exit code, its stdout). Its stderr is passed to ``echo``
    line by line as it comes (progress shows while it runs)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: list[str] = []
    try:
        # stdout is read on a thread so neither pipe can fill up and stall the child.
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()
        for line in proc.stderr:
            echo(line.rstrip("\n"))
        reader.join()
        return proc.wait(), "".join(out)
    except BaseException:  # the caller was interrupted (a task timeout, Ctrl-C): the child goes too
        proc.kill()
        proc.wait()
        raise


# -- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:  # everything after `--` is the service's command line, untouched
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m vloop.services",
                                 description="Start, stop or look at a service under HOME/run and HOME/log.")
    sub = ap.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start NAME and wait until it is healthy; prints its PID",
                           usage="%(prog)s NAME --home DIR [--health-url URL | --health-log REGEX] "
                                 "[--timeout S] -- CMD...")
    stop = sub.add_parser("stop", help="stop NAME's process group (by its PID file)")
    status = sub.add_parser("status", help="exit 0 when NAME runs, 1 when not")
    for p in (start, stop, status):
        p.add_argument("name")
        p.add_argument("--home", required=True, help="the PID file goes to HOME/run, the log to HOME/log")
    health = start.add_mutually_exclusive_group()
    health.add_argument("--health-url", help="healthy once a GET of this URL answers 200")
    health.add_argument("--health-log", help="healthy once a line of its log matches this regular expression")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health (default 120)")
    stop.add_argument("--signal", default="INT", help="the polite signal, e.g. INT or TERM (default INT)")
    stop.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL (default 15)")
    args = ap.parse_args(argv)

    service = Service.under_home(args.name, command, args.home)
    if args.action == "start":
        if not command:
            ap.error("start needs the service's command after `--`")
        try:
            service.start(health_url=args.health_url, health_log=args.health_log, timeout=args.timeout)
        except (ServiceError, OSError) as e:  # OSError: the command could not be run at all
            print(e, file=sys.stderr)
            return 1
        print(service.pid)
        return 0
    if args.action == "stop":
        sig = signal.Signals["SIG" + args.signal.upper().removeprefix("SIG")]
        print(f"{args.name}: {'stopped' if service.stop(sig, args.grace) else 'not running'}")
        return 0
    pid = service.pid
    print(f"{args.name}: running (pid {pid})" if pid else f"{args.name}: not running")
    return 0 if pid else 1


if __name__ == "__main__":
    raise SystemExit(main())
