"""The lake: one interface over a local directory (the embedded default) and MinIO/S3.

Keys are relative, ``/``-separated paths (DESIGN.md, "Lake layout"). A backend only has to
provide a handful of byte-level primitives; Parquet partitions, date-range reads and
content-addressed images are built once on top of them in :class:`Lake`.

Atomicity: a local write goes to a hidden temporary file in the target directory, is fsynced and
then renamed over the key; an S3 write is a single PUT (or a multipart upload, which S3 also
publishes atomically on completion). Either way a reader sees the old object or the new one,
never half of one, and a failed write leaves nothing behind.

A day of a dataset (``dataset/dt=D/``) holds Parquet files from two kinds of writers: the shipper
appends one file per spool segment, and :meth:`Lake.write_partition` / :meth:`Lake.write_hourly`
replace a day or an hour of it. A replacement must not show a reader both the old files and the
new one (duplicates), nor a listing whose files vanish before they are read (missing rows), and
no single object store call swaps several files at once. So a replacement writes its rows to new
``gen-<version>.parquet`` files, which no reader uses until the day's manifest
(``dataset/dt=D/_manifest.json``, one atomic PUT) names them and lists the appended files they
supersede; only then are the superseded files deleted. :meth:`Lake.read_partitions` reads a day
as one snapshot: the manifest, the files it makes visible, and the manifest again; if a
replacement committed in between (or deleted a file under it), it reads the day again.

Open one with :func:`open_lake` (from ``VLOOP_*`` settings or explicit arguments) or
:func:`lake_from_connection` (from an Airflow connection).
"""

from __future__ import annotations

import collections
import datetime as dt
import io
import itertools
import json
import os
import re
import tempfile
import time
import urllib.parse
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from vloop.store.config import Settings, load_settings
from vloop.store.images import image_key, normalise_image
from vloop.store.schema import RECORDS, conform

# Where the raw records live (DESIGN.md, "Lake layout"); images go under raw/images/ (vloop.store.images).
INTERACTIONS_DATASET = "raw/interactions"
FEEDBACK_DATASET = "raw/feedback"
MANIFEST = "_manifest.json"  # per day: the files of its last replacement and what they superseded
GENERATION_PREFIX = "gen-"  # files of a replacement: visible only once the day's manifest names them
SNAPSHOT_ATTEMPTS = 5  # a reader re-reads a day this often while replacements keep landing on it
WRITE_THREADS = 4  # concurrent partition writes: Parquet encoding releases the GIL, S3 PUTs wait on I/O
EXISTS_THREADS = 8  # concurrent HEADs or GETs over many keys (under the client's pool of 16 connections)


class LakeError(Exception):
    """Something went wrong talking to the lake."""


class LakeConfigError(LakeError, ValueError):
    """The lake URL or its credentials are unusable."""


class LakeKeyNotFound(LakeError, KeyError):
    """No object under that key."""

    def __str__(self) -> str:  # KeyError's repr-quoting makes messages ugly
        return str(self.args[0])


class LakeBucketMissing(LakeKeyNotFound):
    """The S3 bucket does not exist (yet), so no key does either."""


class LakeUnavailable(LakeError):
    """The backend could not be reached (network, server down)."""


@dataclass(frozen=True)
class StoredImage:
    key: str
    sha256: str
    width: int
    height: int
    size: int  # bytes as stored
    created: bool  # False when the same image was already in the lake


_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_=\-][A-Za-z0-9_.=\-@+]*$")
# A whole key of such segments, in one match: the common case, checked for every photo of a day.
_SAFE_KEY = re.compile(r"[A-Za-z0-9_=\-][A-Za-z0-9_.=\-@+]*(?:/[A-Za-z0-9_=\-][A-Za-z0-9_.=\-@+]*)*")


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe lake key, else raise ``ValueError`` saying why.

    Segments start with a letter, digit, ``_``, ``-`` or ``=`` (a leading dot is reserved for
    temporary files) and contain no ``..``; a prefix may be empty or end with ``/``.
    """
    if not isinstance(key, str):
        raise ValueError(f"lake key must be a string, got {type(key).__name__}")
    if _SAFE_KEY.fullmatch(key) and ".." not in key:
        return key
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    if not body or body.startswith("/"):
        raise ValueError(f"lake key {key!r} must be a non-empty relative path")
    for seg in body.split("/"):
        if not _KEY_SEGMENT.fullmatch(seg) or ".." in seg:  # fullmatch: "$" alone lets a final newline through
            raise ValueError(f"lake key {key!r} has an invalid segment {seg!r}")
    return key


def partition_prefix(dataset: str, day: dt.date | str, hour: int | None = None) -> str:
    """``dataset/dt=YYYY-MM-DD/`` or ``dataset/dt=YYYY-MM-DD/hour=HH/``."""
    day = _as_date(day)
    p = f"{dataset.strip('/')}/dt={day.isoformat()}/"
    if hour is not None:
        if not 0 <= hour <= 23:
            raise ValueError(f"hour must be 0..23, got {hour}")
        p += f"hour={hour:02d}/"
    return check_key(p, prefix=True)


def _is_generation(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(GENERATION_PREFIX)


def _date_range(start: dt.date | str, end: dt.date | str) -> list[dt.date]:
    start, end = _as_date(start), _as_date(end)
    if end < start:
        raise ValueError(f"date range is empty: {start} > {end}")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def _as_date(day: dt.date | str) -> dt.date:
    if isinstance(day, dt.datetime):
        return day.date()
    if isinstance(day, dt.date):
        return day
    try:
        return dt.date.fromisoformat(str(day))
    except ValueError:
        raise ValueError(f"{day!r} is not a date (YYYY-MM-DD)") from None


class Lake(ABC):
    """Object storage for vloop's data. Subclasses implement the byte-level primitives."""

    url: str

    def __init__(self, *, max_image_bytes: int, max_image_pixels: int):
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels

    # -- primitives -------------------------------------------------------------------------
    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` under ``key`` atomically, replacing what was there."""

    @abstractmethod
    def put_bytes_if_absent(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Create ``key`` only if no object is there: True if this call created it, False if
        another writer got there first. The lake's one compare-and-set, used where two writers
        must never both win (the registry's desired-state log)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`LakeKeyNotFound` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def get_many(self, keys) -> Iterator[tuple[str, bytes | None]]:
        """(key, bytes) of each key in order, None for a key with no object (deleted since it was
        listed: an erasure); subclasses fetch ahead."""
        for k in keys:
            yield k, self._bytes_or_none(k)

    def _bytes_or_none(self, key: str) -> bytes | None:
        """:meth:`get_bytes`, or None when the object is gone (a missing bucket still raises: the
        whole lake is missing, not one object)."""
        try:
            return self.get_bytes(key)
        except LakeBucketMissing:
            raise
        except LakeKeyNotFound:
            return None

    def existing(self, keys) -> set[str]:
        """Which of ``keys`` are objects (validation asks it of every photo of a slice). A stat or
        HEAD per key, not a listing: the photos' folders hold every photo the lake ever stored,
        so a listing would grow with the lake, not with the keys asked."""
        return {k for k in keys if self.exists(k)}

    @abstractmethod
    def modified(self, key: str) -> dt.datetime:
        """When the object was last written (UTC); :class:`LakeKeyNotFound` if there is none."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; missing is fine."""

    @abstractmethod
    def browser_url(self, key: str, expires: dt.timedelta = dt.timedelta(hours=24)) -> str:
        """A URL from which a person's browser can fetch ``key`` (presigned on S3)."""

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)

    # -- JSON -------------------------------------------------------------------------------
    def put_json(self, key: str, obj) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(),
                       "application/json")

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))

    # -- Parquet ----------------------------------------------------------------------------
    def write_parquet(self, key: str, table: pa.Table) -> None:
        """One Parquet object, written atomically."""
        buf = io.BytesIO()
        pq.write_table(table, buf, **parquet_options(table))
        self.put_bytes(key, buf.getvalue(), "application/vnd.apache.parquet")

    def read_parquet(self, key: str, columns: Sequence[str] | None = None) -> pa.Table:
        data = self.get_bytes(key)
        return _read_table(pa.BufferReader(data), key, columns)

    def write_partition(self, dataset: str, table: pa.Table, day: dt.date | str,
                        hour: int | None = None) -> str:
        """Write ``table`` as the whole content of one partition (a day, or one hour of it) and
        return its file's key.

        Re-writing a partition replaces it, atomically for readers (see the module docstring): a
        re-run never duplicates rows, and the rest of the day is untouched.
        """
        [key] = self._replace_day(dataset, day, {hour: table}, hours={hour} if hour is not None else None)
        return key

    def write_hourly(self, dataset: str, table: pa.Table, day: dt.date | str,
                     ts_column: str = "ts") -> list[str]:
        """Write one day's rows as hourly partitions (by ``ts_column``, UTC), replacing the day.

        Every row must fall on ``day``; otherwise nothing is written. Hours are written
        concurrently and published together by one manifest write, so a reader sees the old day
        or the new one, and a re-run of the day with fewer hours leaves no stale hour behind.
        """
        import pyarrow.compute as pc

        day = _as_date(day)
        if table.num_rows:
            ts = table.column(ts_column)
            days = pc.unique(pc.cast(pc.cast(ts, pa.timestamp("us", tz="UTC")), pa.date32()))
            wrong = [d for d in days.to_pylist() if d != day]
            if wrong:
                raise ValueError(f"rows dated {wrong[0]} cannot go into the partition of {day}")
        hours = pc.hour(table.column(ts_column)).to_numpy(zero_copy_only=False) if table.num_rows else []
        by_hour = {h: table.filter(pa.array(hours == h)) for h in sorted(set(int(x) for x in hours))}
        return self._replace_day(dataset, day, by_hour, hours=None)

    # -- day manifests ----------------------------------------------------------------------
    def read_manifest(self, dataset: str, day: dt.date | str) -> dict | None:
        """The day's manifest (``files``: generation files relative to the day, ``superseded``:
        appended files they replaced, ``version``), or None for a day never replaced."""
        try:
            return self.get_json(partition_prefix(dataset, day) + MANIFEST)
        except LakeKeyNotFound:
            return None

    @staticmethod
    def _visible(prefix: str, listed: Sequence[str], manifest: dict | None) -> list[str]:
        """The Parquet files a reader uses: the manifest's generation files, plus every appended
        file it does not supersede. Generation files it does not name are a replacement in
        flight (or one that died) and are ignored."""
        superseded = set(manifest["superseded"]) if manifest else set()
        keys = {prefix + f for f in manifest["files"]} if manifest else set()
        for k in listed:
            rel = k[len(prefix):]
            if k.endswith(".parquet") and rel not in superseded and not _is_generation(k):
                keys.add(k)
        return sorted(keys)

    def _replace_day(self, dataset: str, day, tables: dict, hours: set | None) -> list[str]:
        """Replace the files of ``hours`` of the day (``None``: the whole day) by ``tables``
        (hour or None → table). One writer per day at a time: two concurrent replacements of
        the same day are not merged (the later manifest wins)."""
        day = _as_date(day)
        prefix = partition_prefix(dataset, day)
        old = self.read_manifest(dataset, day)
        listed = self.list(prefix)

        def in_scope(key: str) -> bool:
            if hours is None:
                return True
            rel = key[len(prefix):]  # "hour=07/seg-….parquet", or "seg-….parquet" for a day-level file
            return any(rel.startswith(f"hour={h:02d}/") if h is not None else "/" not in rel for h in hours)

        version = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        targets = [((partition_prefix(dataset, day, h) if h is not None else prefix)
                    + f"{GENERATION_PREFIX}{version}.parquet", t) for h, t in tables.items()]
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            list(pool.map(lambda kt: self.write_parquet(*kt), targets))
        new_keys = [k for k, _ in targets]
        visible = self._visible(prefix, listed, old)
        replaced = [k for k in visible if in_scope(k)]
        kept_generations = [k for k in visible if not in_scope(k) and _is_generation(k)]
        # Appended files stay superseded for good: a shipper re-sending a segment after a crash
        # rewrites the same name, and its rows are already in the replacement.
        superseded = set(old["superseded"]) if old else set()
        superseded |= {k[len(prefix):] for k in replaced if not _is_generation(k)}
        manifest = {"version": version, "written_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                    "files": sorted(k[len(prefix):] for k in kept_generations + new_keys),
                    "superseded": sorted(superseded)}
        self.put_json(prefix + MANIFEST, manifest)  # the commit point: readers switch here
        # Only now may the replaced files go; orphaned generation files of a dead writer go too.
        orphans = [k for k in listed if in_scope(k) and _is_generation(k) and k not in new_keys]
        for k in sorted(set(replaced + orphans)):
            self.delete(k)
        return new_keys

    def partition_keys(self, dataset: str, start: dt.date | str, end: dt.date | str) -> list[str]:
        """The Parquet files of every ``dt=`` partition from ``start`` to ``end`` inclusive, as a
        reader sees them now (a replacement may land right after: :meth:`read_partitions` reads
        each day as a consistent snapshot)."""
        return [k for day in _date_range(start, end)
                for k in self._visible(partition_prefix(dataset, day), self.list(partition_prefix(dataset, day)),
                                       self.read_manifest(dataset, day))]

    def _read_day(self, dataset: str, day: dt.date, columns, pool) -> list[pa.Table]:
        """One day's tables from one state of the day, never a mix of two (see the module docstring)."""
        prefix = partition_prefix(dataset, day)
        for _ in range(SNAPSHOT_ATTEMPTS):
            manifest = self.read_manifest(dataset, day)
            keys = self._visible(prefix, self.list(prefix), manifest)
            try:
                tables = list(pool.map(lambda k: self.read_parquet(k, columns), keys))
            except LakeKeyNotFound:  # a replacement deleted a file we listed: read the new state
                continue
            after = self.read_manifest(dataset, day)
            if (after or {}).get("version") == (manifest or {}).get("version"):
                return tables
        raise LakeError(f"{prefix} was replaced {SNAPSHOT_ATTEMPTS} times while being read; try again")

    def read_partitions(self, dataset: str, start: dt.date | str, end: dt.date | str | None = None,
                        columns: Sequence[str] | None = None,
                        schema: pa.Schema | None = None) -> pa.Table:
        """Rows of the partitions from ``start`` to ``end`` (inclusive) as one Arrow table.

        Only ``columns`` are read when given. With ``schema`` the result is cast to it (its
        columns, or the subset asked for), so an empty range still has the right columns.
        """
        days = _date_range(start, end if end is not None else start)
        if schema is not None and columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise ValueError(f"columns not in the schema: {missing}")
        target = None
        if schema is not None:
            target = pa.schema([schema.field(c) for c in (columns or schema.names)])
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            tables = [t for day in days for t in self._read_day(dataset, day, columns, pool)]
        if target is not None:
            tables = [conform(t, target) for t in tables]  # old files lack newer optional columns
            if not tables:
                return target.empty_table()
        if not tables:
            return pa.table({c: pa.array([], pa.null()) for c in (columns or [])})
        return pa.concat_tables(tables, promote_options="default")

    # -- images -----------------------------------------------------------------------------
    def put_image(self, data: bytes) -> StoredImage:
        """Store an image content-addressed (sha256 of its metadata-free bytes, vloop.store.images).

        Raises :class:`vloop.store.images.ImageError` (or ``ImageTooLarge``) before anything is written.
        Storing the same picture twice writes it once.
        """
        img = normalise_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        key = image_key(img.sha256, img.ext)
        created = not self.exists(key)
        if created:
            self.put_bytes(key, img.data, img.content_type)
        return StoredImage(key, img.sha256, img.width, img.height, len(img.data), created)


def parquet_options(table: pa.Table) -> dict:
    """Write options for a table that carries a vloop record schema (see ``RecordSchema``)."""
    record = (table.schema.metadata or {}).get(b"vloop.record", b"").decode()
    return RECORDS[record].parquet_options() if record in RECORDS else {}


def _read_table(source, key: str, columns: Sequence[str] | None) -> pa.Table:
    try:
        return pq.read_table(source, columns=list(columns) if columns is not None else None)
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError) as e:
        raise LakeError(f"cannot read Parquet object {key!r}: {e}") from e


class LocalLake(Lake):
    """A directory on a local or mounted file system."""

    def __init__(self, root: str | os.PathLike, *, public_url: str | None = None, **limits):
        super().__init__(**limits)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self.root)
        self.public_url = public_url
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _temp_copy(self, path: Path, data: bytes) -> str:
        """``data`` written and fsynced to a temporary file beside ``path``; its name."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        path = self._path(key)
        tmp = self._temp_copy(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def put_bytes_if_absent(self, key, data, content_type="application/octet-stream"):
        path = self._path(key)
        tmp = self._temp_copy(path, data)
        try:
            # link() fails if the name exists: an atomic create-only, unlike rename().
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            _unlink_quietly(tmp)

    def write_parquet(self, key, table):
        # Stream straight to the temporary file: no second copy of a large table in memory.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp, **parquet_options(table))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def get_bytes(self, key):
        try:
            # os on strings, not Path objects: the daily image check reads every photo of the day.
            with open(self._root_text + os.sep + check_key(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise LakeKeyNotFound(f"no object {key!r} in {self.url}") from None

    def read_parquet(self, key, columns=None):
        path = self._path(key)
        try:
            source = pa.memory_map(str(path))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise LakeKeyNotFound(f"no object {key!r} in {self.url}") from None
        return _read_table(source, key, columns)

    def exists(self, key):
        # os.path on strings: half the cost of Path objects, and validation checks every distinct
        # photo of a slice (tens of thousands) this way.
        return os.path.isfile(self._root_text + os.sep + check_key(key))

    def modified(self, key):
        try:
            return dt.datetime.fromtimestamp(self._path(key).stat().st_mtime, dt.timezone.utc)
        except FileNotFoundError:
            raise LakeKeyNotFound(f"no object {key!r} in {self.url}") from None

    def list(self, prefix=""):
        check_key(prefix, prefix=True)
        # Walk only the deepest directory the prefix names; match the rest as a string prefix.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):  # temporary files of writes in flight
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, key):
        path = self._path(key)
        _unlink_quietly(path)
        # Tidy empty directories up to the root so listings stay cheap.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def browser_url(self, key, expires=dt.timedelta(hours=24)):
        check_key(key)
        if self.public_url:
            return self.public_url + urllib.parse.quote(key)
        return self._path(key).as_uri()

    def __repr__(self):
        return f"LocalLake({self.url})"


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class S3Lake(Lake):
    """A bucket (and optional prefix) on MinIO or any S3-protocol server, via the ``minio`` client."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str, access_key: str | None,
                 secret_key: str | None, secure: bool | None = None, region: str = "us-east-1",
                 create_bucket: bool = True, **limits):
        super().__init__(**limits)
        from minio import Minio  # imported here: a local lake never needs it
        import urllib3

        host, secure = _parse_endpoint(endpoint, secure)
        _check_bucket(bucket)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        check_key(self.prefix, prefix=True)
        self.url = f"s3://{bucket}/{self.prefix}"
        self.endpoint = host
        self.endpoint_url = f"{'https' if secure else 'http'}://{host}"
        # Kept so an import storage in Label Studio can be registered on the same bucket.
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        # Bounded retries with backoff, and timeouts, so an unreachable lake fails in seconds.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60), maxsize=16,
            retries=urllib3.Retry(total=3, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(host, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region, http_client=http)
        self._create_bucket = create_bucket
        self._bucket_ready = False

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, what: str, fn, *args, **kwargs):
        from minio.error import S3Error
        import urllib3

        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise LakeKeyNotFound(f"no object {what!r} in {self.url}") from None
            if e.code == "NoSuchBucket":
                raise LakeBucketMissing(f"bucket {self.bucket!r} does not exist on {self.endpoint} "
                                        f"(asked for {what!r})") from None
            if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise LakeConfigError(f"{self.endpoint} refused the credentials ({e.code}) for {what!r}") from None
            raise LakeError(f"S3 error on {what!r}: {e.code}: {e.message}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise LakeUnavailable(f"cannot reach the lake at {self.endpoint}: {e}") from e

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        if not self._call(self.bucket, self.client.bucket_exists, self.bucket):
            if not self._create_bucket:
                raise LakeError(f"bucket {self.bucket!r} does not exist on {self.endpoint}")
            from minio.error import S3Error
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as e:  # someone else created it in between
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_ready = True

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        name = self._name(key)
        self._ensure_bucket()
        self._call(key, self.client.put_object, self.bucket, name, io.BytesIO(data), len(data),
                   content_type=content_type)

    def put_bytes_if_absent(self, key, data, content_type="application/octet-stream"):
        from minio.error import S3Error

        name = self._name(key)
        self._ensure_bucket()
        # S3 conditional write (If-None-Match: *; AWS S3, MinIO). put_object() would turn the
        # header into user metadata, so this goes through the client's plain PUT.
        try:
            self._call(key, self.client._put_object, self.bucket, name, data,
                       headers={"If-None-Match": "*", "Content-Type": content_type})
            return True
        except LakeError as e:
            cause = e.__cause__
            if isinstance(cause, S3Error) and cause.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                # A retried PUT whose first attempt landed also gets 412: it is ours if the bytes are.
                try:
                    return self.get_bytes(key) == data
                except LakeKeyNotFound:
                    return False
            raise

    def get_bytes(self, key):
        name = self._name(key)

        def fetch():
            resp = self.client.get_object(self.bucket, name)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(key, fetch)

    def exists(self, key):
        try:
            self._call(key, self.client.stat_object, self.bucket, self._name(key))
            return True
        except (LakeKeyNotFound, LakeBucketMissing):
            return False

    def get_many(self, keys):
        # GETs a few ahead of the caller, on threads: each waits on the network, and the caller
        # (the daily image check) works on one object while the next ones arrive. A window, not
        # the whole list, so memory holds a few objects at a time.
        keys = iter(keys)
        pool = ThreadPoolExecutor(EXISTS_THREADS)
        try:
            window = collections.deque((k, pool.submit(self._bytes_or_none, k))
                                       for k in itertools.islice(keys, 2 * EXISTS_THREADS))
            while window:
                k, pending = window.popleft()
                for more in itertools.islice(keys, 1):
                    window.append((more, pool.submit(self._bytes_or_none, more)))
                yield k, pending.result()
        finally:  # an error or a caller that stops early: the GETs not started are dropped
            pool.shutdown(cancel_futures=True)

    def existing(self, keys):
        # A HEAD per key, several at a time: each waits on the network, not the CPU.
        keys = list(dict.fromkeys(keys))
        with ThreadPoolExecutor(EXISTS_THREADS) as pool:  # threads start only as keys are submitted
            return {k for k, there in zip(keys, pool.map(self.exists, keys)) if there}

    def modified(self, key):
        return self._call(key, self.client.stat_object, self.bucket, self._name(key)).last_modified

    def list(self, prefix=""):
        check_key(prefix, prefix=True)
        full = self.prefix + prefix
        try:
            objs = self._call(prefix or "/", lambda: list(
                self.client.list_objects(self.bucket, prefix=full, recursive=True)))
        except LakeBucketMissing:
            if not self._create_bucket:
                raise
            objs = []  # a lake nobody has written to yet is empty
        n = len(self.prefix)
        return sorted(o.object_name[n:] for o in objs if not o.is_dir)

    def delete(self, key):
        self._call(key, self.client.remove_object, self.bucket, self._name(key))

    def delete_prefix(self, prefix):
        from minio.deleteobjects import DeleteObject

        keys = self.list(prefix)
        if keys:
            errors = self._call(prefix, lambda: list(self.client.remove_objects(
                self.bucket, [DeleteObject(self.prefix + k) for k in keys])))
            if errors:
                raise LakeError(f"could not delete {len(errors)} objects under {prefix!r}: {errors[0]}")
        return len(keys)

    def browser_url(self, key, expires=dt.timedelta(hours=24)):
        return self._call(key, self.client.presigned_get_object, self.bucket, self._name(key),
                          expires=expires)

    def __repr__(self):
        return f"S3Lake({self.url} at {self.endpoint})"


def _parse_endpoint(endpoint: str | None, secure: bool | None) -> tuple[str, bool]:
    if not endpoint:
        raise LakeConfigError("an s3:// lake needs an endpoint (VLOOP_S3_ENDPOINT or the connection's host)")
    if "://" in endpoint:
        u = urllib.parse.urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
            raise LakeConfigError(f"S3 endpoint {endpoint!r} must be host:port or http(s)://host:port")
        return u.netloc, (u.scheme == "https") if secure is None else secure
    if "/" in endpoint:
        raise LakeConfigError(f"S3 endpoint {endpoint!r} must be host:port or http(s)://host:port")
    return endpoint, True if secure is None else secure


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def _check_bucket(bucket: str) -> None:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise LakeConfigError(f"{bucket!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')")


def open_lake(url: str | None = None, *, settings: Settings | None = None,
              endpoint: str | None = None, access_key: str | None = None,
              secret_key: str | None = None, secure: bool | None = None,
              region: str | None = None) -> Lake:
    """The lake named by ``url`` (default: ``VLOOP_LAKE_URL``), credentials from arguments or settings.

    ``file:///abs/dir`` gives a :class:`LocalLake`, ``s3://bucket/prefix`` an :class:`S3Lake`;
    anything else raises :class:`LakeConfigError` saying what is accepted.
    """
    s = settings or load_settings()
    url = url or s.lake_url
    limits = dict(max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels)
    u = urllib.parse.urlsplit(url)
    if u.scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise LakeConfigError(f"lake URL {url!r}: a file lake needs an absolute path, file:///abs/dir")
        return LocalLake(urllib.parse.unquote(u.path), public_url=s.lake_public_url, **limits)
    if u.scheme == "s3":
        if not u.netloc:
            raise LakeConfigError(f"lake URL {url!r}: an S3 lake needs a bucket, s3://bucket/prefix")
        return S3Lake(u.netloc, u.path, endpoint=endpoint or s.s3_endpoint,
                      access_key=access_key or s.s3_access_key,
                      secret_key=secret_key or s.s3_secret_key, secure=secure,
                      region=region or s.s3_region, **limits)
    raise LakeConfigError(f"lake URL {url!r} is not supported: use file:///abs/dir or s3://bucket/prefix")


def lake_from_connection(conn, settings: Settings | None = None) -> Lake:
    """A lake from an Airflow connection (or anything with the same attributes).

    The connection's extra carries ``lake_url``; for S3 its host/port (or extra ``endpoint_url``)
    is the endpoint, login/password are the keys, extra ``secure`` forces TLS on or off.
    """
    extra = getattr(conn, "extra_dejson", None) or {}
    url = extra.get("lake_url")
    if not url:
        raise LakeConfigError(f"connection {getattr(conn, 'conn_id', '?')!r} has no 'lake_url' in its extra")
    endpoint = extra.get("endpoint_url")
    if not endpoint and conn.host:
        endpoint = conn.host if not conn.port else f"{conn.host}:{conn.port}"
    secure = extra.get("secure")
    if isinstance(secure, str):
        secure = secure.lower() in ("1", "true", "yes")
    return open_lake(url, settings=settings, endpoint=endpoint, access_key=conn.login or None,
                     secret_key=conn.password or None, secure=secure, region=extra.get("region"))


def copy_prefix(src: Lake, dst: Lake, prefix: str = "") -> int:
    """Copy every object under ``prefix`` from one lake to another (e.g. local → MinIO)."""
    keys = src.list(prefix)
    for k in keys:
        dst.put_bytes(k, src.get_bytes(k))
    return len(keys)


def fetch_files(lake: Lake, keys: Sequence[str], dest: str | os.PathLike) -> Path:
    """Download ``keys`` into the directory ``dest``, each under its base name (an adapter's
    files, say, to hand to a loader that wants a local directory)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for k in keys:
        (dest / k.rsplit("/", 1)[-1]).write_bytes(lake.get_bytes(k))
    return dest


__all__ = [
    "Lake", "LocalLake", "S3Lake", "StoredImage", "LakeError", "LakeConfigError", "LakeKeyNotFound",
    "LakeUnavailable", "open_lake", "lake_from_connection", "partition_prefix", "check_key",
    "copy_prefix", "fetch_files", "MANIFEST", "INTERACTIONS_DATASET", "FEEDBACK_DATASET",
]
