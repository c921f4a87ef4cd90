"""A lake outage on a real S3 server: the gateway keeps answering and spooling while SeaweedFS is
down, and once it is back every acknowledged record reaches the lake exactly once with its photo.

The test runs its own SeaweedFS (the session's ``s3_server`` is shared with other tests and must
not be stopped) on a fixed data folder and S3 port, kills it by its PID under load, restarts it on
the same folder and port, and checks the lake against what the clients were told.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import threading
import time
from itertools import count

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import S3_KEYS, free_port
from tests.test_serving import Server, chat_body, data_url, distinct_photo, lake_table, wait_for
from vloop.store.lake import open_lake
from vloop.store.s3server import start_seaweedfs
from vloop.store.schema import INTERACTION
from vloop.sim.synth import World

pytestmark = pytest.mark.slow

OUTAGE_S = 15  # how long the S3 server stays dead
CLIENTS = 4


def metric(srv, name: str) -> float:
    """One unlabelled value from the gateway's /metrics (0 when absent)."""
    text = requests.get(srv.url + "/metrics", timeout=10).text
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_lake_outage_loses_no_acknowledged_record(tiny_model_dir, tmp_path):
    """SeaweedFS killed (SIGKILL, by its PID) for OUTAGE_S seconds under load from CLIENTS clients,
    each request with its own photo, then restarted on the same data folder and port: every request
    during the outage is answered, and afterwards every acknowledged record is in the lake once and
    the image behind each is there, hashes to its key and has the pixels that were sent."""
    data_dir, s3_port = tmp_path / "weed" / "data", free_port()
    weed_log = tmp_path / "weed" / "weed.log"
    s3 = start_seaweedfs(data_dir, **S3_KEYS, s3_port=s3_port, log_path=weed_log)
    weeds = [s3]  # every server started here, stopped at the end whatever happens
    lake_url = "s3://vloop-outage/lake"
    env = {"VLOOP_S3_ENDPOINT": s3.endpoint, "VLOOP_S3_ACCESS_KEY": S3_KEYS["access_key"],
           "VLOOP_S3_SECRET_KEY": S3_KEYS["secret_key"]}
    srv = Server(tiny_model_dir, lake_url, tmp_path, env)
    lake = open_lake(lake_url, endpoint=s3.endpoint, **S3_KEYS)
    s = World(9).sample(0, intents=("colour",))
    acked, sent, numbers = [], {}, count()
    answers: list[tuple[float, float, int]] = []  # (sent at, answered at, status) per request
    stop = threading.Event()

    def traffic(worker):
        while not stop.is_set():
            n = next(numbers)
            img = distinct_photo(s, n)
            body = chat_body(s, user=f"w{worker}-{n}")
            body["messages"][0]["content"][0]["image_url"]["url"] = data_url(img)
            t0 = time.monotonic()
            try:
                r = srv.post("/v1/chat/completions", body)
                status = r.status_code
            except requests.RequestException:
                status = -1
            answers.append((t0, time.monotonic(), status))
            if status == 200:
                sent[r.json()["id"]] = np.asarray(img)
                acked.append(r.json()["id"])

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(CLIENTS)]
    try:
        run_outage(srv, s3, weeds, lake, threads, stop, acked, data_dir, s3_port, weed_log, answers, sent)
    finally:
        for w in weeds:
            w.stop()


def run_outage(srv, s3, weeds, lake, threads, stop, acked, data_dir, s3_port, weed_log, answers, sent):
    try:
        srv.start()
        for t in threads:
            t.start()
        # Load with the lake up until something has shipped, so the outage hits a working shipper.
        wait_for(lambda: len(acked) >= 20, 60, "traffic")
        wait_for(lambda: lake.list("raw/interactions/"), 30, "a first shipment")
        os.kill(s3.pid, signal.SIGKILL)
        s3.process.wait()
        down_at = time.monotonic()
        time.sleep(OUTAGE_S)
        up_at = time.monotonic()
        failures_in_outage = metric(srv, "vloop_ship_failures_total")
        spooled = metric(srv, "vloop_spool_segments")  # segments waiting for the lake (open ones too)
        weeds.append(start_seaweedfs(data_dir, **S3_KEYS, s3_port=s3_port, log_path=weed_log))
        back_at = time.monotonic()
        time.sleep(5)  # load goes on with the lake back
        stop.set()
        for t in threads:
            t.join()
        n_acked = len(acked)
        # The shipper drains the spool into the lake while the gateway runs (its backoff may wait
        # up to 30 s after the last failure).
        wait_for(lambda: len(lake_table(lake, "raw/interactions", INTERACTION.arrow)) >= n_acked, 90,
                 "the spool to drain")
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        srv.stop()
    check_lake(lake, acked, sent, answers, down_at, up_at, back_at, failures_in_outage, spooled)


def check_lake(lake, acked, sent, answers, down_at, up_at, back_at, failures_in_outage, spooled):
    n_acked = len(acked)
    during = [st for t0, t1, st in answers if t0 >= down_at and t1 <= up_at]
    assert failures_in_outage >= 1  # the outage was real: the shipper failed at least once
    assert spooled >= 3  # and the records waited in the spool (a segment seals every 2 s under load)
    assert len(during) >= 5 and all(st == 200 for st in during), during  # served throughout
    assert all(st == 200 for _, _, st in answers)

    table = lake_table(lake, "raw/interactions", INTERACTION.arrow)
    ids = table.column("request_id").to_pylist()
    assert set(acked) <= set(ids)
    assert len(ids) == len(set(ids))  # exactly once
    keys = dict(zip(ids, table.column("image_key").to_pylist()))
    verified = 0
    for rid in acked:
        data = lake.get_bytes(keys[rid])  # present
        assert hashlib.sha256(data).hexdigest() in keys[rid], rid  # the bytes the key names
        got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(got, sent[rid]), rid  # the pixels that were sent
        verified += 1
    assert len({keys[r] for r in acked}) == n_acked  # distinct photos
    print(f"lake outage ({OUTAGE_S} s SIGKILL of SeaweedFS, {CLIENTS} clients): {n_acked} acknowledged, "
          f"{len(set(acked) & set(ids))} found once in the lake, {verified} images verified (present, hash, "
          f"pixels); {len(during)} requests answered during the outage, all 200; "
          f"{failures_in_outage:.0f} failed shipping attempts and {spooled:.0f} segments spooled by its end; restart took {back_at - up_at:.1f} s")
