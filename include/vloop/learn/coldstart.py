"""Cold start: the first adapter, from an expert-written seed set, before any user has asked.

``vloop cold-start --seed FILE`` runs :func:`cold_start`:

1. **read and validate** the seed file (:func:`read_seed`): JSON Lines or CSV, one example per
   row with ``image`` (a path relative to the seed file, or an http(s) URL), ``question``,
   ``answer`` and ``category``. Every bad row is reported with its line number and the reason
   (missing field, unreadable image, question too long, duplicate image + question, ...); by
   default one bad row refuses the whole file (:class:`SeedError`), since an expert set with
   errors should be fixed, not silently thinned;
2. **expand** each question with paraphrase templates of the same intent and language
   (:func:`template_library`: the shipped library, ``vloop/data/paraphrases.json``, plus the
   phrasings users themselves used for questions the model handled badly, mined daily by
   :func:`vloop.curate.mining.mine_phrasings` into ``curated/dt=*/phrasings.parquet``), so the adapter
   does not learn one wording only;
3. **build a dataset** in the lake (``datasets/<id>/``, the same layout as
   :func:`vloop.learn.dataset.build_dataset`: a held-out share of the seed rows, never expanded, for
   evaluation; the golden set when the lake has one);
4. **train and evaluate** with the training job (:mod:`training.job`, the same code the biweekly
   retraining runs), against the base model;
5. **register** the adapter like any other (a candidate with its lineage; the offline gate's
   verdict on the held-out rows is recorded, and a candidate that fails it is rejected).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

SEED_FIELDS = ("image", "question", "answer", "category")
MAX_ANSWER_CHARS = 500  # a seed answer is what the assistant should say: short
MAX_REPORTED_ERRORS = 50
LIBRARY = "data/paraphrases.json"  # inside the vloop package
TEMPLATED_INTENTS = ("colour", "category", "count")  # questions that carry no specifics of their own


class SeedError(ValueError):
    """The seed file, or some of its rows, cannot be used; ``errors`` holds (line, reason)."""

    def __init__(self, path, errors: list[tuple[int, str]]):
        self.errors = errors
        shown = "\n".join(f"  line {n}: {why}" for n, why in errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        super().__init__(f"seed file {path}: {len(errors)} bad row(s) refused:\n{shown}{more}")


@dataclass
class SeedRow:
    line: int
    image: str  # as written in the file
    question: str
    answer: str
    category: str
    image_bytes: bytes = field(default=b"", repr=False)


@dataclass
class ColdStartConfig:
    adapter_name: str = "vqa"
    paraphrases: int = 3  # extra wordings per seed question (where its intent has templates)
    heldout_share: float = 0.15  # seed rows kept apart for the evaluation and the gate
    skip_bad_rows: bool = False  # train on the good rows and report the bad ones, instead of refusing
    min_rows: int = 10
    min_template_users: int = 3  # a mined phrasing joins the library once this many users used it
    work_dir: str = "var/training"
    seed: int = 0
    lora: dict = field(default_factory=dict)  # overrides of training.lora.LoraTrainConfig


# -- reading and validating ---------------------------------------------------------------------

def _records(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, record or None, why not) for each row of a JSONL or CSV file."""
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    out = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                out.append((n, None, f"not valid JSON ({e.msg})"))
                continue
            out.append((n, rec, None) if isinstance(rec, dict) else (n, None, "not a JSON object"))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = [f for f in SEED_FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            return [(1, None, f"the header lacks the column(s) {', '.join(missing)}; it needs {', '.join(SEED_FIELDS)}")]
        start = 2
        for rec in reader:
            out.append((start, rec, None))
            start = reader.line_num + 1  # a quoted field may span lines: the next row starts after
    else:
        raise SeedError(path, [(0, f"unknown format {suffix or '(no extension)'}: use .jsonl or .csv")])
    return out


def _load_image(ref: str, base: Path, settings) -> bytes:
    from vloop.store.images import normalise_image

    if re.match(r"^https?://", ref, re.I):
        from vloop.capture.netguard import FetchPolicy, fetch_url

        data = fetch_url(ref, FetchPolicy.from_env(settings.fetch_allowlist, max_bytes=settings.max_image_bytes))
    else:
        p = Path(ref) if Path(ref).is_absolute() else base / ref
        if not p.is_file():
            raise ValueError(f"image not found: {ref}")
        data = p.read_bytes()
    # Checked as every image entering the lake is (format, size, pixels, corruption).
    normalise_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    return data


def read_seed(path, settings=None) -> tuple[list[SeedRow], list[tuple[int, str]]]:
    """The good rows of a seed file and the bad ones as (line, reason), both in file order."""
    from vloop.store.config import load_settings
    from vloop.vlm.model import InputError, check_question
    from vloop.curate.selection import normalise_question

    path = Path(path)
    if not path.is_file():
        raise SeedError(path, [(0, "no such file")])
    settings = settings or load_settings()
    good, bad = [], []
    seen: dict[str, int] = {}
    for n, rec, why in _records(path):
        if rec is None:
            bad.append((n, why))
            continue
        vals = {f: rec.get(f) for f in SEED_FIELDS}
        empty = [f for f, v in vals.items() if not isinstance(v, str) or not v.strip()]
        if empty:
            bad.append((n, f"missing or empty: {', '.join(empty)}"))
            continue
        vals = {f: v.strip() for f, v in vals.items()}
        try:
            check_question(vals["question"])
        except InputError as e:
            bad.append((n, f"question: {e}"))
            continue
        if len(vals["answer"]) > MAX_ANSWER_CHARS:
            bad.append((n, f"answer is {len(vals['answer'])} characters, over {MAX_ANSWER_CHARS}"))
            continue
        if not re.fullmatch(r"[\w\- ]{1,40}", vals["category"]):
            bad.append((n, f"category {vals['category']!r}: use up to 40 letters, digits, spaces or dashes"))
            continue
        try:
            data = _load_image(vals["image"], path.parent, settings)
        except (OSError, ValueError) as e:  # ImageError and FetchError are ValueErrors
            bad.append((n, f"image {vals['image']}: {e}"))
            continue
        pair = hashlib.sha256(data).hexdigest() + "|" + normalise_question(vals["question"])
        if pair in seen:
            bad.append((n, f"duplicates line {seen[pair]} (same image and question)"))
            continue
        seen[pair] = n
        good.append(SeedRow(n, vals["image"], vals["question"], vals["answer"], vals["category"], data))
    return good, bad


# -- the paraphrase template library --------------------------------------------------------------

def shipped_templates() -> dict[str, dict[str, list[str]]]:
    from importlib.resources import files

    return json.loads(files("vloop").joinpath(LIBRARY).read_text(encoding="utf-8"))["templates"]


def template_library(lake=None, min_users: int = 3) -> dict[str, dict[str, list[str]]]:
    """intent -> language -> templates: the shipped ones, then users' phrasings mined from the
    lake (``curated/dt=*/phrasings.parquet``) that at least ``min_users`` users used in all."""
    lib = {i: {lang: list(ts) for lang, ts in by.items()} for i, by in shipped_templates().items()}
    if lake is None:
        return lib
    from vloop.curate import daily
    from vloop.curate.selection import normalise_question

    mined = daily.read_days(lake, daily.CURATED, "phrasings.parquet")
    if not len(mined):
        return lib
    total = mined.groupby(["intent", "lang", "phrasing"])["users"].sum().reset_index()
    for r in total[total["users"] >= min_users].sort_values(["users", "phrasing"], ascending=[False, True]).itertuples():
        have = lib.setdefault(r.intent, {}).setdefault(r.lang, [])
        if normalise_question(r.phrasing) not in {normalise_question(t) for t in have}:
            have.append(r.phrasing)
    return lib


def expand(question: str, library: dict, k: int, seed: str) -> list[str]:
    """Up to ``k`` other wordings of ``question`` from the library (same intent and language),
    chosen by a hash of ``seed`` so the same row always gets the same ones."""
    from vloop.learn.evaluation import intent_of
    from vloop.curate.mining import language_of
    from vloop.curate.selection import normalise_question

    intent = intent_of(question)
    if intent not in TEMPLATED_INTENTS or k <= 0:
        return []
    own = normalise_question(question)
    pool = [t for t in library.get(intent, {}).get(language_of(question), []) if normalise_question(t) != own]
    pool.sort(key=lambda t: hashlib.sha256(f"{seed}|{t}".encode()).hexdigest())
    return pool[:k]


# -- dataset, training, registration ------------------------------------------------------------

def build_seed_dataset(lake, rows: list[SeedRow], cfg: ColdStartConfig, *, source_name: str,
                       refused: list[tuple[int, str]] = ()) -> dict:
    """Store the images and a dataset (``datasets/<id>/``) made from the seed rows; its manifest."""
    from vloop.curate import daily
    from vloop.learn.dataset import COLUMNS, GOLDEN_KEY, ensure_golden
    from vloop.learn.evaluation import intent_of

    library = template_library(lake, cfg.min_template_users)
    recs = []
    for r in rows:
        img = lake.put_image(r.image_bytes)
        rid = f"seed-{hashlib.sha256((img.sha256 + '|' + r.question).encode()).hexdigest()[:12]}"
        bucket = int(rid[5:13], 16) / 16 ** 8
        split = "heldout" if bucket < cfg.heldout_share else "train"
        base = {"request_id": rid, "image_key": img.key, "image_sha256": img.sha256, "answer": r.answer,
                "category": r.category, "split": split}
        recs.append({**base, "example_id": f"{rid}-0", "source": "seed", "question": r.question})
        if split == "train":  # held-out rows stay as the expert wrote them
            for j, q in enumerate(expand(r.question, library, cfg.paraphrases, f"{cfg.seed}|{rid}"), start=1):
                recs.append({**base, "example_id": f"{rid}-{j}", "source": "seed_paraphrase", "question": q})
    df = pd.DataFrame(recs)
    df["intent"] = df["question"].map(intent_of)
    df = df[COLUMNS].sort_values("example_id").reset_index(drop=True)
    golden = ensure_golden(lake) if lake.exists(GOLDEN_KEY) else pd.DataFrame(columns=COLUMNS)
    content = hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()
                             + pd.util.hash_pandas_object(golden, index=False).values.tobytes()).hexdigest()
    today = dt.datetime.now(dt.timezone.utc).date()
    ds_id = f"ds-{today:%Y%m%d}-seed-{content[:10]}"
    prefix = f"datasets/{ds_id}/"
    train, heldout = df[df["split"] == "train"], df[df["split"] == "heldout"]
    daily.put_frame(lake, prefix + "train.parquet", train)
    daily.put_frame(lake, prefix + "heldout.parquet", heldout)
    daily.put_frame(lake, prefix + "golden.parquet", golden)
    manifest = {
        "id": ds_id, "content_sha256": content, "created_for": today.isoformat(), "kind": "cold start",
        "seed_file": source_name, "config": {k: v for k, v in asdict(cfg).items() if k != "lora"},
        "seed_rows": len(rows), "refused_rows": [{"line": n, "reason": why} for n, why in refused],
        "examples": {"train": len(train), "heldout": len(heldout), "golden": len(golden)},
        "by_source": {str(k): int(v) for k, v in df.groupby(["split", "source"]).size().items()},
        "by_category": {str(k): int(v) for k, v in df.groupby(["split", "category"]).size().items()},
        "by_intent": {str(k): int(v) for k, v in df.groupby(["split", "intent"]).size().items()},
        "dropped": {}, "label_days": [],
    }
    lake.put_json(prefix + "manifest.json", manifest)
    return manifest


@dataclass
class ColdStartResult:
    ref: str  # name@version in the registry
    status: str  # candidate, or rejected by the gate
    dataset_id: str
    seed_rows: int
    refused: list[tuple[int, str]]
    examples: dict
    gate: dict
    training: dict


def cold_start(seed_file, *, lake, base_model: str, cfg: ColdStartConfig | None = None, settings=None,
               log=print) -> ColdStartResult:
    """Validate ``seed_file``, build the dataset, train, evaluate and register the first adapter."""
    from training.job import TrainJob, run
    from training.lora import LoraTrainConfig
    from vloop.learn.registry import AdapterVersion, Registry, new_version
    from vloop.learn.retrain import GateConfig, gate_decision

    cfg = cfg or ColdStartConfig()
    rows, bad = read_seed(seed_file, settings)
    if bad and not cfg.skip_bad_rows:
        raise SeedError(seed_file, bad)
    if len(rows) < cfg.min_rows:
        raise SeedError(seed_file, bad + [(0, f"only {len(rows)} usable row(s); cold start needs at least "
                                              f"{cfg.min_rows}")])
    for n, why in bad:
        log(f"refused line {n}: {why}")
    manifest = build_seed_dataset(lake, rows, cfg, source_name=Path(seed_file).name, refused=bad)
    log(f"dataset {manifest['id']}: {manifest['examples']['train']} training examples "
        f"({len(rows)} seed rows and their paraphrases), {manifest['examples']['heldout']} held out")
    job = TrainJob(dataset_id=manifest["id"], base_model=str(base_model), version=new_version(),
                   adapter_name=cfg.adapter_name, lake_url=lake.url, work_dir=cfg.work_dir,
                   lora=LoraTrainConfig(**{"seed": cfg.seed, **cfg.lora}))
    out = run(job, "all")  # the same job the biweekly retraining runs: train, then evaluate vs the base
    metrics = lake.get_json(job.lake_prefix + "metrics.json")
    training = lake.get_json(job.lake_prefix + "training.json")
    reg = Registry(lake)
    v = reg.register(AdapterVersion(
        name=job.adapter_name, version=job.version, path=job.lake_prefix, base_model=str(job.base_model),
        dataset_id=job.dataset_id, dataset_hash=training["dataset_sha256"], training_config=job.to_dict(),
        metrics=metrics), actor="cold-start", reason=f"cold start from {Path(seed_file).name} ({len(rows)} rows)")
    # The first adapter faces the same offline gate as any other, on the held-out seed rows.
    decision = gate_decision(metrics, GateConfig(set_name="heldout"))
    reg.record("gate", {"ref": v.ref, "figures": {k: x for k, x in decision.items() if k != "reason"}},
               actor="cold-start", reason=decision["reason"])
    status = "candidate"
    if not decision["passed"]:
        reg.set_status(v.ref, "rejected", actor="cold-start", reason=decision["reason"])
        status = "rejected"
    log(f"registered {v.ref} as {status}: {decision['reason']}")
    return ColdStartResult(v.ref, status, manifest["id"], len(rows), bad, manifest["examples"], decision,
                           out.get("train", {}))
