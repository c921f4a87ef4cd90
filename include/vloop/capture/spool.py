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
files and are uploaded before the segments that reference them. An image file and its directory
entry are fsynced before the record naming it is appended, so a record that survives a power loss
has its image too; the shipper checks every image's bytes against the hash in its key before
upload (a mismatch goes to ``quarantine/spool/images/``, and the record keeps pointing at the key
until the next good copy of the photo fills it), and uploads every good copy even when the key is
in the lake already: that repairs a bad or missing lake copy and refreshes the object's time,
which is what makes deleting an image safe (:func:`image_delete_cutoff`). When the lake is unreachable,
serving goes on, the spool grows and the shipper retries with exponential backoff. A record that
does not fit its schema, or a line that is not a JSON record at all (a torn write, a bad disk
block), goes to ``quarantine/spool/`` in the lake with the reason, never blocking the rest.

One process owns a spool directory: :class:`Spool` takes an exclusive lock on ``root/.lock`` and a
second gateway pointed at the same directory refuses to start (:class:`SpoolLocked`) instead of
sealing the first one's open segment under it and racing its shipper. The kernel drops the lock
when the owner dies, so a restart after a crash just works.

After each pass the shipper writes its watermark to ``shippers/<spool id>.json`` in the lake: every
record this gateway logged with a timestamp before ``shipped_through`` is in the lake.
``feedback_daily`` waits for every gateway's watermark to pass the end of the day it processes
(:func:`shippers_caught_up`).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from vloop.store.lake import FEEDBACK_DATASET, INTERACTIONS_DATASET, Lake, LakeError, partition_prefix
from vloop.privacy import request_hash
from vloop.store.schema import RECORDS, RecordError

log = logging.getLogger(__name__)

# stream name -> (record schema, lake dataset, partitioned by hour?)
ERASED_REQUESTS = "erased_request_ids"  # beside the streams: requests of erased users, one per line
STREAMS = {"interactions": (RECORDS["interaction"], INTERACTIONS_DATASET, True),
           "feedback": (RECORDS["feedback"], FEEDBACK_DATASET, False)}
WATERMARKS = "shippers/"  # in the lake: one <spool id>.json per gateway spool
# How long after its timestamp a record may still be appended: the gateway stamps an interaction
# when the request arrives and spools it once the answer is out (generation, image upload).
RECORD_LAG = dt.timedelta(minutes=5)
# Images of erased users' records the shipper dropped: candidates for erasure, never deleted here
# (another user's record for the same photo may still be in an open segment or another replica).
ERASED_IMAGES = "privacy/erased_images/"
# Margin on top of the shippers' watermarks before an unreferenced image may go: the lake's clock
# (object times) and the gateways' clocks (record times) are different clocks.
IMAGE_GRACE = dt.timedelta(minutes=15)


class SpoolLocked(RuntimeError):
    """Another live process owns this spool directory."""


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
        self._oldest: dt.datetime | None = None  # earliest record time in the open segment
        for stale in self.dir.glob("*.open"):  # left by a process that died: seal it
            self._seal_file(stale)

    def append(self, row: dict) -> None:
        line = (json.dumps(row, default=_json_default, ensure_ascii=False) + "\n").encode()
        ts = row.get("ts")
        with self._lock:
            if self._fd is None:
                self._open()
            os.write(self._fd, line)  # one write per record: complete lines only
            if isinstance(ts, dt.datetime) and ts.tzinfo and (self._oldest is None or ts < self._oldest):
                self._oldest = ts
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
        self._fd, self._path, self._dirty, self._oldest = None, None, False, None

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

    def snapshot(self) -> tuple[list[Path], dt.datetime | None]:
        """The sealed segments and the earliest record time in the open one, taken together (a
        segment sealed in between is in neither, so nothing is counted as shipped unseen)."""
        with self._lock:
            return self.sealed(), self._oldest

    def depth(self) -> int:
        return len(self.sealed()) + (1 if self._fd is not None else 0)


def read_segment(path: Path) -> list[dict]:
    """The records of a segment; a torn final line (a write cut short) is skipped with a warning.
    A bad line anywhere else raises: use :func:`parse_segment` to keep the good ones."""
    rows, bad = parse_segment(path)
    if bad:
        raise ValueError(f"{path.name}: {bad[0]['reason']}")
    return rows


def parse_segment(path: Path) -> tuple[list[dict], list[dict]]:
    """``(records, bad lines)`` of a segment. A torn final line (the process died mid-write) is
    skipped with a warning; any other line that is not a JSON object (a disk error, a bad edit) is
    a bad line ``{"line": number, "text": …, "reason": …}``, and the lines around it still count."""
    rows, bad = [], []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not a record object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                log.warning("skipping a torn last line in %s", path.name)
                continue
            bad.append({"line": i + 1, "text": line.decode("utf-8", "replace")[:2000],
                        "reason": f"line {i + 1} is not a JSON record: {e}"})
            continue
        rows.append(row)
    return rows, bad


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key_sha256(key: str) -> str | None:
    """The content hash an image key names (``raw/images/ab/<sha256>.<ext>``), or None."""
    stem = key.rsplit("/", 1)[-1].split(".", 1)[0]
    return stem.lower() if len(stem) == 64 and all(c in "0123456789abcdefABCDEF" for c in stem) else None


def spool_id(root: Path) -> str:
    """This spool's stable identity (``<host>-<random>``, kept in ``root/.id``): names its
    watermark in the lake across restarts."""
    path = root / ".id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        ident = f"{socket.gethostname().split('.')[0] or 'gateway'}-{uuid.uuid4().hex[:8]}"
        tmp = root / f".id.{os.getpid()}.tmp"
        tmp.write_text(ident + "\n")
        os.replace(tmp, path)
        return ident


class Spool:
    """The gateway's spool: one stream per record kind, plus content-addressed images."""

    def __init__(self, root: str | Path, *, max_segment_bytes: int = 4 * 2**20,
                 max_segment_age_s: float = 2.0, fsync_interval_s: float = 0.05):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        self.id = spool_id(self.root)
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.sweep_staged(max_age_s=0)  # staged by a process that died before logging them
        self.streams = {name: SpoolStream(self.root, name, max_segment_bytes=max_segment_bytes,
                                          max_segment_age_s=max_segment_age_s) for name in STREAMS}
        self.fsync_interval_s = fsync_interval_s
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
        self._syncer.start()

    def _take_lock(self) -> int:
        """An exclusive lock on ``root/.lock`` for this Spool's lifetime, or :class:`SpoolLocked`.
        Taken before anything else: a second owner would seal the first one's open segment."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SpoolLocked(f"the spool {self.root} is in use by {holder}; give each gateway process "
                              "its own VLOOP_SPOOL_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return fd

    def append(self, stream: str, row: dict) -> None:
        self.streams[stream].append(row)

    def put_image(self, key: str, data: bytes) -> None:
        """Keep an image until the shipper uploads it (atomic: temp file + rename)."""
        self.commit_image(key, self.stage_image(key, data))

    def stage_image(self, key: str, data: bytes) -> Path | None:
        """Write an image under a hidden temporary name the shipper ignores; :meth:`commit_image`
        publishes it once its record is logged, :meth:`discard_image` drops it when none will be.
        The gateway stages in a thread while the model answers (creating a file is the costly
        part), so the image is in the spool before its record without the wait on the request's
        path. None when the image is spooled already."""
        path = self._image_path(key)
        if path.exists():
            return None
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes on disk before any record can name them
        return tmp

    def commit_image(self, key: str, staged: Path | None) -> None:
        """Publish a staged image: rename, then fsync the directory so the name survives a power
        loss too. Called before the record is appended: a durable record never names a lost image."""
        if staged is not None:
            os.replace(staged, self._image_path(key))
            _fsync_dir(self.images)

    @staticmethod
    def discard_image(staged: Path | None) -> None:
        if staged is not None:
            staged.unlink(missing_ok=True)

    def sweep_staged(self, max_age_s: float = 3600) -> None:
        """Drop staged images older than ``max_age_s`` (a request that ended without a record,
        e.g. its task was cancelled, leaves one; nothing will ever commit it)."""
        cutoff = time.time() - max_age_s
        for p in self.images.glob(".*.tmp"):
            try:
                if max_age_s <= 0 or p.stat().st_mtime < cutoff:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def _image_path(self, key: str) -> Path:
        return self.images / key.replace("/", "__")

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
        self.release()

    def release(self) -> None:
        """Give up the directory (the sealed segments stay for whoever opens it next)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None


class Shipper:
    """Moves sealed segments and pending images from a :class:`Spool` into a lake."""

    def __init__(self, spool: Spool, lake: Lake, *, interval_s: float = 1.0, max_backoff_s: float = 30.0,
                 on_failure=None, on_shipped=None, watermark_interval_s: float = 30.0):
        self.spool, self.lake = spool, lake
        # An idle gateway still moves its watermark on (the day ends without traffic too), but
        # one PUT per pass would be one a second: every watermark_interval_s is enough.
        self.watermark_interval_s = watermark_interval_s
        self._watermark_at = float("-inf")
        self._swept_at = time.monotonic()
        self.interval_s, self.max_backoff_s = interval_s, max_backoff_s
        self.on_failure = on_failure or (lambda e: None)
        self.on_shipped = on_shipped or (lambda stream, n: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spool-shipper", daemon=True)
        self.failures = 0
        self._erased_requests: set[str] | None = None  # loaded on the first ship
        self._tombstones: set[str] = set()
        self._erased_hashes: set[str] = set()
        self._images_erased: dict[str, set[str]] = {}  # user key -> images of their dropped records
        self._announced = False  # whether this process has made sure the lake has our watermark

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

    def _erased(self, record: dict, tombstones: set[str]) -> bool:
        """Whether ``record`` belongs to a user erased on request (a tombstone in the lake): their
        interactions, and feedback on those interactions, never reach the lake again, even from an
        old segment. The request ids of dropped interactions are kept beside the spool, so their
        feedback is dropped in a later pass too."""
        if record.get("user_key") in tombstones:
            if record.get("request_id"):
                self._erased_requests.add(record["request_id"])
                with open(self.spool.root / ERASED_REQUESTS, "a") as f:
                    f.write(record["request_id"] + "\n")
            return True
        rid = record.get("request_id")
        return rid in self._erased_requests or (bool(self._erased_hashes) and request_hash(rid) in self._erased_hashes)

    def ship_once(self) -> int:
        """Ship everything sealed now, then advance this spool's watermark. Returns how many
        records went to the lake."""
        from vloop.privacy import erased_request_hashes, read_tombstones

        started = dt.datetime.now(dt.timezone.utc)
        snapshots = {name: s.snapshot() for name, s in self.spool.streams.items()}
        # Erased users (tombstones) are read on every pass with something to ship, so a record
        # sealed after an erasure began never lands.
        busy = any(p for p, _ in snapshots.values())
        self._tombstones = read_tombstones(self.lake) if busy else set()
        # Requests of users erased earlier (hashed): their feedback may sit in any replica's spool.
        self._erased_hashes = erased_request_hashes(self.lake) if busy and self._tombstones else set()
        if self._erased_requests is None:
            f = self.spool.root / ERASED_REQUESTS
            self._erased_requests = set(f.read_text().split()) if f.is_file() else set()
        self._images_erased = {}
        if not self._announced:
            self._announce(started, snapshots)
        # Images first: every record in the segments listed above has its image on disk by now.
        if time.monotonic() - self._swept_at > 600:
            self.spool.sweep_staged()
            self._swept_at = time.monotonic()
        for key, path in self.spool.pending_images():
            self._ship_image(key, path)
        shipped = 0
        for name, (paths, _) in snapshots.items():
            for path in paths:
                n = self._ship_segment(name, path)
                shipped += n
                self.on_shipped(name, n)
        # Images of erased users' records are not deleted here: the same photo may be named by
        # someone else's record in an open segment, another replica's spool or a request still
        # answering. They are noted for the erasure, which deletes them once nothing refers to them.
        for user, keys in sorted(self._images_erased.items()):
            self.lake.put_json(f"{ERASED_IMAGES}{user}/{self.spool.id}-{time.time_ns()}.json",
                               {"user_key": user, "images": sorted(keys), "spool": self.spool.id})
        # Whatever was sealed is in the lake; the open segments hold records from their oldest on.
        oldest_open = [t for _, t in snapshots.values() if t is not None]
        through = min([started - RECORD_LAG] + [t for t in oldest_open])
        if shipped or time.monotonic() - self._watermark_at >= self.watermark_interval_s:
            self.lake.put_json(f"{WATERMARKS}{self.spool.id}.json", {
                "spool": self.spool.id, "shipped_through": through.isoformat(),
                "updated_at": dt.datetime.now(dt.timezone.utc).isoformat()})
            self._watermark_at = time.monotonic()
        return shipped

    def _announce(self, started: dt.datetime, snapshots) -> None:
        """Before this spool's first upload, make sure the lake has a watermark for it no later
        than its oldest record could be: image deletion waits for every watermark, and a spool
        the lake does not know of yet would otherwise not be waited for."""
        key = f"{WATERMARKS}{self.spool.id}.json"
        if not self.lake.exists(key):
            opened = [int(p.name.split("-")[1]) / 1e9 for paths, _ in snapshots.values() for p in paths
                      if p.name.startswith("seg-") and p.name.split("-")[1].isdigit()]
            first = min([started] + [dt.datetime.fromtimestamp(t, dt.timezone.utc) for t in opened])
            self.lake.put_json(key, {"spool": self.spool.id, "shipped_through": (first - RECORD_LAG).isoformat(),
                                     "updated_at": dt.datetime.now(dt.timezone.utc).isoformat()})
        self._announced = True

    def _ship_image(self, key: str, path: Path) -> None:
        """Upload one spooled image if its bytes hash to its key; a mismatch (a file cut short by
        a crash, a bad block) is quarantined, never uploaded. Every good copy is uploaded, also
        when the key exists: it repairs a bad lake copy and marks the image as in use now."""
        data = path.read_bytes()
        want = key_sha256(key)
        got = hashlib.sha256(data).hexdigest()
        if want is not None and got != want:
            self.lake.put_json(f"quarantine/spool/images/{self.spool.id}-{want}-{time.time_ns()}.json", {
                "image_key": key, "reason": "the spooled bytes do not hash to the key", "sha256": got,
                "bytes": len(data), "spool": self.spool.id, "at": dt.datetime.now(dt.timezone.utc).isoformat()})
            log.warning("%s: spooled copy does not match its hash (%d bytes); quarantined", key, len(data))
        else:
            ctype = "image/jpeg" if key.endswith(".jpg") else "image/png"
            self.lake.put_bytes(key, data, ctype)
        path.unlink()

    def _ship_segment(self, name: str, path: Path) -> int:
        """One sealed segment into the lake, then off the disk. Lines and records that cannot be
        shipped go to ``quarantine/spool/<stream>/<segment>.json`` with their reasons; a lake
        error propagates (the segment stays and is shipped again on the next pass)."""
        schema, dataset, hourly = STREAMS[name]
        records, bad = parse_segment(path)
        rows = []
        for r in records:
            if self._erased(r, self._tombstones):
                if r.get("image_key") and r.get("user_key"):
                    self._images_erased.setdefault(r["user_key"], set()).add(r["image_key"])
                continue
            try:
                row = schema.to_row(r)
                row["ts"].date()  # a record without a usable time has no partition to go to
                rows.append(row)
            except (RecordError, TypeError, ValueError, AttributeError, KeyError) as e:
                bad.append({"record": r, "reason": str(e) or type(e).__name__})
        groups: dict[tuple, list] = {}
        for r in rows:
            ts = r["ts"]
            groups.setdefault((ts.date(), ts.hour if hourly else None), []).append(r)
        tables = []
        for (day, hour), group in sorted(groups.items()):
            try:
                tables.append((partition_prefix(dataset, day, hour) + path.stem + ".parquet", schema.to_table(group)))
            except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid is a ValueError
                bad.extend({"record": _jsonable(r), "reason": f"cannot be stored: {e}"} for r in group)
        if bad:
            self.lake.put_json(f"quarantine/spool/{name}/{path.stem}.json", bad)
            log.warning("%s: %d bad lines or records quarantined", path.name, len(bad))
        for key, table in tables:
            self.lake.write_parquet(key, table)
        path.unlink()  # only after every partition of it is in the lake
        return sum(t.num_rows for _, t in tables)


def _jsonable(row: dict) -> dict:
    return json.loads(json.dumps(row, default=str))


def shippers_caught_up(lake: Lake, through: dt.datetime, *, stale_after: dt.timedelta = dt.timedelta(days=7),
                       now: dt.datetime | None = None) -> tuple[bool, str]:
    """Whether every gateway's shipper has moved its records up to ``through`` into the lake:
    ``(ready, why)``. A lake no shipper has written to (batch-loaded, or before the first gateway)
    is ready. A watermark not updated for ``stale_after`` belongs to a gateway that was retired
    or is long dead; it is reported and does not hold the day back (its spool ships when it
    returns, and the next day's re-mining picks its feedback up)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    behind, stale = [], []
    for key, mark, shipped, updated, error in _watermarks(lake):
        if error is not None:
            behind.append(f"{key} unreadable ({error})")
            continue
        if now - updated > stale_after:
            stale.append(mark.get("spool", key))
        elif shipped < through:
            behind.append(f"{mark.get('spool', key)} has shipped through {shipped:%Y-%m-%d %H:%M} UTC")
    note = f"; ignored stale shippers (no update for {stale_after}): {', '.join(stale)}" if stale else ""
    if behind:
        return False, f"waiting for records up to {through:%Y-%m-%d %H:%M} UTC: " + "; ".join(behind) + note
    return True, f"every shipper has shipped through {through:%Y-%m-%d %H:%M} UTC{note}"


def _watermarks(lake: Lake):
    """Every shipper watermark: ``(key, mark, shipped_through, updated_at, None)``, or
    ``(key, None, None, None, error)`` for one that cannot be read."""
    for key in lake.list(WATERMARKS):
        if not key.endswith(".json"):
            continue
        try:
            mark = lake.get_json(key)
            yield (key, mark, dt.datetime.fromisoformat(mark["shipped_through"]),
                   dt.datetime.fromisoformat(mark["updated_at"]), None)
        except (LakeError, KeyError, ValueError, TypeError) as e:
            yield key, None, None, None, e


def day_is_shipped(lake: Lake, day: dt.date, *, now: dt.datetime, grace: dt.timedelta) -> tuple[bool, str]:
    """Whether ``day``'s records are all in the lake (every shipper's watermark is past its end),
    or ``grace`` after its end has passed, whichever comes first: ``(ready, why)``."""
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    ready, why = shippers_caught_up(lake, end, now=now)
    if ready:
        return True, why
    if now >= end + grace:
        return True, f"grace period of {grace} after {day} is over; going on without: {why}"
    return False, why


def image_delete_cutoff(lake: Lake, *, now: dt.datetime | None = None, grace: dt.timedelta = IMAGE_GRACE,
                        stale_after: dt.timedelta = dt.timedelta(days=7)) -> dt.datetime:
    """Images last written to the lake before this time may be deleted once no lake row refers
    to them; younger ones may not, whatever the lake's rows say.

    Why it is safe: a record not yet in the lake has a time at or after its spool's watermark,
    and its photo's spooled copy is uploaded after the record's time (the shipper uploads every
    good copy, even of a key it finds in the lake), so the image's lake time is after that
    watermark. An image older than every watermark (less a grace for the clocks) is thus named
    by no record in any spool's open or sealed segments, nor by one still to come from a request
    being answered: such a request's copy is uploaded later and writes the image again. Read the
    cutoff *before* listing the rows that refer to images. Watermarks not updated for
    ``stale_after`` (a retired gateway) are not waited for, as in :func:`shippers_caught_up`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    marks = [now]
    for _key, _mark, shipped, updated, error in _watermarks(lake):
        if error is not None:
            return dt.datetime.min.replace(tzinfo=dt.timezone.utc)  # unknown: delete nothing
        if now - updated <= stale_after:
            marks.append(shipped)
    return min(marks) - grace


def check_images(lake: Lake, day: dt.date | str, *, decode: bool = True, repair: bool = False) -> dict:
    """Re-verify the images the interactions of ``day`` name: each present, its bytes hashing to
    its key and (``decode``) readable as an image. ``repair`` moves a bad lake copy aside
    (``quarantine/images/``, a note, and the object deleted), so the next good copy a shipper
    uploads puts it right. Returns counts and the bad and missing keys."""
    from vloop.store.images import ImageError, open_image

    day = dt.date.fromisoformat(day) if isinstance(day, str) else day
    table = lake.read_partitions(INTERACTIONS_DATASET, day, day, columns=["image_key"],
                                 schema=RECORDS["interaction"].arrow)
    keys = sorted({k for k in table.column("image_key").to_pylist() if k})
    out = {"day": day.isoformat(), "records": table.num_rows, "images": len(keys), "ok": 0,
           "missing": [], "bad": [], "repaired": []}
    for key in keys:
        try:
            data = lake.get_bytes(key)
        except LakeError:
            out["missing"].append(key)
            continue
        why = None
        if hashlib.sha256(data).hexdigest() != key_sha256(key):
            why = "bytes do not hash to the key"
        elif decode:
            try:
                open_image(data, max_bytes=lake.max_image_bytes, max_pixels=lake.max_image_pixels).load()
            except (ImageError, OSError, ValueError) as e:
                why = f"unreadable: {e}"
        if why is None:
            out["ok"] += 1
            continue
        out["bad"].append({"image_key": key, "reason": why, "bytes": len(data)})
        if repair:
            lake.put_json(f"quarantine/images/{key_sha256(key) or key.replace('/', '_')}-{time.time_ns()}.json",
                          {"image_key": key, "reason": why, "bytes": len(data),
                           "at": dt.datetime.now(dt.timezone.utc).isoformat()})
            lake.delete(key)
            out["repaired"].append(key)
    return out
