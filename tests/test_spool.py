"""The spool and its shipper, against both lake backends."""

from __future__ import annotations

import datetime as dt
import os
import uuid

import pytest

from vloop.store.lake import S3Lake
from vloop.store.schema import INTERACTION
from vloop.capture.spool import Shipper, Spool, read_segment

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


def test_a_corrupt_line_mid_segment_is_quarantined_and_everything_else_ships(lake, tmp_path):
    """A sealed segment with garbage in its middle (a bad disk block, a stray edit) used to stall
    the shipper for good: it raised on every pass, and the segments after it never shipped."""
    spool = Spool(tmp_path / "spool", max_segment_bytes=600)
    for i in range(6):  # several segments
        spool.append("interactions", record(i))
    spool.close()
    first, *others = spool.streams["interactions"].sealed()
    assert others
    lines = first.read_bytes().split(b"\n")
    first.write_bytes(b"\n".join([lines[0], b'{"request_id": "r-torn", "ts": "2026-', b"\xff\xfe not json",
                                  b"[1, 2]", *lines[1:]]))
    assert Shipper(spool, lake).ship_once() == 6
    assert sorted(ids_in_lake(lake)) == [f"r{i}" for i in range(6)]
    assert spool.streams["interactions"].sealed() == []  # nothing left behind to stall on
    [key] = lake.list("quarantine/spool/interactions/")
    bad = lake.get_json(key)
    assert [b["line"] for b in bad] == [2, 3, 4]
    assert all("is not a JSON record" in b["reason"] for b in bad) and "r-torn" in bad[0]["text"]


def test_a_record_without_a_time_is_quarantined(lake, tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.append("interactions", record(1))
    spool.append("interactions", {k: v for k, v in record(2).items() if k != "ts"})
    spool.close()
    assert Shipper(spool, lake).ship_once() == 1
    [key] = lake.list("quarantine/spool/interactions/")
    assert [b["record"]["request_id"] for b in lake.get_json(key)] == ["r2"]


def test_a_second_gateway_cannot_take_over_a_live_spool(tmp_path):
    """Two processes on one spool directory: the second would seal the first one's open segment
    under it and ship segments twice. It refuses, naming the owner; once the owner is gone (even
    killed), the directory is free again."""
    import signal
    import sys

    from vloop.capture.spool import SpoolLocked
    from vloop.services import Service

    root = tmp_path / "spool"
    owner = Service("spool-owner", [sys.executable, "-c", (
        "import sys, time; from vloop.capture.spool import Spool; s = Spool(sys.argv[1]); "
        "s.append('interactions', {'request_id': 'x'}); print('ready', flush=True); time.sleep(60)"), str(root)],
        log_file=tmp_path / "owner.log").start(health_log="^ready$", timeout=60)
    try:
        with pytest.raises(SpoolLocked, match=f"pid {owner.pid}"):
            Spool(root)
        assert len(list((root / "interactions").glob("*.open"))) == 1  # the owner's segment untouched
    finally:
        owner.stop(signal.SIGKILL)  # killed, not stopped: it never releases the lock itself
    spool = Spool(root)  # the kernel dropped the dead owner's lock; its open segment is sealed now
    assert len(spool.streams["interactions"].sealed()) == 1
    with pytest.raises(SpoolLocked):
        Spool(root)  # one owner per directory within a process too
    spool.close()
    Spool(root).close()


def test_shipper_watermark_tells_when_a_day_is_in_the_lake(lake, tmp_path):
    from vloop.capture.spool import shippers_caught_up

    day_end = dt.datetime.combine(TS.date() + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    assert shippers_caught_up(lake, day_end)[0]  # no gateway has shipped here: nothing to wait for

    spool = Spool(tmp_path / "spool")
    shipper = Shipper(spool, lake)
    spool.append("interactions", record(1))
    spool.streams["interactions"].seal()
    spool.append("interactions", record(2))  # still in the open segment: not shipped yet
    assert shipper.ship_once() == 1
    [key] = lake.list("shippers/")
    mark = lake.get_json(key)
    assert mark["spool"] == spool.id and dt.datetime.fromisoformat(mark["shipped_through"]) == TS
    ready, why = shippers_caught_up(lake, day_end)
    assert not ready and spool.id in why and "2026-11-03 10:59" in why

    spool.streams["interactions"].seal()
    assert shipper.ship_once() == 1
    ready, why = shippers_caught_up(lake, day_end)
    assert ready, why
    # A gateway that stopped reporting a week ago does not hold every later day back.
    lake.put_json("shippers/retired-1.json", {"spool": "retired-1", "shipped_through": "2026-01-01T00:00:00+00:00",
                                             "updated_at": "2026-01-01T00:00:00+00:00"})
    ready, why = shippers_caught_up(lake, day_end)
    assert ready and "retired-1" in why
    assert not shippers_caught_up(lake, day_end, now=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc))[0]
    spool.close()
    again = Spool(tmp_path / "spool")
    assert again.id == spool.id  # the identity survives a restart
    again.close()


def test_a_day_waits_for_late_shippers_until_the_grace_period_ends(local_lake):
    from vloop.capture.spool import day_is_shipped

    day, grace = TS.date(), dt.timedelta(hours=2)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    local_lake.put_json("shippers/gw-1.json", {"spool": "gw-1", "shipped_through": (end - dt.timedelta(hours=3)).isoformat(),
                                               "updated_at": end.isoformat()})
    assert not day_is_shipped(local_lake, day, now=end + dt.timedelta(minutes=5), grace=grace)[0]
    ready, why = day_is_shipped(local_lake, day, now=end + grace, grace=grace)
    assert ready and "grace period" in why and "gw-1" in why
    local_lake.put_json("shippers/gw-1.json", {"spool": "gw-1", "shipped_through": end.isoformat(),
                                               "updated_at": end.isoformat()})
    assert day_is_shipped(local_lake, day, now=end + dt.timedelta(minutes=5), grace=grace)[0]
