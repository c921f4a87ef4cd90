"""The golden evaluation set: built from annotators' confirmed and corrected labels, frozen,
versioned, and held out of training forever.

The gate (:func:`vloop.learn.retrain.gate_decision`) decides on the golden set, so it must not
move under the models it compares, and no model may have seen it. Hence:

* **built from labels** (:func:`build_golden`, ``vloop golden build``): finished annotations whose
  verdict is "correct" (the model's answer, confirmed) or "wrong" with a typed correction, minus
  what training would refuse too (poor photos, opted-out or erased or unknown users, a "wrong"
  whose correction is still the model's answer), minus anything an earlier dataset trained on
  (same request, or the same photo with the same normalised question: a near-copy), one example
  per near-copy;
* **stratified** by category and intent (:func:`vloop.learn.evaluation.intent_of` where a label
  carries no intent): every (category, intent) stratum with labels gets at least
  ``min_per_stratum`` examples (or all it has), the rest of ``size`` goes to the strata in
  proportion to the labels they have; inside a stratum a salted hash of the request id decides
  (deterministic per ``seed``);
* **frozen and versioned**: version N lives under ``datasets/golden/versions/vN/`` (the examples
  and ``golden.json``: when, who, size, coverage per category and intent, sha256) and is copied to
  :data:`vloop.learn.dataset.GOLDEN_KEY`, the set in force, with ``datasets/golden/current.json``
  saying which version that is. Building again refuses to replace it; ``new_version=True`` cuts
  N+1 and keeps every earlier version (a set found at ``GOLDEN_KEY`` without a version record,
  e.g. written by :func:`vloop.learn.dataset.ensure_golden` before versions existed, is kept as v0);
* **held out forever**: :func:`held_out` is the request ids and (photo, question) pairs of the set
  in force *and every earlier version*; :func:`vloop.learn.dataset.build_dataset` drops them all,
  so retiring a version never lets its examples into training. Each dataset's manifest records
  the golden version it carried (``manifest["golden"]``), and the gate's figures in the registry
  name it.

An erased user's rows are removed from every version like from any other table with request ids
(:mod:`vloop.privacy.erasure` rewrites every Parquet object with a ``request_id`` column).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass

import pandas as pd

from vloop.curate import daily
from vloop.store.lake import Lake

GOLDEN_DIR = "datasets/golden/"
CURRENT_KEY = GOLDEN_DIR + "current.json"
VERSIONS = GOLDEN_DIR + "versions/"


def version_prefix(version: int) -> str:
    return f"{VERSIONS}v{int(version)}/"


class GoldenSetFrozen(ValueError):
    """A golden set is in force and building would silently replace it."""


@dataclass
class GoldenConfig:
    size: int = 200  # examples wanted
    min_size: int = 50  # fewer usable labels than this: refuse (the gate's paired test needs items)
    min_per_stratum: int = 5  # every (category, intent) with labels gets at least this many (or all it has)
    since: str | None = None  # first day of labels (YYYY-MM-DD); None: all
    until: str | None = None  # last day (inclusive); None: all
    seed: int = 0


def _pair(image_sha256: pd.Series, question: pd.Series) -> pd.Series:
    from vloop.curate.selection import normalise_question

    return image_sha256.astype(str) + "|" + question.map(normalise_question)


def current(lake: Lake) -> dict | None:
    """The version record of the set in force (``golden.json`` of its version), or None when
    there is none. A set at ``GOLDEN_KEY`` without a record is reported as version 0."""
    from vloop.learn.dataset import GOLDEN_KEY

    if lake.exists(CURRENT_KEY):
        return lake.get_json(CURRENT_KEY)
    if lake.exists(GOLDEN_KEY):
        return {"version": 0, "source": "unversioned (written before golden sets had versions)",
                "prefix": None}
    return None


def versions(lake: Lake) -> list[dict]:
    """Every cut version's record, oldest first."""
    out = []
    for k in lake.list(VERSIONS):
        if k.endswith("/golden.json"):
            out.append(lake.get_json(k))
    return sorted(out, key=lambda r: r["version"])


def load_version(lake: Lake, version: int | None = None) -> pd.DataFrame:
    """The examples of ``version`` (default: the set in force)."""
    from vloop.learn.dataset import GOLDEN_KEY

    if version is None:
        return daily.get_frame(lake, GOLDEN_KEY)
    return daily.get_frame(lake, version_prefix(version) + "golden.parquet")


def held_out(lake: Lake) -> tuple[set[str], set[str]]:
    """(request ids, photo|question pairs) of the golden set in force and of every version ever
    cut: what no training set may contain."""
    from vloop.learn.dataset import GOLDEN_KEY

    keys = [k for k in lake.list(VERSIONS) if k.endswith("/golden.parquet")]
    if lake.exists(GOLDEN_KEY):
        keys.append(GOLDEN_KEY)
    ids: set[str] = set()
    pairs: set[str] = set()
    for k in keys:
        g = daily.get_frame(lake, k)
        if "request_id" in g.columns:
            ids |= {str(r) for r in g["request_id"].dropna() if str(r)}
        if {"image_sha256", "question"} <= set(g.columns) and len(g):
            pairs |= set(_pair(g["image_sha256"], g["question"]))
    return ids, pairs


def _trained_on(lake: Lake) -> tuple[set[str], set[str]]:
    """(request ids, pairs) of every stored dataset's training split: a golden example must be
    something no adapter has learnt from."""
    ids: set[str] = set()
    pairs: set[str] = set()
    for k in lake.list("datasets/"):
        if k.startswith(GOLDEN_DIR) or not k.endswith("/train.parquet"):
            continue
        t = daily.get_frame(lake, k)
        if "request_id" in t.columns:
            ids |= {str(r) for r in t["request_id"].dropna()}
        if {"image_sha256", "question"} <= set(t.columns) and len(t):
            pairs |= set(_pair(t["image_sha256"], t["question"]))
    return ids, pairs


def candidates(lake: Lake, cfg: GoldenConfig | None = None) -> tuple[pd.DataFrame, dict]:
    """The labels a golden set may be drawn from (golden columns plus ``dt``), and how many were
    dropped for what."""
    from vloop.learn.dataset import (DatasetConfig, _poor_images, _sha_of_key, excluded_users, labels,
                                     wrong_without_correction)
    from vloop.learn.evaluation import intent_of
    from vloop.privacy import is_user_key

    cfg = cfg or GoldenConfig()
    lab = labels(lake, DatasetConfig(since=cfg.since, until=cfg.until))
    dropped: dict[str, int] = {}
    if not len(lab):
        return pd.DataFrame(columns=["request_id", "image_key", "image_sha256", "question", "answer", "category",
                                     "intent", "verdict", "dt"]), dropped

    def drop(mask: pd.Series, why: str) -> None:
        nonlocal lab
        dropped[why] = int(mask.sum())
        lab = lab[~mask]

    drop(~(lab["verdict"].isin(["correct", "wrong"]) & lab["corrected_answer"].fillna("").str.strip().ne("")),
         "unclear or empty label")
    drop(wrong_without_correction(lab), "wrong verdict without a correction")
    poor = _poor_images(lake, sorted(set(lab["selected_on"].dropna())))
    drop(lab["image_quality"].eq("poor") | lab["image_key"].isin(poor), "poor image")
    blocked = excluded_users(lake)
    drop(lab["user_key"].isin(blocked) | ~lab["user_key"].map(is_user_key), "opted-out, erased or unknown user")
    lab = lab.assign(image_sha256=lab["image_key"].map(_sha_of_key))
    pair = _pair(lab["image_sha256"], lab["question"])
    ids, pairs = _trained_on(lake)
    drop(lab["request_id"].astype(str).isin(ids) | pair.isin(pairs), "already trained on (or a near-copy of it)")
    pair = _pair(lab["image_sha256"], lab["question"])
    # One example per near-copy (same photo, same normalised question): the corrected label first.
    order = lab.assign(_pair=pair, _rank=lab["verdict"].ne("wrong").astype(int)).sort_values(["_rank", "request_id"])
    drop(order["_pair"].duplicated().reindex(lab.index), "near-copy of another label")
    intent = lab["intent"] if "intent" in lab.columns else pd.Series(None, index=lab.index, dtype=object)
    lab = lab.assign(answer=lab["corrected_answer"].str.strip(),
                     intent=intent.where(intent.notna(), lab["question"].map(intent_of)),
                     category=lab["category"].fillna("unknown"))
    return lab[["request_id", "image_key", "image_sha256", "question", "answer", "category", "intent", "verdict",
                "dt"]].reset_index(drop=True), dropped


def allocate(available: dict, total: int, floor: int) -> dict:
    """How many of ``total`` examples each stratum gets: first up to ``floor`` each (one per
    stratum per round, so a small total still spreads), then the rest in proportion to what each
    has left (largest remainders), never more than a stratum has."""
    alloc = {s: 0 for s in available}
    total = min(total, sum(available.values()))
    for _ in range(max(0, floor)):
        for s in sorted(available):
            if sum(alloc.values()) < total and alloc[s] < available[s]:
                alloc[s] += 1
    while sum(alloc.values()) < total:
        room = {s: available[s] - alloc[s] for s in sorted(available) if available[s] > alloc[s]}
        left, cap = total - sum(alloc.values()), sum(room.values())
        quota = {s: left * r / cap for s, r in room.items()}
        adds = {s: min(room[s], int(q)) for s, q in quota.items()}
        short = left - sum(adds.values())
        for s in sorted(room, key=lambda s: (-(quota[s] - int(quota[s])), s)):
            if short <= 0:
                break
            if adds[s] < room[s]:
                adds[s] += 1
                short -= 1
        for s, a in adds.items():
            alloc[s] += a
    return alloc


def stratified(cand: pd.DataFrame, size: int, min_per_stratum: int, seed: int = 0) -> pd.DataFrame:
    """``size`` rows of ``cand`` stratified by (category, intent) (see :func:`allocate`)."""
    if not len(cand):
        return cand
    key = cand["request_id"].astype(str).map(lambda r: hashlib.sha256(f"{seed}:{r}".encode()).hexdigest())
    cand = cand.assign(_key=key).sort_values(["category", "intent", "_key"])
    groups = dict(list(cand.groupby(["category", "intent"], sort=True)))
    alloc = allocate({s: len(g) for s, g in groups.items()}, size, min_per_stratum)
    out = pd.concat([groups[s].head(n) for s, n in alloc.items() if n], ignore_index=True)
    return out.drop(columns=["_key"])


def coverage(golden: pd.DataFrame) -> pd.DataFrame:
    """Examples per category (rows) and intent (columns), with totals."""
    if not len(golden):
        return pd.DataFrame()
    t = pd.crosstab(golden["category"], golden["intent"], margins=True, margins_name="all")
    t.columns.name = t.index.name = None
    return t


def _record(golden: pd.DataFrame, **fields) -> dict:
    strata = golden.groupby(["category", "intent"]).size() if len(golden) else pd.Series(dtype=int)
    return {**fields, "size": int(len(golden)),
            "by_category": {str(k): int(v) for k, v in golden["category"].value_counts().sort_index().items()},
            "by_intent": {str(k): int(v) for k, v in golden["intent"].value_counts().sort_index().items()},
            "by_stratum": {f"{c}|{i}": int(n) for (c, i), n in strata.items()}}


def freeze(lake: Lake, golden: pd.DataFrame, record: dict) -> dict:
    """Store ``golden`` as version ``record["version"]`` (refused if that version exists: two
    builders racing cannot both cut it) and make it the set in force. Returns the record."""
    from vloop.learn.dataset import GOLDEN_KEY

    prefix = version_prefix(record["version"])
    record = {**record, "prefix": prefix}
    if not lake.put_bytes_if_absent(prefix + "golden.json", json.dumps(record, indent=1).encode(),
                                    "application/json"):
        raise GoldenSetFrozen(f"golden set version {record['version']} already exists ({prefix}); "
                              f"another build cut it meanwhile: see `vloop golden show`")
    daily.put_frame(lake, prefix + "golden.parquet", golden)
    data = lake.get_bytes(prefix + "golden.parquet")
    lake.put_bytes(GOLDEN_KEY, data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    lake.put_bytes(prefix + "golden.json", json.dumps(record, indent=1).encode(), "application/json")
    lake.put_json(CURRENT_KEY, record)
    return record


def _keep_unversioned(lake: Lake) -> None:
    """A set at GOLDEN_KEY without a version record becomes v0, so cutting v1 keeps it."""
    from vloop.learn.dataset import GOLDEN_KEY

    if lake.exists(CURRENT_KEY) or not lake.exists(GOLDEN_KEY) or lake.exists(version_prefix(0) + "golden.json"):
        return
    golden = daily.get_frame(lake, GOLDEN_KEY)
    record = _record(golden, version=0, created_at=lake.modified(GOLDEN_KEY).isoformat(), actor="unknown",
                     source="unversioned set found at " + GOLDEN_KEY, prefix=version_prefix(0))
    data = lake.get_bytes(GOLDEN_KEY)
    lake.put_bytes(version_prefix(0) + "golden.parquet", data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    lake.put_bytes_if_absent(version_prefix(0) + "golden.json", json.dumps(record, indent=1).encode(),
                             "application/json")


def next_version(lake: Lake) -> int:
    cur = current(lake)
    return max([r["version"] for r in versions(lake)] + [cur["version"] if cur else 0]) + 1


def build_golden(lake: Lake, cfg: GoldenConfig | None = None, *, new_version: bool = False, actor: str = "cli",
                 now: dt.datetime | None = None) -> tuple[dict, pd.DataFrame]:
    """Build, freeze and put in force a golden set from annotators' labels (see the module
    docstring); returns (its version record, its examples). Refuses (:class:`GoldenSetFrozen`)
    when a set is in force and ``new_version`` is false; refuses (``ValueError``) with fewer than
    ``cfg.min_size`` usable labels."""
    from vloop.learn.dataset import COLUMNS

    cfg = cfg or GoldenConfig()
    cur = current(lake)
    if cur is not None and not new_version:
        raise GoldenSetFrozen(
            f"golden set v{cur['version']} is frozen ({cur.get('size', '?')} examples"
            f"{', built ' + cur['created_at'] if cur.get('created_at') else ''}): building again would silently "
            f"change what the gate measures. `vloop golden build --new-version` cuts v{next_version(lake)} "
            f"(v{cur['version']} is kept, and stays out of training); `vloop golden show` shows it")
    cand, dropped = candidates(lake, cfg)
    if len(cand) < cfg.min_size:
        raise ValueError(f"only {len(cand)} usable labels for a golden set (needs at least {cfg.min_size}; "
                         f"dropped: {', '.join(f'{k} {v}' for k, v in dropped.items() if v) or 'none'}): let "
                         f"annotators finish more tasks (feedback_daily's pull), or pass --min-size")
    picked = stratified(cand, cfg.size, cfg.min_per_stratum, cfg.seed)
    golden = picked.assign(example_id="golden-" + picked["request_id"].astype(str), source="golden",
                           split="golden")[COLUMNS].sort_values("example_id").reset_index(drop=True)
    available = cand.groupby(["category", "intent"]).size()
    if new_version:
        _keep_unversioned(lake)
    now = now or dt.datetime.now(dt.timezone.utc)
    record = _record(golden, version=next_version(lake), created_at=now.isoformat(timespec="seconds"),
                     actor=actor, source="labels", asked=cfg.size, config=asdict(cfg),
                     label_days=[str(min(picked["dt"])), str(max(picked["dt"]))],
                     verdicts={str(k): int(v) for k, v in picked["verdict"].value_counts().items()},
                     available={f"{c}|{i}": int(n) for (c, i), n in available.items()},
                     usable_labels=int(len(cand)), dropped=dropped,
                     replaces=cur["version"] if cur else None)
    return freeze(lake, golden, record), golden


def record_from_samples(lake: Lake, golden: pd.DataFrame) -> dict:
    """The version record of a set written from samples (:func:`vloop.learn.dataset.ensure_golden`)."""
    return _record(golden, version=next_version(lake), created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   actor="ensure_golden", source="samples")


def describe(record: dict | None, golden: pd.DataFrame | None) -> list[str]:
    """Lines for a person: version, size, how it was built, coverage per category and intent."""
    if record is None:
        return ["no golden set: `vloop golden build` freezes one from annotators' labels"]
    lines = [f"golden set v{record['version']}: {record.get('size', len(golden) if golden is not None else '?')} "
             f"examples" + (f" (asked for {record['asked']})" if record.get("asked") not in (None, record.get("size"))
                            else "")
             + (f", built {record['created_at']} by {record['actor']}" if record.get("created_at") else "")
             + f", from {record.get('source', '?')}"]
    if record.get("label_days"):
        lines.append(f"labels of {record['label_days'][0]} to {record['label_days'][1]}"
                     + (f"; verdicts {', '.join(f'{k} {v}' for k, v in sorted(record['verdicts'].items()))}"
                        if record.get("verdicts") else "")
                     + (f"; {record['usable_labels']} usable labels" if record.get("usable_labels") is not None else ""))
    if golden is not None and len(golden):
        lines.append("coverage (examples per category and intent):")
        lines += ["  " + line for line in coverage(golden).to_string().splitlines()]
        available = record.get("available") or {}
        thin = sorted(s for s, n in record.get("by_stratum", {}).items()
                      if n < (record.get("config") or {}).get("min_per_stratum", 0))
        if thin:
            lines.append("thin strata (fewer labels than --min-per-stratum; all taken): "
                         + ", ".join(f"{s.replace('|', '/')} {record['by_stratum'][s]}/{available.get(s, '?')}"
                                     for s in thin))
    if record.get("sha256"):
        lines.append(f"sha256 {record['sha256']}; stored under {record.get('prefix')}")
    return lines
