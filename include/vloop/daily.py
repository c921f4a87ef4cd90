"""The daily feedback pipeline, one function per step of the ``feedback_daily`` DAG.

Each step reads what the previous one left in the lake and writes its own output there, whole
objects at a time (atomic: a failed step leaves its previous output or nothing, never half of one).
Every output of day D lives under ``…/dt=D/``, and a step re-run for D replaces it, so re-running a
day changes nothing. Each returns a small JSON-able summary (the DAG's XCom and log line).

A day without traffic (a deployment's first night) is a normal day: every step succeeds, writes
its output with the columns it always has and no rows, and counts zeros; the report says "no
traffic".

| step | reads | writes |
|---|---|---|
| :func:`ingest` | ``raw/interactions``, ``raw/feedback`` | ``curated/dt=D/ingested_*.parquet`` |
| :func:`validate` | ingested | ``curated/dt=D/{interactions,feedback}.parquet``, ``quarantine/dt=D/`` (rows + reasons, validation result) |
| :func:`mine_feedback` | curated | ``curated/dt=D/{mined,phrasings}.parquet`` |
| :func:`score_confidence` | curated (+ the model: rows without logprobs, and grounding) | ``curated/dt=D/confidence.parquet`` |
| :func:`check_images` | curated, ``raw/images`` | ``curated/dt=D/image_quality.parquet`` |
| :func:`select_for_labelling` | all of the above, ``labeled/``, ``privacy/`` (opt-outs, tombstones) | ``labeling/dt=D/selected.parquet`` |
| :func:`push_to_label_studio` | selected | Label Studio tasks, ``labeling/dt=D/pushed.json`` |
| :func:`pull_annotations` | Label Studio | ``labeled/dt=D/annotations.parquet`` |
| :func:`report` | curated, labeled | ``reports/dt=D/{metrics,top_errors,errors,error_types,edit_length,deleted_phrases,signals}.parquet``, ``reports/dt=D/index.html`` |
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
from typing import Callable

import pandas as pd
import pyarrow as pa

from vloop.frames import member
from vloop.ingest import ingest_day
from vloop.lake import Lake, LakeKeyNotFound, partition_prefix
from vloop.schema import FEEDBACK, INTERACTION

log = logging.getLogger(__name__)

CURATED, QUARANTINE, LABELING, LABELED, REPORTS = "curated", "quarantine", "labeling", "labeled", "reports"
LABELED_FILE = "annotations.parquet"
HISTORY_DAYS = 30  # how far back the report's trend plots and the category error rates look


def key(dataset: str, day: dt.date | str, name: str) -> str:
    return partition_prefix(dataset, day) + name


def put_frame(lake: Lake, k: str, df: pd.DataFrame, schema: pa.Schema | None = None) -> None:
    if schema is not None:
        extra = [c for c in df.columns if c not in schema.names]
        for c in extra:  # e.g. quarantine_reason, priority: appended after the record's fields
            schema = schema.append(pa.field(c, pa.Table.from_pandas(df[[c]], preserve_index=False).schema.field(c).type))
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    else:
        if not len(df):  # an empty object column has no values to infer a type from: store strings, not nulls
            df = df.astype({c: "str" for c in df.columns[df.dtypes == object]})
        table = pa.Table.from_pandas(df, preserve_index=False)
    lake.write_parquet(k, table)


def get_frame(lake: Lake, k: str, columns: list[str] | None = None) -> pd.DataFrame:
    return lake.read_parquet(k, columns=columns).to_pandas()


# Every interaction column but the per-token log-probabilities: the steps after validation that
# do not need them skip reading a million Python lists.
LIGHT_COLUMNS = [n for n in INTERACTION.arrow.names if n != "token_logprobs"]


def _days_back(day: dt.date, n: int) -> list[dt.date]:
    return [day - dt.timedelta(days=i) for i in range(n)]


def read_days(lake: Lake, dataset: str, name: str, days=None, exclude: dt.date | None = None) -> pd.DataFrame:
    """Concatenate ``dataset/dt=*/name`` over ``days`` (or every day present), except ``exclude``."""
    if days is None:
        keys = [k for k in lake.list(dataset + "/") if k.endswith("/" + name)]
    else:
        keys = [key(dataset, d, name) for d in days]
    frames = []
    for k in keys:
        if exclude is not None and f"/dt={exclude.isoformat()}/" in k:
            continue
        try:
            frames.append(get_frame(lake, k).assign(dt=k.split("dt=")[1].split("/")[0]))
        except LakeKeyNotFound:
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_time(day: dt.date) -> dt.datetime:
    """Feedback counts up to this time: now. In simulation mode (the demo's simulated days, which
    may lie ahead of the real clock) the simulated run time, an hour after the day ended."""
    from vloop.config import load_settings

    if load_settings().simulation:
        return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(1), dt.timezone.utc)
    return dt.datetime.now(dt.timezone.utc)


# -- 1. ingest ------------------------------------------------------------------------------------
def ingest(lake: Lake, day: dt.date, run_time: dt.datetime) -> dict:
    batch = ingest_day(lake, day, run_time)
    put_frame(lake, key(CURATED, day, "ingested_interactions.parquet"), batch.interactions, INTERACTION.arrow)
    put_frame(lake, key(CURATED, day, "ingested_feedback.parquet"), batch.feedback, FEEDBACK.arrow)
    return {"day": day.isoformat(), "interactions": len(batch.interactions), "feedback": len(batch.feedback),
            "duplicates_dropped": batch.duplicates_dropped, "events_until": run_time.isoformat()}


# -- 2. validate ----------------------------------------------------------------------------------
def validate(lake: Lake, day: dt.date, *, max_bad_fraction: float = 0.05) -> dict:
    """Run both suites; bad rows (with reasons) and the validation result go to ``quarantine/``.
    Over the threshold, raise :class:`~vloop.quality.QualityGateError` before anything reaches
    ``curated/``, so nothing downstream runs on the day."""
    from vloop.quality import QualityConfig, QualityGateError, validate_feedback, validate_interactions

    cfg = QualityConfig(max_bad_fraction=max_bad_fraction)
    start = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    inter = get_frame(lake, key(CURATED, day, "ingested_interactions.parquet"))
    fb = get_frame(lake, key(CURATED, day, "ingested_feedback.parquet"))
    vi = validate_interactions(inter, start, start + dt.timedelta(days=1), lake=lake, cfg=cfg)
    vf = validate_feedback(fb, cfg=cfg)
    put_frame(lake, key(QUARANTINE, day, "interactions.parquet"), vi.quarantined, INTERACTION.arrow)
    put_frame(lake, key(QUARANTINE, day, "feedback.parquet"), vf.quarantined, FEEDBACK.arrow)
    reasons = pd.concat([vi.quarantined.get("quarantine_reason", pd.Series(dtype=str)),
                         vf.quarantined.get("quarantine_reason", pd.Series(dtype=str))])
    summary = {
        "day": day.isoformat(), "interactions": len(inter), "feedback": len(fb),
        "quarantined_interactions": len(vi.quarantined), "quarantined_feedback": len(vf.quarantined),
        "bad_fraction_interactions": round(vi.bad_fraction, 6), "bad_fraction_feedback": round(vf.bad_fraction, 6),
        "max_bad_fraction": max_bad_fraction,
        "reasons": reasons.str.split("; ").explode().value_counts().to_dict() if len(reasons) else {},
    }
    summary["passed"] = max(vi.bad_fraction, vf.bad_fraction) <= max_bad_fraction
    lake.put_json(key(QUARANTINE, day, "validation.json"),
                  {**summary, "interactions_result": vi.result, "feedback_result": vf.result})
    if not summary["passed"]:
        raise QualityGateError(
            f"{day}: {vi.bad_fraction:.1%} of interactions and {vf.bad_fraction:.1%} of feedback events failed "
            f"validation, over the threshold of {max_bad_fraction:.1%}; the rows and reasons are in "
            f"{partition_prefix(QUARANTINE, day)}")
    # Events about a quarantined interaction stay with it: they are not mined.
    good_fb = vf.good[member(vf.good["request_id"], vi.good["request_id"])]
    put_frame(lake, key(CURATED, day, "interactions.parquet"), vi.good, INTERACTION.arrow)
    put_frame(lake, key(CURATED, day, "feedback.parquet"), good_fb, FEEDBACK.arrow)
    return summary


def curated(lake: Lake, day: dt.date, columns: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (get_frame(lake, key(CURATED, day, "interactions.parquet"), columns),
            get_frame(lake, key(CURATED, day, "feedback.parquet")))


# -- 3. mine --------------------------------------------------------------------------------------
def mine_feedback(lake: Lake, day: dt.date, rules=None) -> dict:
    from vloop.mining import WEAK_LABELS, mine

    inter, fb = curated(lake, day, LIGHT_COLUMNS)
    # A day without traffic (mine returns no rows) still writes mined.parquet, with its columns.
    mined = mine(inter, fb, rules).merge(inter[["request_id", "category"]], on="request_id", how="left")
    put_frame(lake, key(CURATED, day, "mined.parquet"), mined)
    # Users' phrasings of badly handled questions: candidates for the paraphrase template library.
    from vloop.mining import mine_phrasings

    put_frame(lake, key(CURATED, day, "phrasings.parquet"), mine_phrasings(inter, mined))
    return {"day": day.isoformat(), "interactions": len(mined), **dict.fromkeys(WEAK_LABELS, 0),
            **{k: int(v) for k, v in mined["weak_label"].value_counts().items()}}


# -- 4. confidence --------------------------------------------------------------------------------
def score_confidence(lake: Lake, day: dt.date, load_model: Callable[[], object] | None = None,
                     batch_size: int = 32, grounding: bool = True) -> dict:
    """Confidence per interaction: as logged; else from the logged token logprobs; else the model
    re-scores the logged answer (teacher-forced, in batches). With a model (``load_model``) and
    ``grounding``, also each answer's image-text grounding (:mod:`vloop.grounding`); without
    one, ``load_model`` is called only if some row needs re-scoring and grounding is left empty."""
    from vloop.model import Confidence, score_answers

    inter, _ = curated(lake, day)
    conf = inter["confidence"].astype("float64")
    source = pd.Series("logged", index=inter.index, dtype=object)
    source[conf.isna()] = "logprobs"
    has_lp = inter["token_logprobs"].map(lambda v: v is not None and len(v) > 0)
    from_lp = conf.isna() & has_lp
    conf[from_lp] = [Confidence.from_logprobs(v).geo_mean_prob for v in inter.loc[from_lp, "token_logprobs"]]
    todo = inter[conf.isna() & inter["image_key"].notna() & inter["answer"].notna()]
    lm = None
    if len(todo):
        if load_model is None:
            raise RuntimeError(f"{len(todo)} interactions have neither confidence nor logprobs, and no model "
                               "was given to re-score them (set VLOOP_BASE_MODEL)")
        lm = load_model()
        t0 = time.perf_counter()
        for s in range(0, len(todo), batch_size):
            chunk = todo.iloc[s:s + batch_size]
            images = [lake.get_bytes(k) for k in chunk["image_key"]]
            scores = score_answers(lm, images, chunk["question"].tolist(), chunk["answer"].tolist(),
                                   batch_size=batch_size)
            conf[chunk.index] = [x.confidence.geo_mean_prob for x in scores]
            done = s + len(chunk)
            rate = done / (time.perf_counter() - t0)
            log.info("re-scored %d/%d (%.0f/s, eta %.0fs)", done, len(todo), rate, (len(todo) - done) / rate)
        source[todo.index] = "rescored"
    source[conf.isna()] = "missing"
    grounded = pd.Series(float("nan"), index=inter.index, dtype="float64")
    answered = inter[inter["image_key"].notna() & inter["answer"].notna()]
    if grounding and load_model is not None and len(answered):
        from vloop.grounding import GroundingConfig, score_rows

        t0 = time.perf_counter()
        by_request = score_rows(lm or load_model(), lake, answered, GroundingConfig(batch_size=batch_size))
        grounded = inter["request_id"].map(by_request).astype("float64")
        log.info("grounding of %d answers in %.1fs", len(answered), time.perf_counter() - t0)
    out = pd.DataFrame({"request_id": inter["request_id"], "confidence": conf,
                        "confidence_source": source.astype("str"), "grounding": grounded})
    put_frame(lake, key(CURATED, day, "confidence.parquet"), out)  # no rows on a day without traffic
    return {"day": day.isoformat(), "interactions": len(out), "grounded": int(out["grounding"].notna().sum()),
            **dict.fromkeys(("logged", "logprobs", "rescored", "missing"), 0),
            **{k: int(v) for k, v in out["confidence_source"].value_counts().items()}}


# -- 5. image quality -----------------------------------------------------------------------------
IMAGE_QUALITY_TYPES = {"image_key": "str", "poor": "bool", "flags": "str", "sharpness": "float64",
                       "brightness": "float64", "blown_out": "float64", "width": "int64", "height": "int64",
                       "niqe": "float64"}


def check_images(lake: Lake, day: dt.date, thresholds=None) -> dict:
    from PIL import Image

    from vloop.imagequality import assess, niqe

    inter, _ = curated(lake, day, ["image_key"])
    rows = []
    for k in inter["image_key"].dropna().unique():
        with Image.open(io.BytesIO(lake.get_bytes(k))) as img:
            q = assess(img, thresholds)
            try:  # NIQE beside the flags (higher is worse); none for a photo under two patches a side
                score = niqe(img)
            except ValueError:
                score = float("nan")
        rows.append({"image_key": k, "poor": q.poor, "flags": ",".join(q.flags), "sharpness": q.sharpness,
                     "brightness": q.brightness, "blown_out": q.blown_out, "width": q.width, "height": q.height,
                     "niqe": score})
    out = pd.DataFrame(rows, columns=list(IMAGE_QUALITY_TYPES))
    if not len(out):  # a day without traffic: no images, the same typed columns
        out = out.astype(IMAGE_QUALITY_TYPES)
    put_frame(lake, key(CURATED, day, "image_quality.parquet"), out)
    return {"day": day.isoformat(), "images": len(out), "poor": int(out["poor"].sum())}


# -- 6. select ------------------------------------------------------------------------------------
def labelled_request_ids(lake: Lake, exclude: dt.date | None = None) -> set[str]:
    """Request ids already chosen for labelling (any day but ``exclude``) or labelled."""
    done = read_days(lake, LABELING, "selected.parquet", exclude=exclude)
    back = read_days(lake, LABELED, LABELED_FILE, exclude=exclude)
    return set(done.get("request_id", [])) | set(back.get("request_id", []))


def select_for_labelling(lake: Lake, day: dt.date, cfg=None) -> dict:
    from vloop.privacy import excluded_users
    from vloop.selection import select

    inter, _ = curated(lake, day, LIGHT_COLUMNS)
    mined = get_frame(lake, key(CURATED, day, "mined.parquet"))
    conf = get_frame(lake, key(CURATED, day, "confidence.parquet"))
    iq = get_frame(lake, key(CURATED, day, "image_quality.parquet"))
    cands = inter.drop(columns=["confidence"]).merge(
        conf[[c for c in ("request_id", "confidence", "grounding") if c in conf.columns]], on="request_id")
    history = read_days(lake, CURATED, "mined.parquet", days=_days_back(day, HISTORY_DAYS))
    if len(history):
        history["bad"] = history["weak_label"].isin(["negative", "weak_negative"])
        err = history.dropna(subset=["category"]).groupby("category")["bad"].mean().to_dict()
    else:  # no traffic today nor in the last HISTORY_DAYS days
        err = {}
    chosen = select(cands, mined, cfg=cfg, poor_images=set(iq.loc[iq["poor"], "image_key"]),
                    opted_out_users=excluded_users(lake), already_labelled=labelled_request_ids(lake, exclude=day),
                    category_error_rate=err)
    chosen = chosen.merge(mined[["request_id", "weak_label"]], on="request_id", how="left")
    chosen["selected_on"] = day.isoformat()
    put_frame(lake, key(LABELING, day, "selected.parquet"), chosen)
    return {"day": day.isoformat(), "candidates": len(cands), "selected": len(chosen)}


# -- 7. push --------------------------------------------------------------------------------------
def model_version(row) -> str:
    """The name annotators see for the model that answered: the adapter's ``name@version``, or
    ``"base"`` (never ``base_model``, which is whatever path or hub id serving loaded)."""
    from vloop.report import model_version_name

    return model_version_name(row.get("adapter"))


def image_flags_text(iq: pd.DataFrame) -> dict[str, str]:
    """What annotators read of the automatic image check, per image key: its flags and NIQE."""
    niqe = iq["niqe"] if "niqe" in iq.columns else pd.Series(float("nan"), index=iq.index)
    return {k: ", ".join([f for f in str(fl or "").split(",") if f] + ([f"NIQE {n:.1f}"] if pd.notna(n) else []))
            for k, fl, n in zip(iq.index, iq["flags"], niqe)}


def push_to_label_studio(lake: Lake, day: dt.date, ls, *, project_title: str,
                         document_root: str | None = None) -> dict:
    """Tasks for the day's selection, with the model's answer as a prediction; request ids the
    project already holds are skipped, so a re-run never duplicates a task."""
    from vloop.labelstudio import image_reference, task_payload

    chosen = get_frame(lake, key(LABELING, day, "selected.parquet"))
    iq = get_frame(lake, key(CURATED, day, "image_quality.parquet")).set_index("image_key")
    poor, flags = iq["poor"].to_dict(), image_flags_text(iq)
    project = ls.ensure_project(project_title)
    ls.ensure_storage(project, lake, document_root)
    tasks = [task_payload(r, image_reference(lake, r["image_key"], document_root), model_version(r),
                          poor_image=bool(poor.get(r["image_key"], False)), image_flags=flags.get(r["image_key"], ""))
             for r in chosen.to_dict("records")]
    t0 = time.perf_counter()
    res = ls.import_tasks(project, tasks)
    # What the lake keeps is the state (these request ids are tasks of that project), the same on
    # every re-run; how many this call sent goes to the task log.
    lake.put_json(key(LABELING, day, "pushed.json"), {
        "day": day.isoformat(), "label_studio": ls.url, "project": project,
        "request_ids": sorted(chosen["request_id"])})
    return {"day": day.isoformat(), "project": project, "selected": len(chosen), "sent": res.sent,
            "already_in_label_studio": res.already_there, "seconds": round(time.perf_counter() - t0, 2)}


# -- 8. pull --------------------------------------------------------------------------------------
def pull_annotations(lake: Lake, day: dt.date, ls, *, project_title: str) -> dict:
    """Every finished annotation not already pulled on another day goes to ``labeled/dt=D/``."""
    from vloop.labelstudio import LABELED_COLUMNS

    from vloop.privacy import erased_request_hashes, read_tombstones, request_hash

    project = ls.ensure_project(project_title)
    finished = ls.finished_annotations(project)
    # An erased user's task still in Label Studio (an erasure that could not reach it) is not
    # pulled back into the lake.
    erased = finished["request_id"].map(request_hash).isin(erased_request_hashes(lake)) | \
        finished["user_key"].isin(read_tombstones(lake))
    finished = finished[~erased]
    earlier = read_days(lake, LABELED, LABELED_FILE, exclude=day)
    new = finished[~finished["request_id"].isin(set(earlier.get("request_id", [])))]
    put_frame(lake, key(LABELED, day, LABELED_FILE), new[LABELED_COLUMNS].reset_index(drop=True))
    return {"day": day.isoformat(), "finished_in_label_studio": len(finished), "new": len(new),
            **{f"verdict_{k}": int(v) for k, v in new["verdict"].value_counts().items()}}


def _experiment(lake: Lake, day: dt.date, summary: dict) -> str | None:
    """The canary experiments' looks up to the end of ``day`` (plot), and the newest in words."""
    from vloop.canary import looks
    from vloop.report import experiment_plot

    lk = looks(lake)
    if not len(lk):
        return None
    at = pd.to_datetime(lk["at"], utc=True)
    end = pd.Timestamp(day + dt.timedelta(days=1), tz="UTC")
    lk = lk[(at < end) & (at >= end - pd.Timedelta(days=HISTORY_DAYS))]
    if not len(lk):
        return None
    last = lk.sort_values("at").iloc[-1]
    summary["experiment"] = (f"{last['experiment']} at {last['canary_share']:.0%}: last look {last['at']} "
                             f"decided {last['action']}")
    return experiment_plot(lk)


# -- 9. report ------------------------------------------------------------------------------------
def report(lake: Lake, day: dt.date) -> dict:
    """Metrics, top errors and the HTML page for ``day``. A day without interactions is reported
    as such (``summary["traffic"] == "no traffic"``), with empty tables, not as an error."""
    from vloop.report import NO_TRAFFIC, daily_metrics, plots, render_html, top_error_categories

    inter, fb = curated(lake, day, LIGHT_COLUMNS)
    mined = get_frame(lake, key(CURATED, day, "mined.parquet"))
    conf = get_frame(lake, key(CURATED, day, "confidence.parquet"))
    inter = inter.drop(columns=["confidence"]).merge(conf[["request_id", "confidence"]], on="request_id")
    try:
        labels = get_frame(lake, key(LABELED, day, LABELED_FILE))
    except LakeKeyNotFound:  # the pull did not run (no Label Studio configured)
        labels = pd.DataFrame()
    metrics = daily_metrics(inter, fb, mined, labels if len(labels) else None)
    metrics.insert(0, "dt", day.isoformat())
    top = top_error_categories(inter, mined)
    put_frame(lake, key(REPORTS, day, "metrics.parquet"), metrics)
    put_frame(lake, key(REPORTS, day, "top_errors.parquet"), top)
    # Error types, edit length per category against its previous 7 days, phrases users delete.
    from vloop.report import AnswerQualityConfig, answer_quality

    earlier = _days_back(day - dt.timedelta(days=1), AnswerQualityConfig.trend_days)
    # The grounding of the judged answers, from the confidence step of the days they were chosen.
    judged_on = sorted(set(labels["selected_on"].dropna())) if "selected_on" in labels.columns else []
    scored = read_days(lake, CURATED, "confidence.parquet", days=judged_on)
    grounding = dict(zip(scored["request_id"], scored["grounding"])) if "grounding" in scored.columns else {}
    quality = answer_quality(inter, fb, mined, labels if len(labels) else None,
                             read_days(lake, REPORTS, "edit_length.parquet", days=earlier), grounding=grounding)
    for name, table in quality.items():
        put_frame(lake, key(REPORTS, day, f"{name}.parquet"), table)
    history = read_days(lake, REPORTS, "metrics.parquet", days=_days_back(day, HISTORY_DAYS))
    validation = lake.get_json(key(QUARANTINE, day, "validation.json"))
    summary = {
        "day": day.isoformat(), "interactions": len(inter), "feedback events": len(fb),
        "quarantined": validation["quarantined_interactions"] + validation["quarantined_feedback"],
        "labels pulled": len(labels),
    }
    if not validation["interactions"]:  # a normal day (a deployment's first night): empty tables, a note
        summary["traffic"] = NO_TRAFFIC
    for name in ("selected.parquet", "pushed.json"):
        k = key(LABELING, day, name)
        if lake.exists(k):
            summary[name.split(".")[0]] = (len(get_frame(lake, k)) if name.endswith(".parquet")
                                           else len(lake.get_json(k)["request_ids"]))
    images = plots(history, inter["confidence"], labels)
    images["experiment"] = _experiment(lake, day, summary)
    page = render_html(day.isoformat(), metrics, top, summary, images, quality)
    lake.put_bytes(key(REPORTS, day, "index.html"), page.encode(), "text/html")
    return summary
