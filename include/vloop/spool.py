"""A durable local spool between the serving gateway and the lake, and the shipper that drains it.

The gateway appends each record as one JSON line to the open segment of its stream with a single
``write()`` before it answers: from then on the record survives the process being killed (the
kernel holds it), and a background fsync every ``fsync_interval_s`` bounds what a power loss could
take. Segments are sealed (fsync, rename ``.open`` → ``.jsonl``) when they grow or age, and at
start-up any segment a dead process left open is sealed too.

The :class:`Shipper` turns each sealed segment into Parquet objects in the lake, one per
partition it touches, named after the segment (``raw/interactions/dt=…/hour=…/<segment>.parquet``),
and only then deletes it. Shipping the same segment twice rewrites the same objects, so after a
crash mid-ship nothing is lost or stored twice. Images wait in the spool as content-addressed
files and are uploaded before the segments that reference them. When the lake is unreachable,
serving goes on, the spool grows and the shipper retries with exponential backoff. A record that
does not fit its schema goes to ``quarantine/spool/`` in the lake with the reason, never blocking
the rest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from pathlib import Path

from vloop.lake import FEEDBACK_DATASET, INTERACTIONS_DATASET, Lake, partition_prefix
from vloop.schema import RECORDS, RecordError

log = logging.getLogger(__name__)

# stream name -> (record schema, lake dataset, partitioned by hour?)
STREAMS = {"interactions": (RECORDS["interaction"], INTERACTIONS_DATASET, True),
           "feedback": (RECORDS["feedback"], FEEDBACK_DATASET, False)}


def _json_default(v):
    if isinstance(v, dt.datetime):
        return v.isoformat()
    raise TypeError(f"cannot serialise {type(v).__name__}")


class SpoolStream:
    """The segments of one stream under ``root/<name>/``."""

    def __init__(self, root: Path, name: str, *, max_segment_bytes: int, max_segment_age_s: float):
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.max_bytes, self.max_age = max_segment_bytes, max_segment_age_s
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0
        self._dirty = False
        self._seq = 0
        for stale in self.dir.glob("*.open"):  # left by a process that died: seal it
            self._seal_file(stale)

    def append(self, row: dict) -> None:
        line = (json.dumps(row, default=_json_default, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self._fd is None:
                self._open()
            os.write(self._fd, line)  # one write per record: complete lines only
            self._size += len(line)
            self._dirty = True
            if self._size >= self.max_bytes:
                self._seal_locked()

    def _open(self) -> None:
        self._seq += 1
        stem = f"seg-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}"
        self._path = self.dir / f"{stem}.open"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._opened, self._size = time.monotonic(), 0

    def sync(self) -> None:
        with self._lock:
            if self._fd is not None and self._dirty:
                os.fsync(self._fd)
                self._dirty = False
            if self._fd is not None and time.monotonic() - self._opened >= self.max_age:
                self._seal_locked()

    def seal(self) -> None:
        with self._lock:
            self._seal_locked()

    def _seal_locked(self) -> None:
        if self._fd is None:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._seal_file(self._path)
        self._fd, self._path, self._dirty = None, None, False

    def _seal_file(self, path: Path) -> None:
        if path.stat().st_size == 0:
            path.unlink()
            return
        os.replace(path, path.with_suffix(".jsonl"))
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)

    def sealed(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl"))

    def depth(self) -> int:
        return len(self.sealed()) + (1 if self._fd is not None else 0)


def read_segment(path: Path) -> list[dict]:
    """The records of a segment; a torn final line (a write cut short) is skipped with a warning."""
    rows = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:
                log.warning("skipping a torn last line in %s", path.name)
                continue
            raise
    return rows


class Spool:
    """The gateway's spool: one stream per record kind, plus content-addressed images."""

    def __init__(self, root: str | Path, *, max_segment_bytes: int = 4 * 2**20,
                 max_segment_age_s: float = 2.0, fsync_interval_s: float = 0.05):
        self.root = Path(root)
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.streams = {name: SpoolStream(self.root, name, max_segment_bytes=max_segment_bytes,
                                          max_segment_age_s=max_segment_age_s) for name in STREAMS}
        self.fsync_interval_s = fsync_interval_s
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
        self._syncer.start()

    def append(self, stream: str, row: dict) -> None:
        self.streams[stream].append(row)

    def put_image(self, key: str, data: bytes) -> None:
        """Keep an image until the shipper uploads it (atomic: temp file + rename)."""
        path = self.images / key.replace("/", "__")
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def pending_images(self) -> list[tuple[str, Path]]:
        return [(p.name.replace("__", "/"), p) for p in sorted(self.images.iterdir()) if not p.name.startswith(".")]

    def depth(self) -> int:
        return sum(s.depth() for s in self.streams.values())

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            for s in self.streams.values():
                try:
                    s.sync()
                except OSError:
                    log.exception("spool fsync failed")

    def close(self) -> None:
        self._stop.set()
        self._syncer.join(timeout=5)
        for s in self.streams.values():
            s.seal()


class Shipper:
    """Moves sealed segments and pending images from a :class:`Spool` into a lake."""

    def __init__(self, spool: Spool, lake: Lake, *, interval_s: float = 1.0, max_backoff_s: float = 30.0,
                 on_failure=None, on_shipped=None):
        self.spool, self.lake = spool, lake
        self.interval_s, self.max_backoff_s = interval_s, max_backoff_s
        self.on_failure = on_failure or (lambda e: None)
        self.on_shipped = on_shipped or (lambda stream, n: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spool-shipper", daemon=True)
        self.failures = 0

    def start(self) -> "Shipper":
        self._thread.start()
        return self

    def stop(self, drain: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if drain:
            self.spool.close()
            try:
                self.ship_once()
            except Exception as e:  # the lake is down: segments stay for the next start
                log.warning("could not drain the spool at shutdown: %s", e)

    def _loop(self) -> None:
        backoff = self.interval_s
        while not self._stop.wait(backoff):
            try:
                self.ship_once()
                backoff = self.interval_s
            except Exception as e:
                self.failures += 1
                self.on_failure(e)
                backoff = min(self.max_backoff_s, max(backoff, 0.25) * 2)
                log.warning("shipping failed (%s); retrying in %.1fs", e, backoff)

    def ship_once(self) -> int:
        """Ship everything sealed now. Returns how many records went to the lake."""
        segments = {name: s.sealed() for name, s in self.spool.streams.items()}
        # Images first: every record in the segments listed above has its image on disk by now.
        for key, path in self.spool.pending_images():
            if not self.lake.exists(key):
                ctype = "image/jpeg" if key.endswith(".jpg") else "image/png"
                self.lake.put_bytes(key, path.read_bytes(), ctype)
            path.unlink()
        shipped = 0
        for name, paths in segments.items():
            schema, dataset, hourly = STREAMS[name]
            for path in paths:
                rows, bad = [], []
                for r in read_segment(path):
                    try:
                        rows.append(schema.to_row(r))
                    except RecordError as e:  # never block the spool on one bad record
                        bad.append({"record": r, "reason": str(e)})
                if bad:
                    self.lake.put_json(f"quarantine/spool/{name}/{path.stem}.json", bad)
                    log.warning("%d bad records of %s quarantined", len(bad), path.name)
                groups: dict[tuple, list] = {}
                for r in rows:
                    ts = r["ts"]
                    groups.setdefault((ts.date(), ts.hour if hourly else None), []).append(r)
                for (day, hour), group in sorted(groups.items()):
                    key = partition_prefix(dataset, day, hour) + path.stem + ".parquet"
                    self.lake.write_parquet(key, schema.to_table(group))
                path.unlink()  # only after every partition of it is in the lake
                shipped += len(rows)
                self.on_shipped(name, len(rows))
        return shipped
