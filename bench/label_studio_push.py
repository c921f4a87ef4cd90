"""Bulk import of tasks with predictions into a running Label Studio.

Starts nothing itself: point it at a server (``make up`` starts one) with its URL and token.
It creates a fresh project, registers the lake storage, builds N tasks from a simulated day the
way the daily DAG does (image reference, prediction with model version and score), and times
``LabelStudio.import_tasks`` (which first checks the project for request ids it already holds),
then a second push of the same tasks (nothing new is sent). Goal (issue #5): 500 tasks <= 10 s.

    LABEL_STUDIO_URL=http://127.0.0.1:8080 LABEL_STUDIO_API_KEY=... python bench/label_studio_push.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
import uuid
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--token", default=os.environ.get("LABEL_STUDIO_API_KEY"))
    ap.add_argument("--document-root", default=os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"),
                    help="Label Studio's local-files root; the bench lake is created under it")
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="100 tasks")
    args = ap.parse_args()
    n = 100 if args.quick else args.tasks
    from vloop.curate.daily import model_version
    from vloop.sim.traffic import simulated_day
    from vloop.curate.labelstudio import LabelStudio, image_reference, task_payload
    from vloop.store.lake import LocalLake

    root = Path(args.document_root) if args.document_root else Path(tempfile.mkdtemp())
    lake = LocalLake(root / f"bench-lake-{uuid.uuid4().hex[:8]}", max_image_bytes=2**24, max_image_pixels=2**24)
    day = dt.date(2026, 11, 20)
    written = simulated_day(lake, day, n, seed=3)
    rows = lake.read_partitions("raw/interactions", day, day).to_pandas().to_dict("records")
    with LabelStudio(args.url, args.token) as ls:
        project = ls.ensure_project(f"bench push {uuid.uuid4().hex[:8]}")
        ls.ensure_storage(project, lake, args.document_root)
        t = time.perf_counter()
        tasks = [task_payload(r, image_reference(lake, r["image_key"], args.document_root), model_version(r))
                 for r in rows]
        build = time.perf_counter() - t
        t = time.perf_counter()
        first = ls.import_tasks(project, tasks)
        push = time.perf_counter() - t
        t = time.perf_counter()
        again = ls.import_tasks(project, tasks)
        repush = time.perf_counter() - t
        stored = len(ls.export(project, all_tasks=True))
    assert first.sent == n and again.sent == 0 and stored == n == written["interactions"]
    print(f"built {n} tasks in {build:.2f}s; import {push:.2f}s ({n / push:.0f} tasks/s); "
          f"re-push (all already there) {repush:.2f}s; project holds {stored} tasks")
    print(f"RESULT tasks={n} push_s={push:.2f} repush_s={repush:.2f} goal_met={push <= 10}")


if __name__ == "__main__":
    main()
