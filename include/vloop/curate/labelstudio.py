"""Label Studio: the review project, pushing chosen interactions as tasks, pulling annotations back.

:class:`LabelStudio` is a small client over Label Studio's REST API (token auth, ``Authorization:
Token …``), with only the calls the daily loop needs:

* :meth:`LabelStudio.ensure_project` — the VQA review project (:data:`LABEL_CONFIG`), created once
  and found by title afterwards;
* :meth:`LabelStudio.ensure_storage` — makes the lake's images reachable from the annotator's
  browser: a local-files storage for a local lake (served by Label Studio itself under
  ``/data/local-files/``), an S3 import storage (presigned URLs) for MinIO/S3;
* :meth:`LabelStudio.import_tasks` — bulk import with the model's answer as a prediction carrying
  the model version and confidence; tasks whose ``request_id`` the project already holds are not
  sent again, so re-running a day never duplicates a task;
* :meth:`LabelStudio.finished_annotations` — every task with a submitted (not skipped) annotation,
  read through the export API (webhooks to Airflow are not an option: Label Studio's SSRF guard
  refuses loopback targets).

:func:`task_payload` and :func:`normalise_annotations` turn rows into tasks and tasks back into
rows of the ``labeled/`` table; they are plain functions, tested without a server.
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path
from dataclasses import dataclass

import httpx
import pandas as pd

from vloop.store.images import IMAGES_PREFIX
from vloop.store.lake import Lake, LocalLake, S3Lake

PROJECT_TITLE = "vloop VQA review"
VERDICTS = ("correct", "wrong", "unclear")
IMAGE_QUALITY = ("good", "poor")

# What an annotator sees: the photo, the question, the model's answer; what they give back: a
# verdict, the corrected answer and an image-quality flag. The corrected answer (pre-filled with the
# model's, so a small fix is a small edit) is asked for only once the verdict is "wrong": the box
# appears then, under a header that says to replace the model's answer, and may not be left empty
# (Label Studio skips a required control while its View is hidden). Label Studio cannot require the
# text to differ from the pre-filled one; vloop.learn.dataset drops a "wrong" label whose corrected answer
# is still the model's.
LABEL_CONFIG = f"""<View>
  <Image name="image" value="$image" zoom="true" maxWidth="480px"/>
  <Header value="Question"/>
  <Text name="question" value="$question"/>
  <Header value="Model answer (confidence $confidence)"/>
  <Text name="model_answer" value="$model_answer"/>
  <Header value="Verdict on the model's answer"/>
  <Choices name="verdict" toName="image" choice="single" required="true">
{''.join(f'    <Choice value="{v}"/>{chr(10)}' for v in VERDICTS)}  </Choices>
  <View visibleWhen="choice-selected" whenTagName="verdict" whenChoiceValue="wrong">
    <Header value="Wrong: replace the model's answer below with the correct one (left unchanged, it is discarded)"/>
    <TextArea name="corrected_answer" toName="image" editable="true" maxSubmissions="1" rows="2"
              required="true" placeholder="the correct answer"
              requiredMessage="A 'wrong' verdict needs the correct answer: type it in place of the model's."/>
  </View>
  <Header value="Image quality (automatic check: $image_flags)"/>
  <Choices name="image_quality" toName="image" choice="single">
{''.join(f'    <Choice value="{v}"/>{chr(10)}' for v in IMAGE_QUALITY)}  </Choices>
</View>"""

LABELED_COLUMNS = ["request_id", "task_id", "annotation_id", "image_key", "question", "model_answer",
                   "corrected_answer", "verdict", "image_quality", "annotator", "lead_time_s",
                   "created_at", "updated_at", "category", "model_version", "base_model", "adapter", "arm",
                   "confidence", "weak_label", "selected_on", "user_key"]
# Column types of an empty labeled/ table (no finished annotations): the same as a full one's.
LABELED_EMPTY_TYPES = {**dict.fromkeys(LABELED_COLUMNS, "str"), "task_id": "int64", "annotation_id": "int64",
                       "lead_time_s": "float64", "created_at": "datetime64[us, UTC]",
                       "updated_at": "datetime64[us, UTC]", "confidence": "float64"}
# Interaction fields a task carries so that a label is self-contained (calibration per arm needs them).
# The (pseudonymous) user key lets an erasure find a label and its task long after the raw
# interaction is gone.
CARRIED = ("category", "base_model", "adapter", "arm", "weak_label", "selected_on", "user_key")


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error (``status``), or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class ImportResult:
    sent: int          # tasks imported by this call
    already_there: int  # request ids the project already held (not sent again)


def local_files_url(lake: LocalLake, key: str, document_root: str) -> str:
    """The URL under which Label Studio's local-files serving returns lake object ``key``."""
    rel = (Path(lake.root) / key).resolve().relative_to(Path(document_root).resolve())
    return "/data/local-files/?d=" + urllib.parse.quote(str(rel))


def image_reference(lake: Lake, key: str, document_root: str | None = None) -> str:
    """How a task points at its image: ``s3://bucket/key`` on S3 (Label Studio presigns it through
    the project's S3 storage), a local-files URL on a local lake served by Label Studio, or the
    lake's own browser URL otherwise."""
    if isinstance(lake, S3Lake):
        return f"s3://{lake.bucket}/{lake._name(key)}"
    if isinstance(lake, LocalLake) and document_root:
        return local_files_url(lake, key, document_root)
    return lake.browser_url(key)


def _plain(v):
    return None if v is None or (not isinstance(v, str) and pd.isna(v)) else v


def task_payload(row, image_ref: str, model_version: str, poor_image: bool = False,
                 image_flags: str = "") -> dict:
    """One Label Studio task for an interaction row, with the model's answer as a prediction.
    ``image_flags``: what the automatic image check found (e.g. "blurry, NIQE 41.2"), shown to
    the annotator beside the image-quality choice."""
    conf = None if row.get("confidence") is None or pd.isna(row.get("confidence")) else float(row["confidence"])
    result = [{"from_name": "corrected_answer", "to_name": "image", "type": "textarea",
               "value": {"text": [row.get("answer") or ""]}}]
    if poor_image:  # the automatic image check's opinion, for the annotator to confirm
        result.append({"from_name": "image_quality", "to_name": "image", "type": "choices",
                       "value": {"choices": ["poor"]}})
    return {
        "data": {
            "request_id": row["request_id"], "image": image_ref, "image_key": row.get("image_key"),
            "question": row.get("question") or "", "model_answer": row.get("answer") or "",
            "confidence": "n/a" if conf is None else f"{conf:.2f}", "score": conf,
            "why": row.get("why") or "", "model_version": model_version,
            "image_flags": image_flags or "none",
            **{k: _plain(row.get(k)) for k in CARRIED},
        },
        "predictions": [{"model_version": model_version, "score": conf, "result": result}],
    }


def _choice(result: list[dict], name: str) -> str | None:
    for r in result:
        if r.get("from_name") == name and r.get("value", {}).get("choices"):
            return r["value"]["choices"][0]
    return None


def _text(result: list[dict], name: str) -> str | None:
    for r in result:
        if r.get("from_name") == name and r.get("value", {}).get("text"):
            return "\n".join(r["value"]["text"]).strip()
    return None


def normalise_annotations(tasks: list[dict]) -> pd.DataFrame:
    """Exported tasks → one row per task (its latest submitted annotation) in ``labeled/`` form.

    A "correct" verdict without a typed answer keeps the model's answer as the corrected one."""
    rows = []
    for t in tasks:
        anns = [a for a in t.get("annotations") or [] if not a.get("was_cancelled")]
        if not anns:
            continue
        a = max(anns, key=lambda a: (a.get("updated_at") or "", a["id"]))
        data, result = t["data"], a.get("result") or []
        verdict = _choice(result, "verdict")
        corrected = _text(result, "corrected_answer")
        if corrected is None and verdict == "correct":
            corrected = data.get("model_answer")
        who = a.get("completed_by")
        rows.append({
            "request_id": data.get("request_id"), "task_id": t["id"], "annotation_id": a["id"],
            "image_key": data.get("image_key"), "question": data.get("question"),
            "model_answer": data.get("model_answer"), "corrected_answer": corrected, "verdict": verdict,
            "image_quality": _choice(result, "image_quality"),
            "annotator": str(who.get("email") or who.get("id")) if isinstance(who, dict) else str(who),
            "lead_time_s": a.get("lead_time"),
            "created_at": pd.Timestamp(a["created_at"]) if a.get("created_at") else pd.NaT,
            "updated_at": pd.Timestamp(a["updated_at"]) if a.get("updated_at") else pd.NaT,
            "model_version": data.get("model_version"), "confidence": data.get("score"),
            **{k: data.get(k) for k in CARRIED},
        })
    if not rows:
        return pd.DataFrame(columns=LABELED_COLUMNS).astype(LABELED_EMPTY_TYPES)
    return pd.DataFrame(rows, columns=LABELED_COLUMNS)


class LabelStudio:
    """A Label Studio server at ``url`` reached with the API token ``token``."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0, retries: int = 3):
        if not token:
            raise LabelStudioError("no Label Studio API token (connection password / LABEL_STUDIO_API_KEY)")
        self.url = url.rstrip("/")
        self.retries = retries
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 headers={"Authorization": f"Token {token}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, path: str, *, retry: bool = True, **kw):
        """One API call; connection errors and 5xx are retried with backoff, 4xx are not. With
        ``retry=False`` (a call that is not safe to repeat blindly) the first failure raises."""
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if attempt == attempts - 1:
                    raise LabelStudioError(f"Label Studio at {self.url} unreachable: {e!r}") from e
            else:
                if r.status_code < 500 or attempt == attempts - 1:
                    break
            time.sleep(0.5 * 2 ** attempt)
        if r.status_code >= 400:
            raise LabelStudioError(f"{method} {path} → {r.status_code}: {r.text[:500]}", r.status_code)
        return r.json() if r.content else None

    # -- project and storage -------------------------------------------------------------------
    def find_project(self, title: str) -> dict | None:
        page = 1
        while True:
            res = self._call("GET", "/api/projects", params={"page": page, "page_size": 100, "title": title})
            items = res["results"] if isinstance(res, dict) else res
            for p in items:
                if p["title"] == title:
                    return p
            if not isinstance(res, dict) or not res.get("next"):
                return None
            page += 1

    def ensure_project(self, title: str = PROJECT_TITLE) -> int:
        """The id of the review project called ``title``, created with :data:`LABEL_CONFIG` if new
        (and its labelling config brought up to date if it differs)."""
        p = self.find_project(title)
        if p is None:
            p = self._call("POST", "/api/projects", json={
                "title": title, "label_config": LABEL_CONFIG,
                "description": "Answers of the served model picked by vloop's daily selection. Fix the "
                               "answer if it is wrong, give a verdict, flag poor photos.",
                "show_collab_predictions": True, "maximum_annotations": 1})
        elif p.get("label_config") != LABEL_CONFIG:
            self._call("PATCH", f"/api/projects/{p['id']}", json={"label_config": LABEL_CONFIG})
        return int(p["id"])

    def ensure_storage(self, project: int, lake: Lake, document_root: str | None = None,
                       s3_endpoint: str | None = None, read_only_keys: tuple[str, str] | None = None
                       ) -> dict | None:
        """Register the lake as an import storage of ``project`` (once), so task image references
        resolve in the annotator's browser.

        On S3/MinIO the endpoint is left out of the storage by default: Label Studio refuses a
        user-supplied endpoint on a private or loopback address (its SSRF guard), but trusts the
        one its operator sets in its own environment, ``S3_ENDPOINT`` — set that to the MinIO URL
        where Label Studio runs. Pass ``s3_endpoint`` only for a public endpoint.

        Label Studio only reads (and presigns) photos, so it gets read-only keys:
        ``read_only_keys`` or ``VLOOP_LABEL_STUDIO_S3_ACCESS_KEY`` / ``_SECRET_KEY``; the lake's
        read-write keys are refused (a Label Studio user with project admin rights can read a
        storage's keys back)."""
        if isinstance(lake, S3Lake):
            if read_only_keys is None:
                from vloop.store.config import load_settings

                s = load_settings()
                read_only_keys = (s.label_studio_s3_access_key, s.label_studio_s3_secret_key)
            if not all(read_only_keys or ()):
                raise LabelStudioError(
                    "Label Studio needs read-only S3 keys for the lake's bucket: set VLOOP_LABEL_STUDIO_S3_ACCESS_KEY "
                    "and VLOOP_LABEL_STUDIO_S3_SECRET_KEY (on MinIO: a user with the readonly policy; `make up` "
                    "creates one on its SeaweedFS); the lake's read-write keys are never handed to it")
            if read_only_keys[0] == lake.access_key:
                raise LabelStudioError("VLOOP_LABEL_STUDIO_S3_ACCESS_KEY is the lake's own (read-write) key; "
                                       "give Label Studio a read-only identity")
            kind, body = "s3", {
                "bucket": lake.bucket, "prefix": lake.prefix.rstrip("/"),
                "aws_access_key_id": read_only_keys[0], "aws_secret_access_key": read_only_keys[1],
                "region_name": lake.region, "presign": True, "use_blob_urls": False,
                "title": "vloop lake", **({"s3_endpoint": s3_endpoint} if s3_endpoint else {})}
        elif isinstance(lake, LocalLake) and document_root:
            # Only the images directory is exposed (Label Studio also refuses the document root
            # itself), and it must exist before Label Studio accepts it.
            images = Path(lake.root) / IMAGES_PREFIX
            images.mkdir(parents=True, exist_ok=True)
            kind, body = "localfiles", {"path": str(images), "use_blob_urls": False, "title": "vloop lake"}
        else:
            return None
        existing = self._call("GET", f"/api/storages/{kind}", params={"project": project})
        for s in existing or []:
            if s.get("title") == body["title"]:
                return s
        return self._call("POST", f"/api/storages/{kind}", json={"project": project, **body})

    # -- tasks ----------------------------------------------------------------------------------
    def export(self, project: int, all_tasks: bool) -> list[dict]:
        """Every task of ``project`` (``all_tasks``) or only those with annotations, as JSON."""
        return self._call("GET", f"/api/projects/{project}/export",
                          params={"exportType": "JSON", "download_all_tasks": str(all_tasks).lower()})

    def request_ids(self, project: int) -> set[str]:
        return {t["data"].get("request_id") for t in self.export(project, all_tasks=True)}

    def import_tasks(self, project: int, tasks: list[dict], chunk: int = 1000) -> ImportResult:
        """Bulk-import ``tasks``, skipping request ids the project already holds.

        Safe to retry: Label Studio's import is not idempotent, and a chunk whose answer was lost
        (a read timeout, a dropped connection, a 5xx from a proxy) may well have been imported. So
        a failed chunk is never simply sent again: the project is read back and only its tasks
        still missing go again. Should the server have committed the first attempt only after that
        read (a very slow import), the copies are found afterwards and the unannotated ones deleted.
        """
        have = self.request_ids(project)
        new, seen = [], set()
        for t in tasks:
            rid = t["data"]["request_id"]
            if rid not in have and rid not in seen:
                new.append(t)
                seen.add(rid)
        uncertain = False
        for i in range(0, len(new), chunk):
            part = new[i:i + chunk]
            for attempt in range(self.retries + 1):
                try:
                    self._call("POST", f"/api/projects/{project}/import", json=part, retry=False,
                               params={"commit_to_project": "true", "return_task_ids": "true"})
                    break
                except LabelStudioError as e:
                    if (e.status is not None and e.status < 500) or attempt == self.retries:
                        raise
                    uncertain = True
                    time.sleep(0.5 * 2 ** attempt)
                    have = self.request_ids(project)
                    part = [t for t in part if t["data"]["request_id"] not in have]
                    if not part:  # the lost answer's import had gone through
                        break
        if uncertain:
            self._drop_duplicates(project, seen)
        return ImportResult(sent=len(new), already_there=len(tasks) - len(new))

    def _drop_duplicates(self, project: int, request_ids: set[str]) -> int:
        """Delete the later copies of tasks of ``request_ids`` that nobody has annotated (the
        first copy, by id, stays). Returns how many went."""
        first: dict[str, int] = {}
        dropped = 0
        for t in sorted(self.export(project, all_tasks=True), key=lambda t: t["id"]):
            rid = t["data"].get("request_id")
            if rid not in request_ids:
                continue
            if rid in first and not t.get("annotations"):
                self._call("DELETE", f"/api/tasks/{t['id']}")
                dropped += 1
            else:
                first.setdefault(rid, t["id"])
        return dropped

    def projects(self) -> list[dict]:
        """Every project on the server."""
        out, page = [], 1
        while True:
            res = self._call("GET", "/api/projects", params={"page": page, "page_size": 100})
            items = res["results"] if isinstance(res, dict) else res
            out.extend(items)
            if not isinstance(res, dict) or not res.get("next"):
                return out
            page += 1

    def delete_tasks_of(self, user_key: str, request_id_hashes: set[str]) -> int:
        """Delete, in every project, the tasks of ``user_key`` or of a request whose
        :func:`vloop.privacy.request_hash` is in ``request_id_hashes``, with their annotations and
        predictions (an erasure). Returns how many tasks went."""
        from vloop.privacy import request_hash

        n = 0
        for p in self.projects():
            for t in self.export(p["id"], all_tasks=True):
                data = t.get("data", {})
                if data.get("user_key") == user_key or request_hash(data.get("request_id")) in request_id_hashes:
                    self._call("DELETE", f"/api/tasks/{t['id']}")
                    n += 1
        return n

    def finished_annotations(self, project: int) -> pd.DataFrame:
        """The latest submitted annotation of every annotated task, normalised (see
        :func:`normalise_annotations`)."""
        return normalise_annotations(self.export(project, all_tasks=False))
