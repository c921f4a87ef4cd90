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
   watermarks (:func:`vloop.capture.spool.image_delete_cutoff`) — records still in any replica's spool or
   yet to come from a request being answered. Younger ones, and images of the user's records the
   shippers dropped (``privacy/erased_images/<key>/``), wait there for the next daily run;
7. adapters trained on a dataset that held the user are listed (lineage) and marked, once, for
   retraining in the registry's history;
8. one audit record says who erased which key when, and how much went.

It is idempotent: a second run finds nothing and removes nothing. Retention
(:func:`apply_retention`) deletes whole day partitions older than the configured number of days,
and images nothing references any more once they are older than the raw-data limit.

The scan reads every Parquet object once per step however many users it erases: the
``privacy_maintenance`` DAG erases its whole queue in one pass (:func:`erase_users`); at a scale
where even that is too slow, an index from user key to objects is the next step.

Registry versions embed their evaluation's metrics (paired per-example results by example id):
those are cleaned like the adapter's own ``metrics.json`` (:func:`clean_metrics`: an id goes with
its paired entries, the figures are marked). A day's phrasings keep the request ids their
wordings came from and are rebuilt from the cleaned candidates. :data:`LAYOUT` declares every
kind of object the lake holds and how erasure treats it.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import json
import logging
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vloop.store.lake import Lake, LakeKeyNotFound
from vloop.privacy.records import (ERASED_REQUESTS, _check_key, audit, read_tombstones, record_erased_requests,
                                   record_tombstone, request_hash)
from vloop.capture.spool import ERASED_IMAGES, image_delete_cutoff

log = logging.getLogger(__name__)

IMAGES = "raw/images/"
QUEUE = "privacy/erasure_requests/"  # one object per pending request (the user key, never the raw id)
DONE = "privacy/erasure_done/"
# Never scanned as rows: the privacy records themselves, the registry (its versions' metrics are
# cleaned on their own), and images (handled by reference). Of adapters/ only the JSON (evaluation
# metrics name held-out examples by request id) is scanned, not the weights. rollout/ is: its
# hourly count snapshots hold request ids.
SKIP = ("privacy/", "registry/", IMAGES)
REGISTRY_VERSIONS = "registry/versions/"  # read for the metrics each version embeds
METRICS = "metrics.json"  # an adapter's evaluation: paired per-example results by example id
PHRASINGS = "phrasings.parquet"  # a day's clustered wordings, with the requests they came from

# Every kind of object the lake holds (shell patterns, first match wins) and how an erasure
# treats it. tests/test_erasure.py lists a demo-like lake and fails on a key no pattern declares:
# a new kind of object must be covered here, or declared free of personal data, before it ships.
LAYOUT: tuple[tuple[str, str], ...] = (
    ("privacy/*", "privacy: the erasure's own records (tombstones, request hashes, audit) name the key"),
    ("raw/images/*", "images: deleted once only erased users' records referenced them"),
    ("raw/*/_manifest.json", "json: a day's file list, scanned for whole values"),
    ("raw/*.parquet", "rows"),
    ("curated/dt=*/phrasings.parquet", "phrasings: rebuilt from the cleaned candidates (request_ids)"),
    ("curated/*/mined_counts.parquet", "free: interactions and bad ones per category"),
    ("curated/dt=*/slices.json", "free: how the day was cut into slices (hours, timestamps, row counts)"),
    ("curated/*/validated_id_hashes.parquet", "free: 64-bit hashes of a slice's request and event ids (the gate's "
     "uniqueness check), no row content"),
    ("curated/*/report_part.json", "report part: a slice's counts for the report, made again from the cleaned slice"),
    ("curated/*/image_quality.parquet", "image rows: rows about images only erased users sent"),
    ("curated/*image_keys.parquet", "image rows: a slice's image keys, those only erased users sent removed"),
    ("curated/*.parquet", "rows"),
    ("quarantine/*.parquet", "rows"),
    ("quarantine/*.json", "json: validation results, the shipper's quarantined records"),
    ("labeling/*.parquet", "rows"),
    ("labeling/*.json", "json: request ids pushed to Label Studio"),
    ("labeled/*.parquet", "rows"),
    ("reports/dt=*", "report: the days the users appeared on are rebuilt from the cleaned data"),
    ("reports/loop/*", "free: the demo's loop report, figures per round"),
    # A golden set is drawn from users' labelled requests (vloop golden build): its rows are erased
    # like any dataset's (datasets/*.parquet); its records hold only counts and a hash.
    ("datasets/golden/*.json", "free: a golden set version's size, counts per stratum and hash"),
    ("datasets/*/manifest.json", "manifest: recounted, the erasure noted"),
    ("datasets/*.parquet", "rows"),
    ("adapters/*/" + METRICS, "metrics: example ids removed with their paired entries, figures marked"),
    ("adapters/*.json", "json: training settings and adapter config, scanned for whole values"),
    ("adapters/*", "lineage: weights and model card; the adapter is marked for retraining"),
    ("registry/versions/*", "metrics: the evaluation each version embeds, cleaned as adapters' metrics"),
    ("registry/events/*", "free: statuses, aliases, gate figures (aggregates); lineage events name the key"),
    ("registry/serving/*", "free: serving states (version names, shares, experiment salt)"),
    ("rollout/*/counts/*.parquet", "rows"),
    ("rollout/*", "free: looks, aggregates per arm"),
    ("shippers/*", "free: a spool's watermark"),
    ("config/*", "free: decoding settings and their history"),
)


def coverage(key: str) -> str | None:
    """How an erasure treats ``key`` (:data:`LAYOUT`), or None where nothing declares it."""
    return next((how for pattern, how in LAYOUT if fnmatch.fnmatchcase(key, pattern)), None)
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


def _user_mask(table: pa.Table, keys: set[str], request_ids: set[str]) -> pa.Array | None:
    """True for the rows of ``table`` that are the users' (by key or by one of their requests)."""
    masks = []
    if "user_key" in table.column_names:
        masks.append(pc.fill_null(pc.is_in(table["user_key"].cast(pa.string()),
                                           value_set=pa.array(sorted(keys), pa.string())), False))
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

    def __init__(self, keys: set[str], request_ids: set[str]):
        self.values = set(keys) | set(request_ids)

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
    :class:`vloop.curate.labelstudio.LabelStudio` client, or None where no Label Studio is configured."""
    return erase_users(lake, [user_key], actor=actor, label_studio=label_studio, now=now,
                       rebuild_reports=rebuild_reports)[0]


def erase_users(lake: Lake, user_keys: list[str], *, actor: str, label_studio=None,
                now: dt.datetime | None = None, rebuild_reports: bool = True) -> list[ErasureResult]:
    """Erase several users in one pass over the lake (the queue's way): one listing, and each
    object read once per step whatever the number of users, where erasing them one by one would
    scan the whole lake once each. The lake ends as the one-by-one erasures leave it; each user
    gets their own result, tombstone, erasure record and audit record."""
    user_keys = list(dict.fromkeys(_check_key(k) for k in user_keys))
    if not user_keys:
        return []
    now = now or dt.datetime.now(dt.timezone.utc)
    wanted = set(user_keys)
    results = {u: ErasureResult(u, already_tombstoned=not record_tombstone(lake, u, at=now)) for u in user_keys}
    # Read before the rows are: see image_delete_cutoff. With the notes of images waiting.
    image_cutoff = image_delete_cutoff(lake, now=now)
    image_notes = {u: lake.list(f"{ERASED_IMAGES}{u}/") for u in user_keys}
    listing = lake.list("")
    keys = [k for k in listing if not k.startswith(SKIP)
            and (not k.startswith("adapters/") or k.endswith(".json"))]
    # Registry versions embed their evaluation's metrics (example ids of held-out labels).
    versions = [k for k in listing if k.startswith(REGISTRY_VERSIONS) and k.endswith(".json")]
    parquet = [k for k in keys if k.endswith(".parquet")]

    # Pass 1: the users' requests and images, wherever a row carries one of their keys. One
    # object in memory at a time (the passes read again rather than hold the lake).
    request_ids: dict[str, set[str]] = {u: set() for u in user_keys}
    images: dict[str, set[str]] = {u: set() for u in user_keys}
    about_users, about_images, phrasings = [], [], []  # user or request columns; images only; phrasings
    for k in parquet:
        t = lake.read_parquet(k)
        cols = set(t.column_names)
        if cols & {"user_key", "request_id"}:
            about_users.append(k)
        elif "image_key" in cols:
            about_images.append(k)
        if "request_ids" in cols or k.endswith("/" + PHRASINGS):
            phrasings.append(k)
        if "user_key" in cols:
            mine = t.filter(_user_mask(t, wanted, set()))
            for u, r, img in zip(mine["user_key"].to_pylist(), _values(mine, "request_id"), _values(mine, "image_key")):
                if r is not None:
                    request_ids[u].add(r)
                if img is not None:
                    images[u].add(img)

    # Before anything is removed, what identifies the users' requests is kept (hashed): a run that
    # fails midway (Label Studio down, a lake error) and its retry still find everything, and a
    # late copy (a re-shipped segment, an annotation pulled again) is recognised.
    hashes = {u: record_erased_requests(lake, u, {request_hash(r) for r in request_ids[u]}) for u in user_keys}
    # Erased before: only their hashes are left.
    unseen = {h: u for u in user_keys for h in hashes[u] - {request_hash(r) for r in request_ids[u]}}
    # Label Studio next: while its tasks exist, a daily pull could bring the labels back.
    if label_studio is not None:
        for u in user_keys:
            results[u].label_studio_tasks_deleted = label_studio.delete_tasks_of(u, hashes[u])

    def area_add(u: str, k: str, n: int = 1) -> None:
        res = results[u]
        res.rows_removed[_area(k)] = res.rows_removed.get(_area(k), 0) + n
        if k not in res.objects_rewritten:
            res.objects_rewritten.append(k)

    # Pass 2: remove the users' rows; note what everyone else's rows still reference.
    all_ids = set().union(*request_ids.values())
    owner = {r: u for u in user_keys for r in request_ids[u]}
    others_images: set[str] = set()
    days: dict[str, set[str]] = {u: set() for u in user_keys}
    datasets: dict[str, dict[str, int]] = {u: {} for u in user_keys}
    candidates_changed: set[str] = set()  # days whose phrasing candidates lost rows
    for k in about_users:
        t = lake.read_parquet(k)
        mask = _user_mask(t, wanted, all_ids)
        if mask is None:  # request ids only, and none of theirs known
            others_images |= _column_set(t, "image_key")
            continue
        if unseen and "request_id" in t.column_names:
            by_hash = pa.array([r is not None and request_hash(r) in unseen for r in t["request_id"].to_pylist()],
                               pa.bool_())
            mask = pc.or_(mask, by_hash)
        n = pc.sum(mask).as_py() or 0
        kept = t.filter(pc.invert(mask)) if n else t
        others_images |= _column_set(kept, "image_key")
        if not n:
            continue
        gone = t.filter(mask)
        day = m.group(1) if (m := _DAY.search("/" + k)) else None
        for u, img in zip(_owners(gone, wanted, owner, unseen), _values(gone, "image_key")):
            area_add(u, k)
            if img is not None:
                images[u].add(img)
            if day:
                days[u].add(day)
            if k.startswith("datasets/"):
                ds = k.split("/")[1]
                datasets[u][ds] = datasets[u].get(ds, 0) + 1
        lake.write_parquet(k, kept)
        if day and k.endswith("/phrasing_candidates.parquet"):
            candidates_changed.add(day)
    for u in user_keys:  # images waiting from an earlier run, or of records a shipper dropped
        for k in image_notes[u]:
            images[u] |= set(lake.get_json(k).get("images", []))
    only_theirs = set().union(*images.values()) - others_images
    image_owner = {img: u for u in user_keys for img in images[u]}  # the last one's erasure deletes it

    # Pass 3: rows keyed by image only (image quality) for images that were only the users'.
    for k in about_images if only_theirs else []:
        t = lake.read_parquet(k)
        mask = pc.fill_null(pc.is_in(t["image_key"].cast(pa.string()),
                                     value_set=pa.array(sorted(only_theirs), pa.string())), False)
        if pc.sum(mask).as_py():
            for img in t.filter(mask)["image_key"].to_pylist():
                area_add(image_owner[img], k)
            lake.write_parquet(k, t.filter(pc.invert(mask)))

    # The day's phrasings: clusters of wordings with the requests they came from. A day whose
    # clusters name one of the requests, or whose candidates just lost rows (phrasings written
    # before they kept request ids), is rebuilt from its cleaned candidates.
    for k in phrasings:
        _erase_phrasings(lake, k, all_ids, owner, unseen, candidates_changed, days, area_add)

    # JSON objects that list the users' requests (pushed.json, the shipper's quarantine, adapter
    # evaluations naming held-out examples), and the registry versions' copies of those metrics.
    needles = _Needles(wanted, all_ids)
    theirs = {u: _Needles({u}, request_ids[u]) for u in user_keys}
    for k in [k for k in keys if k.endswith(".json") and not k.endswith("/manifest.json")] + versions:
        obj = lake.get_json(k)
        if not _mentions(obj, needles):
            continue
        who = [u for u in user_keys if _mentions(obj, theirs[u])]
        if k.startswith(REGISTRY_VERSIONS):
            # Written once by the registry, rewritten only here: the example ids must go.
            lake.put_json(k, _without({**obj, "metrics": clean_metrics(obj.get("metrics") or {}, needles)}, needles))
        elif k.endswith("/" + METRICS):
            lake.put_json(k, clean_metrics(obj, needles))
        else:
            lake.put_json(k, _without(obj, needles))
        for u in who:
            area_add(u, k)

    waiting: dict[str, set[str]] = {u: set() for u in user_keys}
    for img in sorted(only_theirs):
        if not lake.exists(img):
            continue
        if lake.modified(img) < image_cutoff:
            lake.delete(img)
            results[image_owner[img]].images_deleted += 1
        else:  # written since the oldest watermark: a record in some spool may still name it
            waiting[image_owner[img]].add(img)
    for u in user_keys:
        if waiting[u]:
            lake.put_json(f"{ERASED_IMAGES}{u}/waiting.json", {"user_key": u, "images": sorted(waiting[u])})
        for k in image_notes[u]:
            if not (waiting[u] and k.endswith("/waiting.json")):
                lake.delete(k)
        results[u].images_waiting = len(waiting[u])

    touched = {ds for u in user_keys for ds in datasets[u]}
    for ds in sorted(touched):  # manifests keep describing what the snapshot holds
        mk = f"datasets/{ds}/manifest.json"
        if lake.exists(mk):
            m = lake.get_json(mk)
            for split in m.get("examples", {}):
                sk = f"datasets/{ds}/{split}.parquet"
                if lake.exists(sk):
                    m["examples"][split] = _row_count(lake, sk)
            for u in user_keys:  # one entry per erasure, as one-by-one erasures write them
                if ds in datasets[u]:
                    m.setdefault("erasures", []).append({"at": now.isoformat(), "examples_removed": datasets[u][ds]})
                    results[u].objects_rewritten.append(mk)
            lake.put_json(mk, m)
    # Days and datasets go into the erasure record too, so a retry still rebuilds those reports
    # and marks those adapters (their rows are already gone by then).
    all_days: set[str] = set()
    user_days: dict[str, set[str]] = {}
    registered = None
    for u in user_keys:
        record = _update_record(lake, u, days=days[u], datasets=set(datasets[u]))
        user_days[u] = set(record["days"])
        all_days |= user_days[u]
        if record["datasets"] and registered is None:
            from vloop.learn.registry import Registry

            registered = Registry(lake).versions()
        results[u].adapters_to_retrain = _mark_lineage(lake, set(record["datasets"]), actor=actor, user_key=u,
                                                       already=set(record.get("adapters", [])),
                                                       versions=registered or [])
        _update_record(lake, u, adapters=set(results[u].adapters_to_retrain))
    for k in _refresh_report_parts(lake, sorted(all_days), _folders_rewritten(results)):
        for u in user_keys:
            if _DAY.search(k).group(1) in user_days[u]:
                results[u].objects_rewritten.append(k)
    reports = _rebuild_reports(lake, sorted(all_days)) if rebuild_reports else []

    for u in user_keys:
        res = results[u]
        res.reports_rebuilt = [d for d in reports if d in set(_update_record(lake, u)["days"])]
        audit(lake, "erase", actor=actor, at=now, user_key=u, rows_removed=res.total_rows,
              objects_rewritten=len(res.objects_rewritten), images_deleted=res.images_deleted,
              label_studio_tasks_deleted=res.label_studio_tasks_deleted,
              adapters_to_retrain=res.adapters_to_retrain)
        log.info("erased %s…: %d rows in %d objects, %d images, %d Label Studio tasks", u[:12],
                 res.total_rows, len(res.objects_rewritten), res.images_deleted, res.label_studio_tasks_deleted)
    return [results[u] for u in user_keys]


def _values(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _owners(gone: pa.Table, wanted: set[str], owner: dict[str, str], unseen: dict[str, str]) -> list[str]:
    """Whose each removed row was: its user key, else the user of its request (known, or by hash)."""
    out = []
    for u, r in zip(_values(gone, "user_key"), _values(gone, "request_id")):
        out.append(u if u in wanted else owner.get(r) or unseen[request_hash(r)])
    return out


def _erase_phrasings(lake: Lake, k: str, all_ids: set[str], owner: dict[str, str], unseen: dict[str, str],
                     candidates_changed: set[str], days: dict[str, set[str]], area_add) -> None:
    from vloop.curate import daily
    from vloop.curate.mining import PHRASING_ARROW, cluster_phrasings

    t = lake.read_parquet(k)
    day = m.group(1) if (m := _DAY.search("/" + k)) else None
    hit: dict[int, str] = {}  # row -> a user whose request it names
    if "request_ids" in t.column_names:
        for i, ids in enumerate(t["request_ids"].to_pylist()):
            for r in ids or []:
                if r in all_ids or request_hash(r) in unseen:
                    hit[i] = owner.get(r) or unseen[request_hash(r)]
                    break
    if not hit and day not in candidates_changed:
        return
    rebuilt = None
    try:
        candidates = daily.read_table(lake, daily.CURATED, day, "phrasing_candidates.parquet") if day else None
    except LakeKeyNotFound:
        candidates = None
    if candidates is not None and (len(candidates) or not hit):
        rebuilt = pa.Table.from_pandas(cluster_phrasings(candidates)[PHRASING_ARROW.names], schema=PHRASING_ARROW,
                                       preserve_index=False)
    if rebuilt is None:  # the candidates are gone: drop the clusters that name the users' requests
        rebuilt = t.filter(pa.array([i not in hit for i in range(t.num_rows)], pa.bool_()))
    lake.write_parquet(k, rebuilt)
    users = set(hit.values()) or {u for u, d in days.items() if day in d}
    for u in users:
        area_add(u, k, max(1, sum(1 for v in hit.values() if v == u)))


def clean_metrics(metrics: dict, needles: "_Needles") -> dict:
    """An evaluation's metrics (``metrics.json``, and its copy in a registry version) without the
    erased examples. A paired list loses each erased example id *together with* the entries at the
    same position in ``candidate_correct``/``champion_correct`` (every list of its length), so the
    gate's paired test stays aligned and recomputes on what is left; those figures are written
    beside it (``paired_after_erasure``). The per-set aggregates (exact match, F1, by category)
    need the predictions to recompute: they are marked as computed with examples since erased
    (``erased_examples``: per set, how many)."""
    m = json.loads(json.dumps(metrics))
    removed: dict[str, int] = {}
    paired: dict[str, dict] = {}

    def clean(name: str, p) -> None:
        ids = p.get("example_id") if isinstance(p, dict) else None
        if not isinstance(ids, list):
            return
        keep = [i for i, x in enumerate(ids) if not (isinstance(x, str) and needles(x))]
        paired[name] = p
        if len(keep) == len(ids):
            return
        for f, vals in list(p.items()):
            if isinstance(vals, list) and len(vals) == len(ids):
                p[f] = [vals[i] for i in keep]
        removed[name] = removed.get(name, 0) + len(ids) - len(keep)

    for name, p in (m.get("paired") or {}).items():
        clean(name, p)
    for name, s in (m.get("sets") or {}).items():
        if isinstance(s, dict):
            clean(name, s.get("paired"))
    if removed:
        erased = m.setdefault("erased_examples", {})
        for name, n in removed.items():
            erased[name] = erased.get(name, 0) + n
        m["erased_examples_note"] = ("the sets' figures were computed with these examples, since erased; the "
                                     "paired lists no longer hold them and paired_after_erasure is computed "
                                     "from what is left")
        after = m.setdefault("paired_after_erasure", {})
        for name in removed:
            after[name] = _paired_figures(paired[name])
    return _without(m, needles)


def _paired_figures(p: dict) -> dict:
    from vloop.learn.retrain import mcnemar_exact_p

    cand = [bool(x) for x in p.get("candidate_correct", [])]
    champ = [bool(x) for x in p.get("champion_correct", [])]
    n = min(len(cand), len(champ))
    b = sum(x and not y for x, y in zip(cand, champ))
    c = sum(y and not x for x, y in zip(cand, champ))
    em_c, em_h = (sum(cand[:n]) / n, sum(champ[:n]) / n) if n else (None, None)
    return {"n": n, "b": b, "c": c, "candidate": None if em_c is None else round(em_c, 6),
            "champion": None if em_h is None else round(em_h, 6),
            "difference": None if em_c is None else round(em_c - em_h, 6), "p": mcnemar_exact_p(b, c) if n else None}


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


def _mark_lineage(lake: Lake, datasets: set[str], *, actor: str, user_key: str, already: set[str],
                  versions: list | None = None) -> list[str]:
    """Adapters trained on one of ``datasets``: recorded (once) in the registry's history as
    needing a retrain without the erased data (the next retrain_biweekly run trains on cleaned
    data). ``versions``: the registry's versions, read once for a queue of users."""
    from vloop.learn.registry import Registry

    if not datasets:
        return []
    reg = Registry(lake)
    refs = sorted(v.ref for v in (versions if versions is not None else reg.versions()) if v.dataset_id in datasets)
    for ref in set(refs) - already:
        reg.record("needs_retraining", {"ref": ref, "user_key": user_key}, actor=actor,
                   reason="trained on data of a user since erased")
    return refs


def _row_count(lake: Lake, key: str) -> int:
    """The rows of a Parquet object, from its footer."""
    return pq.read_metadata(io.BytesIO(lake.get_bytes(key))).num_rows


_SLICE_TABLE = re.compile(r"^(curated/dt=[^/]+/(?:[^/]+/)?)(?:interactions|feedback|mined|edit_errors)\.parquet$")


def _folders_rewritten(results: dict[str, ErasureResult]) -> set[str]:
    """The curated folders (a slice, an hour, a day) whose tables this erasure rewrote."""
    return {m.group(1) for res in results.values() for k in res.objects_rewritten if (m := _SLICE_TABLE.match(k))}


def _refresh_report_parts(lake: Lake, days: list[str], rewritten: set[str]) -> list[str]:
    """Make the report parts (their counts: vloop.curate.daily.REPORT_PART) of ``days``' slices
    again from the cleaned tables, so no later report counts an erased user; the keys rewritten.
    A part is made again where this erasure rewrote its slice's tables (``rewritten``), or where
    its counts of rows no longer match the tables' (a retry, whose rows were already gone). A
    slice without a part is left to the report, which makes it."""
    from vloop.curate import daily

    changed = []
    for d in days:
        try:
            folders = [f for _, f in daily._slice_folders(lake, dt.date.fromisoformat(d))]
        except LakeKeyNotFound:  # nothing curated that day
            continue
        for folder in folders:
            k = folder + daily.REPORT_PART
            if not lake.exists(k) or not lake.exists(folder + "mined.parquet"):
                continue
            part = lake.get_json(k)
            if folder in rewritten or (part["interactions"], part["feedback"]) != (
                    _row_count(lake, folder + "interactions.parquet"), _row_count(lake, folder + "feedback.parquet")):
                lake.put_json(k, daily.report_counts_of(lake, folder))
                changed.append(k)
    return changed


def _rebuild_reports(lake: Lake, days: list[str]) -> list[str]:
    """Re-render the daily reports of ``days`` from the cleaned data (they may quote the user)."""
    from vloop.curate import daily

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
    data before the tombstone existed may have written it back after the first sweep.

    All of them, queued and swept again, are erased together in one pass over the lake
    (:func:`erase_users`), not one whole-lake scan each."""
    pending = pending_erasures(lake)
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=resweep_days)
    # Also users with images waiting (too recent last time, or dropped by a shipper since).
    waiting = {k[len(ERASED_IMAGES):].split("/")[0] for k in lake.list(ERASED_IMAGES)}
    resweep = [key for key in sorted(read_tombstones(lake) - set(pending))
               if key in waiting or lake.modified(f"privacy/tombstones/{key}.json") >= since]
    results = erase_users(lake, pending + resweep, actor=actor, label_studio=label_studio)
    done = []
    for res in results[:len(pending)]:
        summary = res.summary()
        lake.put_json(f"{DONE}{res.user_key}.json",
                      {**summary, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()})
        lake.delete(f"{QUEUE}{res.user_key}.json")
        done.append(summary)
    for res in results[len(pending):]:
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
        from vloop.store.config import load_settings

        s = s or load_settings()
        return cls(s.retain_raw_days, s.retain_curated_days, s.retain_labeled_days, s.retain_datasets_days)


def apply_retention(lake: Lake, policy: RetentionPolicy, *, today: dt.date, actor: str) -> dict:
    """Delete day partitions older than the policy allows (a partition of day D goes once
    ``today - D > days``), datasets built longer ago than ``datasets_days`` that no serving
    adapter was trained on, and images nothing references once older than ``raw_days``."""
    from vloop.curate import daily
    from vloop.store.lake import FEEDBACK_DATASET, INTERACTIONS_DATASET

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
    from vloop.learn.registry import Registry

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
