"""Training datasets for the next adapter, built from what annotators and users said.

Sources, strongest first (a later source never overrides an earlier one for the same image and
question):

* ``label_corrected`` — an annotator judged the answer wrong and typed the right one;
* ``label_confirmed`` — an annotator judged it correct (the model's answer is kept);
* ``user_edit`` (optional, ``use_user_edits``) — a user's own correction, a weaker signal: only a
  ``user_edit_share`` of them is kept;
* ``replay`` — accepted answers the model was confident about, ``replay_ratio`` per new example
  (labels and users' edits alike), so the adapter does not forget what the base already knew.

Excluded: users who opted out or were erased, photos flagged poor (by the automatic check or an
annotator), "unclear" verdicts, "wrong" verdicts whose corrected answer is still the model's
(:func:`wrong_without_correction`), anything in the golden set in force or any earlier golden
version (same request, or the same photo with the same question: :func:`vloop.learn.golden.held_out`),
duplicates. A held-out share
of the labels is kept apart for evaluation; the golden set never enters training. The golden set is
built from annotators' labels and frozen by ``vloop golden build`` (:mod:`vloop.learn.golden`), or
written once from curated samples (:func:`ensure_golden`); only a simulation may supply a synthetic one.

A dataset is stored under ``datasets/<id>/`` (``train.parquet``, ``heldout.parquet``,
``golden.parquet``, ``manifest.json``); its id carries the content hash, so the same inputs give
the same dataset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from vloop.curate import daily
from vloop.store.lake import Lake, LakeKeyNotFound
from vloop.privacy import is_user_key
from vloop.curate.selection import normalise_question

GOLDEN_KEY = "datasets/golden/golden.parquet"
ERASED_KEY = "privacy/erased_users.json"  # erased user keys as earlier versions listed them (now: tombstones)
COLUMNS = ["example_id", "source", "request_id", "image_key", "image_sha256", "question", "answer",
           "category", "intent", "split"]
SOURCE_RANK = {"label_corrected": 0, "label_confirmed": 1, "user_edit": 2, "replay": 3}


@dataclass
class DatasetConfig:
    since: str | None = None  # first day of labels to use (YYYY-MM-DD); None: all
    until: str | None = None  # last day (inclusive); None: all
    heldout_share: float = 0.2
    replay_ratio: float = 1.0
    replay_min_confidence: float = 0.8
    replay_days: int = 28
    use_user_edits: bool = False
    user_edit_share: float = 0.5
    golden_size: int = 200
    seed: int = 0


def _sha_of_key(image_key: str) -> str:
    return image_key.rsplit("/", 1)[-1].split(".")[0] if isinstance(image_key, str) else ""


GOLDEN_REQUIRED = ["example_id", "image_key", "image_sha256", "question", "answer", "category", "intent"]


class GoldenSetMissing(ValueError):
    """No golden evaluation set in the lake, and nothing to make one from."""


def ensure_golden(lake: Lake, size: int = 200, samples=None, *, simulation: bool = False) -> pd.DataFrame:
    """The fixed golden evaluation set at :data:`GOLDEN_KEY`: read from the lake; or, on first use,
    written from ``samples`` (objects with ``image_bytes()``, ``question``, ``answer``,
    ``category``, ``intent`` and ``id``). Production needs a curated set there; nothing here
    invents one. In simulation mode (``simulation=True`` or ``VLOOP_SIMULATION=1``) the caller
    passes the synthetic world's set, :func:`vloop.sim.synth.golden_samples`. ``size`` is only used
    in the error message (the caller decides how many samples to pass)."""
    if lake.exists(GOLDEN_KEY):
        golden = daily.get_frame(lake, GOLDEN_KEY)
        missing = [c for c in GOLDEN_REQUIRED if c not in golden.columns]
        if missing:
            raise GoldenSetMissing(f"the golden set at {GOLDEN_KEY} lacks the columns {', '.join(missing)}; "
                                   f"it needs {', '.join(GOLDEN_REQUIRED)}")
        for col, value in (("source", "golden"), ("request_id", None), ("split", "golden")):
            if col not in golden.columns:
                golden[col] = value
        return golden
    if samples is None:
        if simulation or _simulation_mode():
            raise GoldenSetMissing(
                f"simulation mode and no golden set at {GOLDEN_KEY}: pass the synthetic world's set, "
                f"samples=vloop.sim.synth.golden_samples({size})")
        raise GoldenSetMissing(
            f"no golden set at {GOLDEN_KEY}: the gate decides on it. Run `vloop golden build` (with the "
            f"lake's VLOOP_LAKE_URL, or --url) to build and freeze one from annotators' confirmed and corrected "
            f"labels, stratified by category and intent and held out of training from then on (needs "
            f"feedback_daily to have pulled finished annotations; `vloop golden show` prints it). Production "
            f"needs a curated golden evaluation set there; one of your own (columns "
            f"{', '.join(GOLDEN_REQUIRED)}) may be written once instead with "
            f"vloop.learn.dataset.ensure_golden(lake, samples=[...]) (objects with image_bytes(), question, "
            f"answer, category, intent and id); VLOOP_SIMULATION=1 is the demo's synthetic set.")
    from vloop.learn.evaluation import intent_of

    rows = []
    for s in samples:
        img = lake.put_image(s.image_bytes())
        intent = getattr(s, "intent", None) or intent_of(s.question)
        rows.append({"example_id": f"golden-{s.id}", "source": "golden", "request_id": None,
                     "image_key": img.key, "image_sha256": img.sha256, "question": s.question,
                     "answer": s.answer, "category": s.category, "intent": intent, "split": "golden"})
    if not rows:
        raise GoldenSetMissing(f"no samples to write the golden set at {GOLDEN_KEY} from")
    golden = pd.DataFrame(rows, columns=COLUMNS)
    from vloop.learn.golden import freeze, record_from_samples

    freeze(lake, golden, record_from_samples(lake, golden))  # version 1, in force (vloop.learn.golden)
    return golden


def _simulation_mode() -> bool:
    from vloop.store.config import load_settings

    return load_settings().simulation


def excluded_users(lake: Lake) -> set[str]:
    """Opted-out and erased users (:func:`vloop.privacy.excluded_users`), and the erased list
    earlier versions kept."""
    from vloop.privacy import excluded_users as privacy_excluded

    erased = set(lake.get_json(ERASED_KEY)) if lake.exists(ERASED_KEY) else set()
    return privacy_excluded(lake) | erased


def _in_range(day: str, cfg: DatasetConfig) -> bool:
    return (cfg.since is None or day >= cfg.since) and (cfg.until is None or day <= cfg.until)


def labels(lake: Lake, cfg: DatasetConfig) -> pd.DataFrame:
    """Finished annotations of the configured days, with the user key of their interaction."""
    lab = daily.read_days(lake, daily.LABELED, daily.LABELED_FILE)
    if not len(lab):
        return lab
    lab = lab[lab["dt"].map(lambda d: _in_range(d, cfg))]
    users = []
    for day in lab["selected_on"].dropna().unique():
        try:
            users.append(daily.read_table(lake, daily.CURATED, day, "interactions.parquet",
                                          ["request_id", "user_key"]))
        except LakeKeyNotFound:  # the day's curated data was removed: its users cannot be checked
            continue
    users = pd.concat(users) if users else pd.DataFrame(columns=["request_id", "user_key"])
    carried = lab.pop("user_key") if "user_key" in lab.columns else None  # labels pulled since tasks carry it
    lab = lab.merge(users.drop_duplicates("request_id"), on="request_id", how="left")
    if carried is not None:
        has = (carried.notna() & carried.astype(str).ne("")).to_numpy()
        lab["user_key"] = np.where(has, carried.to_numpy(), lab["user_key"].to_numpy())
    return lab


def _recent_curated(lake: Lake, until: dt.date, days: int) -> pd.DataFrame:
    frames = []
    for d in (until - dt.timedelta(days=i) for i in range(days)):
        try:
            inter, fb = daily.curated(lake, d, daily.LIGHT_COLUMNS)
            mined = daily.read_table(lake, daily.CURATED, d, "mined.parquet")
            conf = daily.read_table(lake, daily.CURATED, d, "confidence.parquet")
        except Exception:
            continue
        df = inter.drop(columns=["confidence"]).merge(conf[["request_id", "confidence"]], on="request_id") \
            .merge(mined[["request_id", "weak_label", "reason"]], on="request_id")
        edits = fb[fb["type"] == "edit"].groupby("request_id")["edited_text"].last()
        frames.append(df.assign(edited_text=df["request_id"].map(edits), dt=d.isoformat()))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def wrong_without_correction(lab: pd.DataFrame) -> pd.Series:
    """Label rows judged "wrong" whose corrected answer is still the model's answer (equal after
    :func:`vloop.vlm.model.normalise_answer`): the annotator did not type the right one, so the row
    would teach the very answer they rejected. Rows without a ``model_answer`` are kept."""
    from vloop.vlm.model import normalise_answer

    if not len(lab) or "model_answer" not in lab.columns:
        return pd.Series(False, index=lab.index)
    norm = lambda col: lab[col].map(lambda v: normalise_answer(v) if isinstance(v, str) else None)  # noqa: E731
    fixed, model = norm("corrected_answer"), norm("model_answer")
    return lab["verdict"].eq("wrong") & model.notna() & fixed.eq(model)


def _poor_images(lake: Lake, days) -> set[str]:
    poor = set()
    for d in days:
        try:
            iq = daily.read_table(lake, daily.CURATED, d, "image_quality.parquet")
        except LakeKeyNotFound:
            continue
        poor |= set(iq.loc[iq["poor"], "image_key"])
    return poor


def build_dataset(lake: Lake, cfg: DatasetConfig | None = None, *, today: dt.date | None = None,
                  golden_samples=None) -> dict:
    """Build, store and describe a dataset; returns its manifest. The golden set comes from
    :func:`ensure_golden` (``golden_samples`` are only used when the lake has none yet). An
    example's intent is its row's ``intent`` where the source has one, else
    :func:`vloop.learn.evaluation.intent_of` of the question."""
    from vloop.learn.evaluation import intent_of

    cfg = cfg or DatasetConfig()
    today = today or (dt.date.fromisoformat(cfg.until) if cfg.until else dt.datetime.now(dt.timezone.utc).date())
    rng = np.random.default_rng(cfg.seed)
    golden = ensure_golden(lake, cfg.golden_size, golden_samples)
    blocked_users = excluded_users(lake)
    lab = labels(lake, cfg)
    recent = _recent_curated(lake, today, cfg.replay_days)
    poor = _poor_images(lake, sorted(set(recent.get("dt", []))) + sorted(set(lab.get("selected_on", pd.Series()).dropna())))
    dropped = {}

    parts = []
    if len(lab):
        ok = lab["verdict"].isin(["correct", "wrong"]) & lab["corrected_answer"].fillna("").str.strip().ne("")
        dropped["unclear or empty label"] = int((~ok).sum())
        lab = lab[ok]
        uncorrected = wrong_without_correction(lab)
        dropped["wrong verdict without a correction"] = int(uncorrected.sum())
        lab = lab[~uncorrected]
        bad_img = lab["image_quality"].eq("poor") | lab["image_key"].isin(poor)
        dropped["poor image (labels)"] = int(bad_img.sum())
        lab = lab[~bad_img]
        parts.append(pd.DataFrame({
            "source": np.where(lab["verdict"] == "wrong", "label_corrected", "label_confirmed"),
            "request_id": lab["request_id"], "image_key": lab["image_key"], "question": lab["question"],
            "answer": lab["corrected_answer"].str.strip(), "category": lab["category"], "user_key": lab["user_key"],
            "intent": lab["intent"] if "intent" in lab.columns else None}))
    n_labels = sum(len(p) for p in parts)
    n_new = n_labels  # what replay is measured against: labels, and users' edits when used
    if len(recent):
        recent = recent[~recent["image_key"].isin(poor)]
        if cfg.use_user_edits:
            ed = recent[recent["edited_text"].fillna("").str.strip().ne("")]
            ed = ed.sample(frac=cfg.user_edit_share, random_state=cfg.seed) if len(ed) else ed
            parts.append(pd.DataFrame({"source": "user_edit", "request_id": ed["request_id"],
                                       "image_key": ed["image_key"], "question": ed["question"],
                                       "answer": ed["edited_text"].str.strip(), "category": ed["category"],
                                       "user_key": ed["user_key"]}))
            n_new += len(ed)
        rp = recent[(recent["weak_label"] == "positive") & (recent["confidence"] >= cfg.replay_min_confidence)]
        want = int(round(cfg.replay_ratio * n_new))
        if want and len(rp):
            rp = rp.iloc[rng.permutation(len(rp))[:want]]
            parts.append(pd.DataFrame({"source": "replay", "request_id": rp["request_id"], "image_key": rp["image_key"],
                                       "question": rp["question"], "answer": rp["answer"],
                                       "category": rp["category"], "user_key": rp["user_key"]}))
    if not parts or not sum(len(p) for p in parts):
        raise ValueError("no usable examples: no finished labels and no replay data in the configured days")
    df = pd.concat(parts, ignore_index=True)
    blocked = df["user_key"].isin(blocked_users)
    dropped["opted-out or erased user"] = int(blocked.sum())
    # Fail closed: a row whose user cannot be found (its day's curated data is gone, the key is
    # empty) cannot be checked against opt-outs and erasures, so it is not trained on.
    unknown = ~blocked & ~df["user_key"].map(is_user_key)
    dropped["unknown user"] = int(unknown.sum())
    df = df[~blocked & ~unknown].copy()
    df["image_sha256"] = df["image_key"].map(_sha_of_key)
    pair = df["image_sha256"] + "|" + df["question"].map(normalise_question)
    golden_pairs = set(golden["image_sha256"] + "|" + golden["question"].map(normalise_question))
    # Held out forever: the set in force and every golden version ever cut, by request and by
    # near-copy (the same photo with the same normalised question).
    from vloop.learn import golden as golden_sets

    held_ids, held_pairs = golden_sets.held_out(lake)
    in_golden = pair.isin(golden_pairs | held_pairs) | df["request_id"].astype(str).isin(held_ids)
    dropped["in the golden set"] = int(in_golden.sum())
    df, pair = df[~in_golden], pair[~in_golden]
    df = df.assign(_rank=df["source"].map(SOURCE_RANK), _pair=pair).sort_values(["_rank", "request_id"])
    dup = df["_pair"].duplicated()
    dropped["duplicate image + question"] = int(dup.sum())
    df = df[~dup].drop(columns=["_rank", "_pair"])
    users = df[["request_id", "user_key"]]  # kept beside the snapshot, for erasure (not trained on)
    df = df.drop(columns=["user_key"])
    df["intent"] = df["intent"].where(df["intent"].notna(), df["question"].map(intent_of)) \
        if "intent" in df.columns else df["question"].map(intent_of)
    df["example_id"] = df["source"] + "-" + df["request_id"].astype(str)
    is_label = df["source"].isin(["label_corrected", "label_confirmed"])
    bucket = df["request_id"].astype(str).map(lambda r: int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) / 2**32)
    df["split"] = np.where(is_label & (bucket < cfg.heldout_share), "heldout", "train")
    df = df[COLUMNS].sort_values("example_id").reset_index(drop=True)

    content = hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()
                             + pd.util.hash_pandas_object(golden, index=False).values.tobytes()).hexdigest()
    ds_id = f"ds-{today:%Y%m%d}-{content[:10]}"
    train, heldout = df[df["split"] == "train"], df[df["split"] == "heldout"]
    prefix = f"datasets/{ds_id}/"
    daily.put_frame(lake, prefix + "train.parquet", train)
    daily.put_frame(lake, prefix + "heldout.parquet", heldout)
    daily.put_frame(lake, prefix + "golden.parquet", golden)
    daily.put_frame(lake, prefix + "users.parquet", users.reset_index(drop=True))

    def counts(col):
        return {str(k): int(v) for k, v in df.groupby(["split", col]).size().items()} if len(df) else {}

    manifest = {
        "id": ds_id, "content_sha256": content, "created_for": today.isoformat(), "config": asdict(cfg),
        "examples": {"train": len(train), "heldout": len(heldout), "golden": len(golden)},
        "by_source": counts("source"), "by_category": counts("category"), "by_intent": counts("intent"),
        "dropped": dropped, "label_days": sorted(set(lab["dt"])) if len(lab) else [],
        "golden": _golden_version(lake),
    }
    lake.put_json(prefix + "manifest.json", manifest)
    return manifest


def _golden_version(lake: Lake) -> dict | None:
    """Which golden set a dataset carries: its version (0: one without a version record) and sha256."""
    from vloop.learn.golden import current

    rec = current(lake)
    return None if rec is None else {"version": rec["version"], "sha256": rec.get("sha256"),
                                     "created_at": rec.get("created_at")}


def load_split(lake: Lake, dataset_id: str, split: str) -> pd.DataFrame:
    return daily.get_frame(lake, f"datasets/{dataset_id}/{split}.parquet")


def manifest(lake: Lake, dataset_id: str) -> dict:
    return json.loads(lake.get_bytes(f"datasets/{dataset_id}/manifest.json"))
