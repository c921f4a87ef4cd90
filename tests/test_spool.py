"""The spool and its shipper, against both lake backends."""

from __future__ import annotations

import datetime as dt
import os
import uuid

import pytest

from vloop.lake import S3Lake
from vloop.schema import INTERACTION
from vloop.spool import Shipper, Spool, read_segment

TS = dt.datetime(2026, 11, 3, 10, 59, 59, tzinfo=dt.timezone.utc)


def record(i: int, ts=TS) -> dict:
    return INTERACTION.to_row({"request_id": f"r{i}", "ts": ts, "user_key": "k", "question": "q",
                               "answer": "a", "base_model": "m", "arm": "champion", "status": "ok",
                               "token_logprobs": [-0.5]})


def ids_in_lake(lake):
    t = lake.read_partitions("raw/interactions", TS.date(), TS.date() + dt.timedelta(days=1),
                             columns=["request_id"], schema=INTERACTION.arrow)
    return t.column("request_id").to_pylist()


def test_records_ship_once_into_hourly_partitions(lake, tmp_path):
    spool = Spool(tmp_path / "spool", max_segment_bytes=2000)
    for i in range(30):  # several segments; records straddle an hour boundary
        spool.append("interactions", record(i, TS + dt.timedelta(seconds=i % 2)))
    spool.put_image("raw/images/ab/abc.png", b"png-bytes")
    spool.close()
    segments = spool.streams["interactions"].sealed()
    assert len(segments) > 1
    shipper = Shipper(spool, lake)
    assert shipper.ship_once() == 30
    assert sorted(ids_in_lake(lake)) == sorted(f"r{i}" for i in range(30))
    assert {k.split("/hour=")[1][:2] for k in lake.list("raw/interactions/")} == {"10", "11"}
    assert lake.get_bytes("raw/images/ab/abc.png") == b"png-bytes"
    assert spool.streams["interactions"].sealed() == [] and spool.pending_images() == []
    assert shipper.ship_once() == 0


def test_reshipping_a_segment_after_a_crash_does_not_duplicate(lake, tmp_path):
    spool = Spool(tmp_path / "spool")
    for i in range(5):
        spool.append("interactions", record(i))
    spool.close()
    seg = spool.streams["interactions"].sealed()[0]
    kept = seg.read_bytes()
    Shipper(spool, lake).ship_once()
    seg.write_bytes(kept)  # as if the process died after writing to the lake, before deleting
    Shipper(spool, lake).ship_once()
    assert sorted(ids_in_lake(lake)) == [f"r{i}" for i in range(5)]


def test_open_segment_of_a_dead_process_is_sealed_and_torn_line_skipped(tmp_path):
    d = tmp_path / "spool" / "interactions"
    d.mkdir(parents=True)
    good = '{"request_id": "r1", "ts": "2026-11-03T10:00:00+00:00", "user_key": "k", "question": "q", ' \
           '"answer": "a", "base_model": "m", "arm": "champion", "status": "ok"}\n'
    (d / "seg-1-1-000001.open").write_text(good + '{"request_id": "r2", "ts": "20')
    spool = Spool(tmp_path / "spool")
    sealed = spool.streams["interactions"].sealed()
    assert [p.name for p in sealed] == ["seg-1-1-000001.jsonl"]
    assert [r["request_id"] for r in read_segment(sealed[0])] == ["r1"]
    spool.close()


def test_lake_down_then_up(tmp_path, local_lake):
    from tests.conftest import free_port

    spool = Spool(tmp_path / "spool")
    for i in range(3):
        spool.append("interactions", record(i))
    spool.close()
    dead = S3Lake("vloop-down", endpoint=f"http://127.0.0.1:{free_port()}", access_key="a", secret_key="b",
                  max_image_bytes=1, max_image_pixels=1)
    failures = []
    shipper = Shipper(spool, dead, interval_s=0.05, max_backoff_s=0.2, on_failure=failures.append)
    with pytest.raises(Exception):
        shipper.ship_once()
    assert len(spool.streams["interactions"].sealed()) == 1  # nothing lost
    shipper.lake = local_lake
    assert shipper.ship_once() == 3
    assert sorted(ids_in_lake(local_lake)) == ["r0", "r1", "r2"]


def test_background_fsync_and_age_sealing(tmp_path):
    import time

    spool = Spool(tmp_path / "spool", max_segment_age_s=0.1, fsync_interval_s=0.02)
    spool.append("feedback", {"event_id": uuid.uuid4().hex, "request_id": "r", "ts": TS, "type": "accept",
                              "edited_text": None, "dwell_ms": None, "rating": None})
    deadline = time.time() + 5
    while not spool.streams["feedback"].sealed() and time.time() < deadline:
        time.sleep(0.02)
    assert len(spool.streams["feedback"].sealed()) == 1
    spool.close()
    assert not any(p.suffix == ".open" for p in (tmp_path / "spool" / "feedback").iterdir())


def test_a_bad_record_is_quarantined_not_blocking(lake, tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.append("interactions", record(1))
    spool.append("interactions", {**record(2), "arm": "purple"})  # slipped past the gateway somehow
    spool.close()
    assert Shipper(spool, lake).ship_once() == 1
    assert ids_in_lake(lake) == ["r1"]
    [key] = lake.list("quarantine/spool/interactions/")
    [bad] = lake.get_json(key)
    assert bad["record"]["request_id"] == "r2" and "'arm'" in bad["reason"]
    assert spool.streams["interactions"].sealed() == []
