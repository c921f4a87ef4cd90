"""Photos in the spool: durable before their records, verified before upload, repaired by the
next good copy, re-verifiable in the lake, and never deleted while any record may name them
(issue 21, items 2 and 3)."""

from __future__ import annotations

import datetime as dt
import json
import os

from vloop.privacy.erasure import erase_user
from vloop.store.images import image_key, normalise_image
from vloop.privacy import record_tombstone, user_key
from vloop.store.schema import INTERACTION
from vloop.capture.spool import ERASED_IMAGES, WATERMARKS, Shipper, Spool, check_images, key_sha256
from vloop.sim.synth import World

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
ALICE, BOB = user_key("alice", "s"), user_key("bob", "s")


def photo(i: int) -> tuple[str, bytes]:
    img = normalise_image(World(5).sample(i).image_bytes(), max_bytes=2**22, max_pixels=2**22)
    return image_key(img.sha256, img.ext), img.data


def rec(rid: str, user: str, key: str | None, ts=NOW) -> dict:
    return INTERACTION.to_row({"request_id": rid, "ts": ts, "user_key": user, "question": "q", "answer": "a",
                               "base_model": "m", "arm": "champion", "status": "ok", "image_key": key,
                               "image_sha256": key_sha256(key) if key else None})


def lake_ids(lake) -> list[str]:
    t = lake.read_partitions("raw/interactions", NOW.date() - dt.timedelta(days=1), NOW.date(),
                             columns=["request_id"], schema=INTERACTION.arrow)
    return t.column("request_id").to_pylist()


def shippers_through(lake, t: dt.datetime) -> None:
    """As if every shipper had shipped everything up to ``t`` (time passing, in a test)."""
    for k in lake.list(WATERMARKS):
        lake.put_json(k, {**lake.get_json(k), "shipped_through": t.isoformat(), "updated_at": t.isoformat()})


def test_an_image_is_fsynced_with_its_directory_before_its_record(tmp_path, monkeypatch):
    """Fails on the old spool: the staged image was never fsynced, nor the rename."""
    spool = Spool(tmp_path / "spool", fsync_interval_s=3600)
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    append = spool.streams["interactions"].append
    monkeypatch.setattr(spool.streams["interactions"], "append", lambda row: (events.append(("append",)), append(row)))
    key, data = photo(0)
    staged = spool.stage_image(key, data)
    spool.commit_image(key, staged)
    spool.append("interactions", rec("r1", ALICE, key))
    at = events.index(("append",))
    synced = [e[1] for e in events[:at]]
    assert any(s.endswith(".tmp") for s in synced), "the image file's bytes"
    assert str(spool.images) in synced, "the directory entry of the renamed image"
    assert synced.index(str(spool.images)) > max(i for i, s in enumerate(synced) if s.endswith(".tmp"))
    spool.close()


def test_a_corrupt_spooled_image_is_quarantined_and_the_next_good_copy_repairs_it(lake, tmp_path):
    """A crash left an empty file under the key (a durable record names it). Fails on the old
    shipper: it uploaded the empty bytes, and later copies were skipped because the key existed."""
    key, data = photo(1)
    spool = Spool(tmp_path / "spool")
    spool.put_image(key, b"")  # what a power loss can leave of an unsynced file
    spool.append("interactions", rec("r1", ALICE, key))
    spool.streams["interactions"].seal()
    shipper = Shipper(spool, lake)
    assert shipper.ship_once() == 1
    assert not lake.exists(key), "bad bytes never reach the lake"
    notes = [lake.get_json(k) for k in lake.list("quarantine/spool/images/")]
    assert [n["image_key"] for n in notes] == [key] and notes[0]["bytes"] == 0
    assert spool.pending_images() == []
    assert lake_ids(lake) == ["r1"]  # the record ships, still pointing at the key
    spool.put_image(key, data)  # the same photo sent again
    spool.append("interactions", rec("r2", BOB, key))
    spool.streams["interactions"].seal()
    shipper.ship_once()
    assert lake.get_bytes(key) == data
    assert check_images(lake, NOW.date())["ok"] == 1


def test_a_bad_lake_copy_is_replaced_by_the_next_good_copy(local_lake, tmp_path):
    """An image uploaded bad before this fix. Fails on the old shipper (key exists: skipped)."""
    lake = local_lake
    key, data = photo(2)
    lake.put_bytes(key, data[: len(data) // 2])
    spool = Spool(tmp_path / "spool")
    spool.put_image(key, data)
    spool.append("interactions", rec("r1", ALICE, key))
    spool.close()
    Shipper(spool, lake).ship_once()
    assert lake.get_bytes(key) == data


def test_lake_check_re_verifies_a_days_images(local_lake, tmp_path, monkeypatch, capsys):
    lake = local_lake
    (k_ok, d_ok), (k_bad, d_bad), (k_gone, _) = photo(3), photo(4), photo(6)
    spool = Spool(tmp_path / "spool")
    for i, (k, d) in enumerate([(k_ok, d_ok), (k_bad, d_bad)]):
        spool.put_image(k, d)
        spool.append("interactions", rec(f"r{i}", ALICE, k))
    spool.append("interactions", rec("r2", ALICE, k_gone))
    spool.append("interactions", rec("r3", ALICE, None))
    spool.close()
    Shipper(spool, lake).ship_once()
    lake.put_bytes(k_bad, d_bad[:100])  # damaged in the lake
    res = check_images(lake, NOW.date())
    assert (res["records"], res["images"], res["ok"]) == (4, 3, 1)
    assert res["missing"] == [k_gone] and [b["image_key"] for b in res["bad"]] == [k_bad]

    from vloop.cli import main

    monkeypatch.setenv("VLOOP_LAKE_URL", lake.url)
    assert main(["lake", "check", "--images", NOW.date().isoformat(), "--repair"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["repaired"] == [k_bad] and not lake.exists(k_bad) and lake.list("quarantine/images/")
    spool = Spool(tmp_path / "spool")  # the photo comes again: the next good copy fills the key
    spool.put_image(k_bad, d_bad)
    spool.close()
    Shipper(spool, lake).ship_once()
    assert check_images(lake, NOW.date())["ok"] == 2


def test_an_erased_users_record_does_not_take_another_users_photo_with_it(lake, tmp_path):
    """Item 3a: Alice (erased) and Bob send the same stock photo; Alice's record is sealed, Bob's
    still in the open segment when the shipper passes. Fails on the old shipper: it deleted the
    image uploaded in that pass because only an erased user's shipped record named it."""
    key, data = photo(7)
    record_tombstone(lake, ALICE)
    spool = Spool(tmp_path / "spool")
    spool.put_image(key, data)
    spool.append("interactions", rec("alice-1", ALICE, key))
    spool.streams["interactions"].seal()
    spool.append("interactions", rec("bob-1", BOB, key))  # open segment
    shipper = Shipper(spool, lake)
    assert shipper.ship_once() == 0  # Alice's record dropped
    spool.close()
    assert shipper.ship_once() == 1
    assert lake_ids(lake) == ["bob-1"]
    assert lake.exists(key) and lake.get_bytes(key) == data
    # Alice's photo is noted for the erasure, which keeps it: Bob's row names it.
    assert lake.list(f"{ERASED_IMAGES}{ALICE}/")
    shippers_through(lake, NOW + dt.timedelta(hours=1))
    res = erase_user(lake, ALICE, actor="t", now=NOW + dt.timedelta(hours=1), rebuild_reports=False)
    assert res.images_deleted == 0 and lake.exists(key) and not lake.list(f"{ERASED_IMAGES}{ALICE}/")


def test_erasure_keeps_a_photo_whose_other_record_is_still_in_a_spool(lake, tmp_path):
    """Item 3b: Alice's record is in the lake; Bob sent the same photo to another replica, whose
    shipper uploaded the image but has not shipped Bob's record yet. Fails on the old erasure: it
    counted only lake rows and deleted the photo under Bob's record."""
    key, data = photo(8)
    a = Spool(tmp_path / "a")
    a.put_image(key, data)
    a.append("interactions", rec("alice-1", ALICE, key))
    a.close()
    Shipper(a, lake).ship_once()
    b = Spool(tmp_path / "b")
    b.put_image(key, data)
    b.append("interactions", rec("bob-1", BOB, key))  # still open
    Shipper(b, lake).ship_once()
    assert b.pending_images() == []  # the replica's copy is gone: the lake's is the only one

    res = erase_user(lake, ALICE, actor="t", rebuild_reports=False)
    assert res.images_deleted == 0 and res.images_waiting == 1 and lake.exists(key)
    b.close()
    Shipper(b, lake).ship_once()
    assert lake_ids(lake) == ["bob-1"] and lake.get_bytes(key) == data
    # Later (every shipper past the image): the next run sees Bob's row and lets the note go.
    later = NOW + dt.timedelta(hours=1)
    shippers_through(lake, later)
    res = erase_user(lake, ALICE, actor="t", now=later, rebuild_reports=False)
    assert res.images_deleted == 0 and lake.exists(key) and not lake.list(ERASED_IMAGES)


def test_an_image_only_the_erased_user_sent_goes_once_every_spool_is_past_it(local_lake, tmp_path):
    lake = local_lake
    key, data = photo(9)
    spool = Spool(tmp_path / "spool")
    spool.put_image(key, data)
    spool.append("interactions", rec("alice-1", ALICE, key))
    spool.close()
    Shipper(spool, lake).ship_once()
    res = erase_user(lake, ALICE, actor="t", rebuild_reports=False)
    assert res.images_waiting == 1 and lake.exists(key)  # just uploaded: a spool may still name it
    later = NOW + dt.timedelta(hours=1)
    shippers_through(lake, later)
    res = erase_user(lake, ALICE, actor="t", now=later, rebuild_reports=False)
    assert res.images_deleted == 1 and not lake.exists(key) and not lake.list(ERASED_IMAGES)


def test_a_watermark_behind_the_image_holds_its_deletion(local_lake, tmp_path):
    """A replica whose watermark is older than the image (records not shipped yet) holds it."""
    lake = local_lake
    key, data = photo(10)
    spool = Spool(tmp_path / "spool")
    spool.put_image(key, data)
    spool.append("interactions", rec("alice-1", ALICE, key))
    spool.close()
    Shipper(spool, lake).ship_once()
    later = NOW + dt.timedelta(hours=1)
    shippers_through(lake, later)
    lake.put_json(f"{WATERMARKS}slow-replica.json", {"spool": "slow-replica", "shipped_through": NOW.isoformat(),
                                                     "updated_at": later.isoformat()})
    res = erase_user(lake, ALICE, actor="t", now=later, rebuild_reports=False)
    assert res.images_deleted == 0 and res.images_waiting == 1 and lake.exists(key)

