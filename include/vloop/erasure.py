"""Erasure on request and retention: removing personal data from every place the loop put it.

:func:`erase_user` removes one user (by user key) from the whole lake and Label Studio:

1. a tombstone first (``privacy/tombstones/<key>.json``), so a shipper, a selection or a dataset
   build that runs meanwhile already leaves the user out, and nothing comes back later;
2. every Parquet object is read to find the user's requests (rows with their key: raw, curated,
   quarantine, selections, labels, the user list beside each dataset snapshot); the hashes of
   those request ids, and later the days and datasets touched, are kept in
   ``privacy/erased_requests/<key>.json`` *before* anything is removed, so a run that fails midway
   and its retry still find everything, and late copies are recognised;
3. Label Studio tasks of the user (by key or request) are deleted, with their annotations, in
   every project — before the lake, so a daily pull cannot bring labels back meanwhile;
4. rows with the user's key, and rows about the user's requests (feedback, labels, dataset
   examples: matched by ``request_id``), are removed and each such object is rewritten in place
   with its schema. Objects that hold nothing of the user's are not touched, so everyone else's
   data stays byte for byte what it was;
5. JSON objects that name the user's key or one of their requests (``pushed.json``, the shipper's
   quarantine, adapter evaluations naming held-out examples) are rewritten without those entries.
   Only whole values count — a string equal to the key or a request id, an example id
   ``<source>-<request id>``, or such a value quoted in a raw JSON line — never a substring: a key
   cut short would otherwise strip other users' entries and the file names in day manifests.
   Dataset manifests get the new counts; the daily reports of the days the user appeared on are
   rebuilt from the cleaned data (they quote answers and edits);
6. images only the user's records referenced are deleted (an image someone else also sent stays),
   and only once no record anywhere can still name them: lake rows, and — through the shippers'
   watermarks (:func:`vloop.spool.image_delete_cutoff`) — records still in any replica's spool or
   yet to come from a request being answered. Younger ones, and images of the user's records the
   shippers dropped (``privacy/erased_images/<key>/``), wait there for the next daily run;
7. adapters trained on a dataset that held the user are listed (lineage) and marked, once, for
   retraining in the registry's history;
8. one audit record says who erased which key when, and how much went.

It is idempotent: a second run finds nothing and removes nothing. Retention
(:func:`apply_retention`) deletes whole day partitions older than the configured number of days,
and images nothing references any more once they are older than the raw-data limit.

The scan reads every Parquet object once (erasure requests are rare and batched by the
``privacy_maintenance`` DAG); at a scale where that is too slow, an index from user key to objects
is the next step.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vloop.lake import Lake, LakeKeyNotFound
from vloop.privacy import (ERASED_REQUESTS, _check_key, audit, read_tombstones, record_erased_requests,
                           record_tombstone, request_hash)
from vloop.spool import ERASED_IMAGES, image_delete_cutoff

log = logging.getLogger(__name__)

IMAGES = "raw/images/"
QUEUE = "privacy/erasure_requests/"  # one object per pending request (the user key, never the raw id)
DONE = "privacy/erasure_done/"
# Never scanned: the privacy records themselves, the registry's history, rollout looks
# (aggregates), and images (handled by reference). Of adapters/ only the JSON (evaluation metrics
# name held-out examples by request id) is scanned, not the weights.
SKIP = ("privacy/", "registry/", "rollout/", IMAGES)
_DAY = re.compile(r"/dt=(\d{4}-\d{2}-\d{2})/")


@dataclass
class ErasureResult:
    user_key: str
    rows_removed: dict[str, int] = field(default_factory=dict)  # top-level area -> rows
    objects_rewritten: list[str] = field(default_factory=list)
    images_deleted: int = 0
    images_waiting: int = 0  # only the user's, but too recent to delete yet (next run)
    label_studio_tasks_deleted: int = 0
    reports_rebuilt: list[str] = field(default_factory=list)
    adapters_to_retrain: list[str] = field(default_factory=list)
    already_tombstoned: bool = False

    @property
    def total_rows(self) -> int:
        return sum(self.rows_removed.values())

    def summary(self) -> dict:
        return {"user_key": self.user_key, "rows_removed": dict(sorted(self.rows_removed.items())),
                "objects_rewritten": len(self.objects_rewritten), "images_deleted": self.images_deleted,
                "images_waiting": self.images_waiting,
                "label_studio_tasks_deleted": self.label_studio_tasks_deleted,
                "reports_rebuilt": self.reports_rebuilt, "adapters_to_retrain": self.adapters_to_retrain,
                "already_erased_before": self.already_tombstoned}


def _column_set(table: pa.Table, name: str) -> set:
    return set(table.column(name).to_pylist()) - {None} if name in table.column_names else set()


def _user_mask(table: pa.Table, key: str, request_ids: set[str]) -> pa.Array | None:
    """True for the rows of ``table`` that are the user's (by key or by one of their requests)."""
    masks = []
    if "user_key" in table.column_names:
        masks.append(pc.fill_null(pc.equal(table["user_key"].cast(pa.string()), key), False))
    if "request_id" in table.column_names and request_ids:
        masks.append(pc.fill_null(pc.is_in(table["request_id"].cast(pa.string()),
                                           value_set=pa.array(sorted(request_ids), pa.string())), False))
    if not masks:
        return None
    m = masks[0]
    for other in masks[1:]:
        m = pc.or_(m, other)
    return m


_SOURCE = re.compile(r"[A-Za-z0-9_]+")  # an example id's source: label_corrected, user_edit, replay, …
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


class _Needles:
    """Whether a string *is* the user key or one of their request ids — whole values only, never
    a substring (a truncated key "u00001" must not match "u000012", nor a request id "r-1" match
    "r-12"). Two shapes hold such a value whole inside: an example id ``<source>-<request id>``
    (dataset examples, paired evaluation results) and a raw JSON line the shipper quarantined,
    whose quoted strings are compared one by one."""

    def __init__(self, key: str, request_ids: set[str]):
        self.values = {key} | set(request_ids)

    def __call__(self, s: str, _depth: int = 0) -> bool:
        if s in self.values:
            return True
        source, dash, rest = s.partition("-")
        if dash and rest in self.values and _SOURCE.fullmatch(source):
            return True
        if _depth == 0 and '"' in s:  # a raw line: its quoted values, each whole
            for m in _JSON_STRING.finditer(s):
                try:
                    value = json.loads(f'"{m.group(1)}"')
                except ValueError:
                    continue
                if self(value, 1):
                    return True
        return False


def _mentions(obj, needles: _Needles) -> bool:
    if isinstance(obj, str):
        return needles(obj)
    if isinstance(obj, dict):
        return any(_mentions(k, needles) or _mentions(v, needles) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_mentions(v, needles) for v in obj)
    return False


def _without(obj, needles: _Needles):
    """``obj`` with every list element and dict entry that mentions the user removed (recursively)."""
    if isinstance(obj, dict):
        return {k: _without(v, needles) for k, v in obj.items()
                if not _mentions(k, needles) and not (isinstance(v, str) and _mentions(v, needles))}
    if isinstance(obj, list):
        return [_without(v, needles) for v in obj if not _mentions(v, needles)]
    return obj


def _area(key: str) -> str:
    parts = key.split("/")
    return "/".join(parts[:2]) if parts[0] in ("raw",) else parts[0]


def erase_user(lake: Lake, user_key: str, *, actor: str, label_studio=None,
               now: dt.datetime | None = None, rebuild_reports: bool = True) -> ErasureResult:
    """Remove everything of ``user_key`` (see the module docstring). ``label_studio`` is a
    :class:`vloop.labelstudio.LabelStudio` client, or None where no Label Studio is configured."""
    _check_key(user_key)
    now = now or dt.datetime.now(dt.timezone.utc)
    res = ErasureResult(user_key, already_tombstoned=not record_tombstone(lake, user_key, at=now))
    # Read before the rows are: see image_delete_cutoff. With the notes of images waiting.
    image_cutoff = image_delete_cutoff(lake, now=now)
    image_notes = lake.list(f"{ERASED_IMAGES}{user_key}/")
    keys = [k for k in lake.list("") if not k.startswith(SKIP)
            and (not k.startswith("adapters/") or k.endswith(".json"))]
    parquet = [k for k in keys if k.endswith(".parquet")]

    # Pass 1: the user's requests and images, wherever a row carries the user key. One object in
    # memory at a time (the passes read again rather than hold the lake).
    request_ids: set[str] = set()
    images: set[str] = set()
    about_users, about_images = [], []  # objects with user or request columns; with images only
    for k in parquet:
        t = lake.read_parquet(k)
        cols = set(t.column_names)
        if cols & {"user_key", "request_id"}:
            about_users.append(k)
        elif "image_key" in cols:
            about_images.append(k)
        if "user_key" in cols:
            mine = t.filter(_user_mask(t, user_key, set()))
            request_ids |= _column_set(mine, "request_id")
            images |= _column_set(mine, "image_key")

    # Before anything is removed, what identifies the user's requests is kept (hashed): a run that
    # fails midway (Label Studio down, a lake error) and its retry still find everything, and a
    # late copy (a re-shipped segment, an annotation pulled again) is recognised.
    hashes = record_erased_requests(lake, user_key, {request_hash(r) for r in request_ids})
    unseen = hashes - {request_hash(r) for r in request_ids}  # erased before: only their hashes are left
    # Label Studio next: while its tasks exist, a daily pull could bring the labels back.
    if label_studio is not None:
        res.label_studio_tasks_deleted = label_studio.delete_tasks_of(user_key, hashes)

    # Pass 2: remove the user's rows; note what everyone else's rows still reference.
    others_images: set[str] = set()
    days: set[str] = set()
    datasets: dict[str, int] = {}
    for k in about_users:
        t = lake.read_parquet(k)
        mask = _user_mask(t, user_key, request_ids)
        if mask is None:  # request ids only, and none of theirs known
            others_images |= _column_set(t, "image_key")
            continue
        if unseen and "request_id" in t.column_names:
            by_hash = pa.array([request_hash(r) in unseen for r in t["request_id"].to_pylist()], pa.bool_())
            mask = pc.or_(mask, by_hash)
        n = pc.sum(mask).as_py() or 0
        kept = t.filter(pc.invert(mask)) if n else t
        others_images |= _column_set(kept, "image_key")
        if n:
            images |= _column_set(t.filter(mask), "image_key")
            lake.write_parquet(k, kept)
            res.objects_rewritten.append(k)
            res.rows_removed[_area(k)] = res.rows_removed.get(_area(k), 0) + n
            if m := _DAY.search("/" + k):
                days.add(m.group(1))
            if k.startswith("datasets/"):
                ds = k.split("/")[1]
                datasets[ds] = datasets.get(ds, 0) + n
    for k in image_notes:  # images waiting from an earlier run, or of records a shipper dropped
        images |= set(lake.get_json(k).get("images", []))
    only_theirs = images - others_images

    # Pass 3: rows keyed by image only (image quality) for images that were only the user's.
    for k in about_images if only_theirs else []:
        t = lake.read_parquet(k)
        mask = pc.fill_null(pc.is_in(t["image_key"].cast(pa.string()),
                                     value_set=pa.array(sorted(only_theirs), pa.string())), False)
        n = pc.sum(mask).as_py() or 0
        if n:
            lake.write_parquet(k, t.filter(pc.invert(mask)))
            res.objects_rewritten.append(k)
            res.rows_removed[_area(k)] = res.rows_removed.get(_area(k), 0) + n

    # JSON objects that list the user's requests (pushed.json, the shipper's quarantine, adapter
    # evaluations naming held-out examples).
    needles = _Needles(user_key, request_ids)
    for k in keys:
        if not k.endswith(".json") or k.endswith("/manifest.json"):
            continue
        obj = lake.get_json(k)
        if _mentions(obj, needles):
            lake.put_json(k, _without(obj, needles))
            res.objects_rewritten.append(k)
            res.rows_removed[_area(k)] = res.rows_removed.get(_area(k), 0) + 1

    waiting = set()
    for img in sorted(only_theirs):
        if not lake.exists(img):
            continue
        if lake.modified(img) < image_cutoff:
            lake.delete(img)
            res.images_deleted += 1
        else:  # written since the oldest watermark: a record in some spool may still name it
            waiting.add(img)
    if waiting:
        lake.put_json(f"{ERASED_IMAGES}{user_key}/waiting.json", {"user_key": user_key, "images": sorted(waiting)})
    for k in image_notes:
        if not (waiting and k.endswith("/waiting.json")):
            lake.delete(k)
    res.images_waiting = len(waiting)

    for ds, n in sorted(datasets.items()):  # manifests keep describing what the snapshot holds
        mk = f"datasets/{ds}/manifest.json"
        if lake.exists(mk):
            m = lake.get_json(mk)
            for split in m.get("examples", {}):
                sk = f"datasets/{ds}/{split}.parquet"
                if lake.exists(sk):
                    m["examples"][split] = pq.read_metadata(io.BytesIO(lake.get_bytes(sk))).num_rows
            m.setdefault("erasures", []).append({"at": now.isoformat(), "examples_removed": n})
            lake.put_json(mk, m)
            res.objects_rewritten.append(mk)
    # Days and datasets go into the erasure record too, so a retry still rebuilds those reports
    # and marks those adapters (their rows are already gone by then).
    record = _update_record(lake, user_key, days=days, datasets=set(datasets))
    res.adapters_to_retrain = _mark_lineage(lake, set(record["datasets"]), actor=actor, user_key=user_key,
                                            already=set(record.get("adapters", [])))
    _update_record(lake, user_key, adapters=set(res.adapters_to_retrain))
    if rebuild_reports:
        res.reports_rebuilt = _rebuild_reports(lake, sorted(record["days"]))

    audit(lake, "erase", actor=actor, at=now, user_key=user_key, rows_removed=res.total_rows,
          objects_rewritten=len(res.objects_rewritten), images_deleted=res.images_deleted,
          label_studio_tasks_deleted=res.label_studio_tasks_deleted,
          adapters_to_retrain=res.adapters_to_retrain)
    log.info("erased %s…: %d rows in %d objects, %d images, %d Label Studio tasks", user_key[:12],
             res.total_rows, len(res.objects_rewritten), res.images_deleted, res.label_studio_tasks_deleted)
    return res


def _update_record(lake: Lake, user_key: str, **add: set[str]) -> dict:
    """Add to the lists (days, datasets, adapters) of the user's erasure record; returns it."""
    k = f"{ERASED_REQUESTS}{user_key}.json"
    rec = lake.get_json(k)
    changed = False
    for name, values in add.items():
        have = set(rec.get(name, []))
        if not set(values) <= have:
            rec[name], changed = sorted(have | set(values)), True
        rec.setdefault(name, [])
    if changed:
        lake.put_json(k, rec)
    return rec


def _mark_lineage(lake: Lake, datasets: set[str], *, actor: str, user_key: str, already: set[str]) -> list[str]:
    """Adapters trained on one of ``datasets``: recorded (once) in the registry's history as
    needing a retrain without the erased data (the next retrain_biweekly run trains on cleaned
    data)."""
    from vloop.registry import Registry

    if not datasets:
        return []
    reg = Registry(lake)
    refs = sorted(v.ref for v in reg.versions() if v.dataset_id in datasets)
    for ref in set(refs) - already:
        reg.record("needs_retraining", {"ref": ref, "user_key": user_key}, actor=actor,
                   reason="trained on data of a user since erased")
    return refs


def _rebuild_reports(lake: Lake, days: list[str]) -> list[str]:
    """Re-render the daily reports of ``days`` from the cleaned data (they may quote the user)."""
    from vloop import daily

    rebuilt = []
    for d in days:
        if not lake.exists(daily.key(daily.REPORTS, d, "index.html")):
            continue
        try:
            daily.report(lake, dt.date.fromisoformat(d))
            rebuilt.append(d)
        except (LakeKeyNotFound, KeyError, ValueError) as e:  # the day's inputs are gone: drop the page
            log.warning("could not rebuild the report of %s (%s); deleting it", d, e)
            lake.delete_prefix(daily.key(daily.REPORTS, d, ""))
    return rebuilt


# -- the queue the privacy_maintenance DAG works ----------------------------------------------------
def request_erasure(lake: Lake, user_key: str, *, actor: str, now: dt.datetime | None = None) -> str:
    """Queue an erasure of ``user_key`` (what the app's backend or a support tool calls)."""
    _check_key(user_key)
    now = now or dt.datetime.now(dt.timezone.utc)
    k = f"{QUEUE}{user_key}.json"
    lake.put_bytes_if_absent(k, json.dumps({"user_key": user_key, "requested_at": now.isoformat(),
                                            "actor": actor}).encode(), "application/json")
    audit(lake, "erasure requested", actor=actor, at=now, user_key=user_key)
    return k


def pending_erasures(lake: Lake) -> list[str]:
    return sorted(k[len(QUEUE):].removesuffix(".json") for k in lake.list(QUEUE) if k.endswith(".json"))


def work_erasure_queue(lake: Lake, *, actor: str, label_studio=None, resweep_days: int = 7) -> list[dict]:
    """Erase every queued user; a request leaves the queue only once its erasure finished. Users
    erased in the last ``resweep_days`` are swept again: a daily run or a shipper that read their
    data before the tombstone existed may have written it back after the first sweep."""
    done = []
    for key in pending_erasures(lake):
        res = erase_user(lake, key, actor=actor, label_studio=label_studio)
        summary = res.summary()
        lake.put_json(f"{DONE}{key}.json", {**summary, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()})
        lake.delete(f"{QUEUE}{key}.json")
        done.append(summary)
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=resweep_days)
    swept = {d["user_key"] for d in done}
    # Also users with images waiting (too recent last time, or dropped by a shipper since).
    waiting = {k[len(ERASED_IMAGES):].split("/")[0] for k in lake.list(ERASED_IMAGES)}
    for key in sorted(read_tombstones(lake) - swept):
        if key in waiting or lake.modified(f"privacy/tombstones/{key}.json") >= since:
            res = erase_user(lake, key, actor=actor, label_studio=label_studio)
            if res.total_rows or res.label_studio_tasks_deleted or res.images_deleted:
                done.append({**res.summary(), "resweep": True})
    return done


# -- retention ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetentionPolicy:
    """Days each kind of data is kept. Raw covers spool output (interactions, feedback) and images."""
    raw_days: int = 90
    curated_days: int = 180  # curated, quarantine, labeling, reports
    labeled_days: int = 730
    datasets_days: int = 365

    @classmethod
    def from_settings(cls, s=None) -> "RetentionPolicy":
        from vloop.config import load_settings

        s = s or load_settings()
        return cls(s.retain_raw_days, s.retain_curated_days, s.retain_labeled_days, s.retain_datasets_days)


def apply_retention(lake: Lake, policy: RetentionPolicy, *, today: dt.date, actor: str) -> dict:
    """Delete day partitions older than the policy allows (a partition of day D goes once
    ``today - D > days``), datasets built longer ago than ``datasets_days`` that no serving
    adapter was trained on, and images nothing references once older than ``raw_days``."""
    from vloop import daily
    from vloop.lake import FEEDBACK_DATASET, INTERACTIONS_DATASET

    areas = {INTERACTIONS_DATASET: policy.raw_days, FEEDBACK_DATASET: policy.raw_days,
             daily.CURATED: policy.curated_days, daily.QUARANTINE: policy.curated_days,
             daily.LABELING: policy.curated_days, daily.REPORTS: policy.curated_days,
             daily.LABELED: policy.labeled_days}
    deleted: dict[str, int] = {}
    for area, days in areas.items():
        cutoff = (today - dt.timedelta(days=days)).isoformat()
        for prefix in sorted({m.group(0) for k in lake.list(area + "/") if (m := re.match(rf"{area}/dt=[\d-]+/", k))}):
            day = prefix.rstrip("/").split("dt=")[1]
            if day < cutoff:
                deleted[area] = deleted.get(area, 0) + lake.delete_prefix(prefix)

    # The shipper's quarantine has no day partitions: its objects go by their write time.
    cutoff = dt.datetime.combine(today - dt.timedelta(days=policy.curated_days), dt.time(), dt.timezone.utc)
    old_spool = [k for k in lake.list("quarantine/spool/") if lake.modified(k) < cutoff]
    for k in old_spool:
        lake.delete(k)
    deleted["quarantine/spool"] = len(old_spool)
    deleted["datasets"] = _expire_datasets(lake, today - dt.timedelta(days=policy.datasets_days))
    deleted["images"] = _expire_images(lake, today - dt.timedelta(days=policy.raw_days))
    summary = {"today": today.isoformat(), "policy": policy.__dict__, "objects_deleted": deleted}
    audit(lake, "retention", actor=actor, objects_deleted=deleted, policy=policy.__dict__)
    return summary


def _expire_datasets(lake: Lake, before: dt.date) -> int:
    from vloop.registry import Registry

    reg = Registry(lake)
    st = reg.serving_state()
    live = {reg.get(r).dataset_id for r in (st.champion, st.canary) if r}
    n = 0
    for mk in [k for k in lake.list("datasets/") if k.endswith("/manifest.json")]:
        m = lake.get_json(mk)
        if m.get("created_for", "9999") < before.isoformat() and m.get("id") not in live:
            n += lake.delete_prefix(mk.removesuffix("manifest.json"))
    return n


def _expire_images(lake: Lake, before: dt.date) -> int:
    """Images referenced by no remaining row, last written before ``before`` and before every
    shipper's watermark (a younger one may be named by a record still in a spool)."""
    spooled_cutoff = image_delete_cutoff(lake)  # before the rows are read
    referenced: set[str] = set()
    for k in lake.list(""):
        if k.endswith(".parquet") and not k.startswith(SKIP):
            referenced |= _column_set(lake.read_parquet(k), "image_key")
    cutoff = dt.datetime.combine(before, dt.time(), dt.timezone.utc)
    n = 0
    for k in lake.list(IMAGES):
        if k not in referenced and lake.modified(k) < min(cutoff, spooled_cutoff):
            lake.delete(k)
            n += 1
    return n
