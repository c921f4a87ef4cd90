"""The Label Studio client against a real Label Studio server (fixture `label_studio`), and its
payload/normalisation functions on their own."""

from __future__ import annotations

import httpx
import pandas as pd
import pytest

from vloop.curate.labelstudio import (LABEL_CONFIG, LabelStudio, LabelStudioError, image_reference,
                                      normalise_annotations, task_payload)
from tests.conftest import S3_READ_ONLY_KEYS
from vloop.store.lake import LakeError, LocalLake, S3Lake
from vloop.sim.synth import World


def interaction(i: int, lake, **kw) -> dict:
    s = World(3).sample(i)
    img = lake.put_image(s.image_bytes())
    return {"request_id": f"req-{i}", "image_key": img.key, "question": s.question, "answer": "red",
            "confidence": 0.31, "category": s.category, "why": "low confidence 0.31", "base_model": "base",
            "adapter": None, "arm": "champion", "weak_label": "negative", "selected_on": "2026-11-20", **kw}


def annotate(ls: LabelStudio, task_id: int, verdict: str, text: str | None = None, quality: str | None = None):
    result = [{"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [verdict]}}]
    if text is not None:
        result.append({"from_name": "corrected_answer", "to_name": "image", "type": "textarea",
                       "value": {"text": [text]}})
    if quality:
        result.append({"from_name": "image_quality", "to_name": "image", "type": "choices",
                       "value": {"choices": [quality]}})
    return ls._call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, "lead_time": 7.5})


def test_task_payload_and_normalise_roundtrip():
    row = {"request_id": "r1", "image_key": "raw/images/ab/x.png", "question": "colour?", "answer": "red",
           "confidence": float("nan"), "category": "shoes", "arm": "canary", "adapter": "a@3"}
    t = task_payload(row, "/data/local-files/?d=raw/images/ab/x.png", "a@3", poor_image=True)
    assert t["predictions"][0]["model_version"] == "a@3" and t["predictions"][0]["score"] is None
    assert {r["from_name"] for r in t["predictions"][0]["result"]} == {"corrected_answer", "image_quality"}
    exported = [{"id": 7, "data": t["data"], "annotations": [
        {"id": 1, "was_cancelled": True, "result": [], "completed_by": 1, "updated_at": "2026-11-21T10:00:00Z"},
        {"id": 2, "result": [{"from_name": "verdict", "value": {"choices": ["correct"]}}], "completed_by": 4,
         "lead_time": 3.0, "created_at": "2026-11-21T09:00:00Z", "updated_at": "2026-11-21T09:00:00Z"}]},
        {"id": 8, "data": {**t["data"], "request_id": "r2"}, "annotations": []}]
    df = normalise_annotations(exported)
    assert len(df) == 1  # the task without annotations is not finished
    r = df.iloc[0]
    # a skipped (cancelled) annotation is ignored; "correct" without typed text keeps the model's answer
    assert (r.annotation_id, r.verdict, r.corrected_answer, r.annotator) == (2, "correct", "red", "4")
    assert (r.arm, r.adapter, r.category) == ("canary", "a@3", "shoes")


def test_bad_token_and_unreachable_server_fail_clearly(label_studio):
    url, _, _ = label_studio
    with pytest.raises(LabelStudioError, match="401"):
        LabelStudio(url, "not-the-token").ensure_project("x")
    with pytest.raises(LabelStudioError, match="no Label Studio API token"):
        LabelStudio(url, "")
    with pytest.raises(LabelStudioError, match="unreachable"):
        LabelStudio("http://127.0.0.1:9", "t", retries=1).find_project("x")


def test_project_storage_import_without_duplicates_and_pull(label_studio):
    url, token, docroot = label_studio
    lake = LocalLake(docroot / "lake-client", max_image_bytes=2**20, max_image_pixels=2**20)
    with LabelStudio(url, token) as ls:
        pid = ls.ensure_project("client test")
        assert ls.ensure_project("client test") == pid  # found again, not created twice
        project = ls._call("GET", f"/api/projects/{pid}")
        assert project["label_config"] == LABEL_CONFIG
        storage = ls.ensure_storage(pid, lake, str(docroot))
        assert ls.ensure_storage(pid, lake, str(docroot))["id"] == storage["id"]

        rows = [interaction(i, lake) for i in range(5)]
        tasks = [task_payload(r, image_reference(lake, r["image_key"], str(docroot)), "base") for r in rows]
        first = ls.import_tasks(pid, tasks[:3])
        again = ls.import_tasks(pid, tasks)  # three already there, two new
        assert (first.sent, again.sent, again.already_there) == (3, 2, 3)
        exported = ls.export(pid, all_tasks=True)
        assert sorted(t["data"]["request_id"] for t in exported) == [f"req-{i}" for i in range(5)]
        assert all(t["total_predictions"] == 1 for t in exported)

        # The annotator's browser gets the image through Label Studio's local-files serving.
        img = httpx.get(url + exported[0]["data"]["image"], headers={"Authorization": f"Token {token}"})
        assert img.status_code == 200 and img.headers["content-type"].startswith("image/")
        assert img.content == lake.get_bytes(exported[0]["data"]["image_key"])

        by_rid = {t["data"]["request_id"]: t["id"] for t in exported}
        annotate(ls, by_rid["req-0"], "wrong", "blue", "good")
        annotate(ls, by_rid["req-1"], "correct")
        ls._call("POST", f"/api/tasks/{by_rid['req-2']}/annotations", json={"result": [], "was_cancelled": True})
        got = ls.finished_annotations(pid).set_index("request_id")
        assert sorted(got.index) == ["req-0", "req-1"]
        assert got.loc["req-0", ["corrected_answer", "verdict", "image_quality"]].tolist() == ["blue", "wrong", "good"]
        assert got.loc["req-1", "corrected_answer"] == "red" and got.loc["req-0", "lead_time_s"] == 7.5
        assert pd.notna(got.loc["req-0", "updated_at"])


def test_s3_lake_images_reach_the_annotator_presigned(label_studio, s3_lake, s3_endpoint):
    """MinIO/S3 lake: an S3 import storage (endpoint from Label Studio's own S3_ENDPOINT, since its
    SSRF guard refuses a user-supplied loopback/private endpoint); the task's s3:// reference
    resolves to a presigned URL that serves the lake's bytes."""
    url, token, _ = label_studio
    row = interaction(0, s3_lake)
    with LabelStudio(url, token) as ls:
        pid = ls.ensure_project(f"s3 {s3_lake.bucket}")
        # Label Studio is never given the lake's read-write keys; it gets a read-only identity,
        # which the S3 server refuses any write.
        with pytest.raises(LabelStudioError, match="read-only"):
            ls.ensure_storage(pid, s3_lake, read_only_keys=(s3_lake.access_key, s3_lake.secret_key))
        reader = S3Lake(s3_lake.bucket, "lake", endpoint=s3_endpoint, access_key=S3_READ_ONLY_KEYS[0],
                        secret_key=S3_READ_ONLY_KEYS[1], max_image_bytes=2**20, max_image_pixels=2**20)
        assert reader.get_bytes(row["image_key"]) == s3_lake.get_bytes(row["image_key"])
        with pytest.raises(LakeError):
            reader.put_bytes("raw/images/forged.png", b"x")
        storage = ls.ensure_storage(pid, s3_lake, read_only_keys=S3_READ_ONLY_KEYS)
        # (Label Studio does not echo keys back; the presigned fetch below works with the reader's.)
        assert storage["type"] == "s3" and storage["bucket"] == s3_lake.bucket and storage["presign"]
        ls.import_tasks(pid, [task_payload(row, image_reference(s3_lake, row["image_key"]), "base")])
        task = ls.export(pid, all_tasks=True)[0]
        assert task["data"]["image"].startswith(f"s3://{s3_lake.bucket}/")
        resolved = ls._call("GET", f"/api/tasks/{task['id']}")["data"]["image"]
        assert resolved.startswith(f"/tasks/{task['id']}/resolve/")
        redirect = ls.http.get(resolved, follow_redirects=False)
        assert redirect.status_code in (302, 303, 307) and "X-Amz-Signature" in redirect.headers["location"]
        assert httpx.get(redirect.headers["location"]).content == s3_lake.get_bytes(row["image_key"])


def test_wrong_verdict_with_the_model_answer_left_unchanged_is_not_trained_on(label_studio):
    """An annotator marks the answer wrong but submits the pre-filled model answer as the
    correction: the pulled row carries the model's answer, and the dataset drops it."""
    import datetime as dt

    from tests.test_dataset_labels import write_golden
    from vloop.curate import daily
    from vloop.learn.dataset import DatasetConfig, build_dataset

    url, token, docroot = label_studio
    lake = LocalLake(docroot / "lake-unchanged", max_image_bytes=2**20, max_image_pixels=2**20)
    rows = [interaction(i, lake) for i in (5, 6)]  # the model answered "red" to both
    with LabelStudio(url, token) as ls:
        pid = ls.ensure_project("unchanged correction")
        ls.import_tasks(pid, [task_payload(r, image_reference(lake, r["image_key"], str(docroot)), "base")
                              for r in rows])
        by_rid = {t["data"]["request_id"]: t["id"] for t in ls.export(pid, all_tasks=True)}
        annotate(ls, by_rid["req-5"], "wrong", "red")  # the pre-filled text, unchanged
        annotate(ls, by_rid["req-6"], "wrong", "blue")
        pulled = ls.finished_annotations(pid)
    assert (pulled["model_answer"] == "red").all()
    day = dt.date(2026, 11, 21)
    daily.put_frame(lake, daily.key(daily.LABELED, day, daily.LABELED_FILE), pulled)
    # The labelled requests' users, where the dataset builder checks them against opt-outs.
    daily.put_frame(lake, daily.key(daily.CURATED, pulled["selected_on"].iloc[0] or day, "interactions.parquet"),
                    pd.DataFrame({"request_id": [r["request_id"] for r in rows], "user_key": "shopper-1"}))
    write_golden(lake)
    m = build_dataset(lake, DatasetConfig(replay_ratio=0, heldout_share=0), today=day)
    assert m["dropped"]["wrong verdict without a correction"] == 1 and m["examples"]["train"] == 1
    assert daily.get_frame(lake, f"datasets/{m['id']}/train.parquet")["request_id"].tolist() == ["req-6"]


class AnswerLosingProxy:
    """A loopback HTTP proxy in front of Label Studio that forwards every request, but for the
    first ``POST …/import`` withholds Label Studio's answer until the client gives up: the import
    happened, the client saw a timeout (a network fault, injected between two real parts)."""

    def __init__(self, upstream: str):
        import socket
        import threading

        self.upstream = httpx.Client(base_url=upstream, timeout=120)
        self.imports_seen = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            f = conn.makefile("rb")
            request_line = f.readline().decode()
            if not request_line:
                return
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            while (line := f.readline().decode()) not in ("\r\n", ""):
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
            body = f.read(int(headers.get("content-length", 0)))
            keep = {k: v for k, v in headers.items() if k in ("authorization", "content-type", "accept")}
            r = self.upstream.request(method, path, content=body, headers=keep)
            if method == "POST" and "/import" in path:
                self.imports_seen += 1
                if self.imports_seen == 1:
                    f.read()  # Label Studio has imported the tasks; hold the answer until the client hangs up
                    return
            head = f"HTTP/1.1 {r.status_code} {r.reason_phrase}\r\nContent-Type: {r.headers.get('content-type', 'application/json')}\r\n" \
                   f"Content-Length: {len(r.content)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + r.content)

    def close(self):
        self.sock.close()
        self.upstream.close()


def test_an_import_retried_after_a_timeout_creates_no_duplicates(label_studio):
    url, token, docroot = label_studio
    lake = LocalLake(docroot / "lake-timeout", max_image_bytes=2**20, max_image_pixels=2**20)
    proxy = AnswerLosingProxy(url)
    try:
        with LabelStudio(proxy.url, token, timeout=8) as ls:
            pid = ls.ensure_project("import timeout test")
            rows = [interaction(i, lake) for i in range(5)]
            tasks = [task_payload(r, image_reference(lake, r["image_key"]), "base") for r in rows]
            result = ls.import_tasks(pid, tasks)
            assert proxy.imports_seen >= 1 and result.sent == 5
            ids = sorted(t["data"]["request_id"] for t in ls.export(pid, all_tasks=True))
            assert ids == [f"req-{i}" for i in range(5)], "the retried import duplicated tasks"
    finally:
        proxy.close()
