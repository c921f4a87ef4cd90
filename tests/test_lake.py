"""One suite, run once per backend (local directory, and S3 on a real SeaweedFS server on loopback)."""

from __future__ import annotations

import datetime as dt
import io
import threading
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vloop.store.images import ImageError, ImageTooLarge
from vloop.store.lake import MANIFEST, LakeKeyNotFound, check_key, partition_prefix
from vloop.store.schema import INTERACTION

DAY = dt.date(2026, 11, 3)


def interactions(n: int, day: dt.date = DAY, start: int = 0) -> pa.Table:
    ts = dt.datetime.combine(day, dt.time(12), dt.timezone.utc)
    return INTERACTION.to_table({
        "request_id": f"r{start + i}", "ts": ts, "user_key": "u", "question": "colour?",
        "answer": "red", "base_model": "tiny", "arm": "champion", "status": "ok",
        "token_logprobs": [-0.1, -0.2], "confidence": 0.9, "latency_ms": 12.5,
    } for i in range(n))


def png(w=32, h=24, colour=(200, 10, 10), exif: bytes | None = None, fmt="PNG") -> bytes:
    img = Image.new("RGB", (w, h), colour)
    out = io.BytesIO()
    kwargs = {"exif": exif} if exif else {}
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_bytes_roundtrip_list_and_delete(lake):
    lake.put_bytes("a/b/one.bin", b"1")
    lake.put_bytes("a/b/two.bin", b"22")
    lake.put_bytes("a/c.bin", b"333")
    lake.put_bytes("z.bin", b"z")
    assert lake.get_bytes("a/b/two.bin") == b"22"
    assert lake.list("a/") == ["a/b/one.bin", "a/b/two.bin", "a/c.bin"]
    assert lake.list("a/b") == ["a/b/one.bin", "a/b/two.bin"]
    assert lake.list() == ["a/b/one.bin", "a/b/two.bin", "a/c.bin", "z.bin"]
    assert lake.list("nothing/") == []
    lake.put_bytes("a/c.bin", b"replaced")
    assert lake.get_bytes("a/c.bin") == b"replaced"
    assert lake.exists("a/c.bin") and not lake.exists("a/nope.bin")
    lake.delete("a/c.bin")
    assert not lake.exists("a/c.bin")
    with pytest.raises(LakeKeyNotFound, match="a/c.bin"):
        lake.get_bytes("a/c.bin")
    assert lake.delete_prefix("a/") == 2
    assert lake.list() == ["z.bin"]


def test_existing_tells_which_keys_are_objects(lake):
    """In bulk, as validation checks a slice's photos (on S3, HEADs on threads): keys in one folder
    and another, a folder that is not there, top-level keys, and folders named as if they were
    keys."""
    many = [f"img/aa/{i:03d}.png" for i in range(20)]
    for k in many[:15] + ["img/bb/one.png", "top.bin", "img/aa/deeper/x.png"]:
        lake.put_bytes(k, b"x")
    asked = many + ["img/bb/one.png", "img/bb/two.png", "img/cc/none.png", "top.bin", "nothing.bin", "img/aa",
                    "img/aa/deeper"]  # a folder named as a key: no object
    assert lake.existing(asked) == set(many[:15]) | {"img/bb/one.png", "top.bin"}
    assert lake.existing([]) == set()
    assert lake.existing(asked) == {k for k in asked if lake.exists(k)}


def test_get_many_keeps_order_and_gives_none_for_a_missing_key(lake):
    keys = [f"obj/{i:02d}.bin" for i in range(40)]
    for k in keys:
        lake.put_bytes(k, k.encode())
    lake.delete(keys[7])
    got = list(lake.get_many(keys))
    assert [k for k, _ in got] == keys
    assert all(data == k.encode() for k, data in got if k != keys[7]) and dict(got)[keys[7]] is None
    assert list(lake.get_many([])) == []


def test_json_roundtrip(lake):
    lake.put_json("registry/versions.json", {"b": 1, "a": [1, 2]})
    assert lake.get_json("registry/versions.json") == {"a": [1, 2], "b": 1}


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", ".hidden/x", "a/.tmp", "a b/c", "..", "a/"])
def test_unsafe_keys_are_refused(lake, bad):
    with pytest.raises(ValueError, match="lake key"):
        lake.put_bytes(bad, b"x")
    assert lake.list() == []


def test_partition_write_read_replace(lake):
    lake.write_partition("raw/interactions", interactions(5), DAY, hour=3)
    lake.write_partition("raw/interactions", interactions(7, start=100), DAY, hour=4)
    lake.write_partition("raw/interactions", interactions(2, DAY + dt.timedelta(days=1), start=200),
                         DAY + dt.timedelta(days=1), hour=0)
    day = lake.read_partitions("raw/interactions", DAY)
    assert day.num_rows == 12
    both = lake.read_partitions("raw/interactions", DAY, DAY + dt.timedelta(days=1))
    assert both.num_rows == 14
    # Re-writing a partition replaces it: no duplicates, the other hour untouched.
    lake.write_partition("raw/interactions", interactions(5), DAY, hour=3)
    assert lake.read_partitions("raw/interactions", DAY).num_rows == 12
    lake.write_partition("raw/interactions", interactions(1, start=50), DAY, hour=3)
    ids = sorted(lake.read_partitions("raw/interactions", DAY).column("request_id").to_pylist())
    assert ids == sorted(["r50"] + [f"r{i}" for i in range(100, 107)])
    [only] = lake.list(partition_prefix("raw/interactions", DAY, 3))  # the replaced files are gone
    assert only.rsplit("/", 1)[1].startswith("gen-")


def test_rewrite_removes_stale_files_in_the_partition(lake):
    prefix = partition_prefix("raw/feedback", DAY)
    lake.write_parquet(prefix + "segment-a.parquet", interactions(3))
    lake.write_parquet(prefix + "segment-b.parquet", interactions(3, start=3))
    assert lake.read_partitions("raw/feedback", DAY).num_rows == 6
    key = lake.write_partition("raw/feedback", interactions(4, start=10), DAY)
    assert lake.list(prefix) == sorted([key, prefix + MANIFEST])
    assert lake.read_partitions("raw/feedback", DAY).num_rows == 4
    # A shipper re-sending segment-a after a crash (its rows are in the replacement already) adds
    # nothing; a new segment is new rows.
    lake.write_parquet(prefix + "segment-a.parquet", interactions(3))
    lake.write_parquet(prefix + "segment-c.parquet", interactions(2, start=20))
    ids = lake.read_partitions("raw/feedback", DAY).column("request_id").to_pylist()
    assert sorted(ids) == sorted([f"r{i}" for i in (10, 11, 12, 13, 20, 21)])


def test_read_only_requested_columns_and_schema(lake):
    lake.write_partition("raw/interactions", interactions(3), DAY)
    t = lake.read_partitions("raw/interactions", DAY, columns=["request_id", "confidence"])
    assert t.column_names == ["request_id", "confidence"]
    assert t.num_rows == 3
    # An empty range with a schema still has the right columns and types.
    empty = lake.read_partitions("raw/interactions", DAY + dt.timedelta(days=5),
                                 columns=["request_id", "ts"], schema=INTERACTION.arrow)
    assert empty.num_rows == 0
    assert empty.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    with pytest.raises(ValueError, match="not in the schema"):
        lake.read_partitions("raw/interactions", DAY, columns=["nope"], schema=INTERACTION.arrow)
    with pytest.raises(ValueError, match="empty"):
        lake.read_partitions("raw/interactions", DAY, DAY - dt.timedelta(days=1))


def test_readers_never_see_a_half_written_partition(lake):
    """A reader polling while a writer keeps replacing the partition only ever sees whole tables."""
    sizes = [1000, 20000, 5000]
    tables = [interactions(n) for n in sizes]
    lake.write_partition("raw/interactions", tables[0], DAY)
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(lake.read_partitions("raw/interactions", DAY, columns=["request_id"]).num_rows)
            except Exception as e:  # any torn read is a failure
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(12):
        lake.write_partition("raw/interactions", tables[i % 3], DAY)
    stop.set()
    t.join()
    assert errors == []
    assert seen and seen <= set(sizes)


def test_replacing_segments_never_shows_duplicates_or_gaps(lake):
    """The shipper appends one file per segment; a writer replaces the day with all rows so far
    (a compaction, an erasure rewrite). A reader polling meanwhile must see each row exactly once
    and whole blocks only: never the replacement and the segments it replaced side by side, never
    a listed file gone before it was read."""
    day, blocks = DAY, 8
    block = lambda i: interactions(50, start=1000 * i)  # noqa: E731
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(lake.read_partitions("raw/interactions", day, columns=["request_id"])
                            .column("request_id").to_pylist())
            except Exception as e:
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(blocks):
            # A segment lands (as the shipper writes it), then the writer folds the day into one file.
            lake.write_parquet(partition_prefix("raw/interactions", day, 12) + f"seg-{i:04d}.parquet", block(i))
            lake.write_partition("raw/interactions", pa.concat_tables([block(j) for j in range(i + 1)]), day, hour=12)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert len(seen) > 3
    for ids in seen:
        assert len(ids) == len(set(ids)), "a reader saw duplicate rows"
        got = {int(r[1:]) // 1000 for r in ids}
        assert got == set(range(len(ids) // 50)), f"a reader saw blocks {sorted(got)}: rows missing"
    final = lake.read_partitions("raw/interactions", day, columns=["request_id"]).column("request_id")
    assert sorted(final.to_pylist()) == sorted(f"r{1000 * i + k}" for i in range(blocks) for k in range(50))


def test_conditional_create_has_exactly_one_winner(lake):
    """put_bytes_if_absent is the registry's compare-and-set: of writers racing to create one key,
    exactly one wins and its bytes stay (on S3: If-None-Match, which SeaweedFS honours)."""
    for round_ in range(5):
        key = f"registry/serving/{round_:010d}.json"
        barrier, wins = threading.Barrier(8), []

        def create(i):
            barrier.wait()
            if lake.put_bytes_if_absent(key, f"writer {i}".encode()):
                wins.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(wins) == 1, wins
        assert lake.get_bytes(key) == f"writer {wins[0]}".encode()
    assert not lake.put_bytes_if_absent(key, b"someone else")
    assert lake.get_bytes(key) == f"writer {wins[0]}".encode()


def test_failed_write_leaves_old_content_and_no_debris(lake, monkeypatch):
    lake.write_partition("raw/interactions", interactions(3), DAY)
    before = lake.list()

    def broken_write(table, where, *a, **kw):
        (open(where, "wb") if isinstance(where, str) else where).write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        lake.write_partition("raw/interactions", interactions(10), DAY)
    monkeypatch.undo()
    assert lake.list() == before
    assert lake.read_partitions("raw/interactions", DAY).num_rows == 3
    if hasattr(lake, "root"):  # no hidden temporary file left on disk either
        assert [p.name for p in lake.root.rglob(".*")] == []


def test_put_image_is_content_addressed_and_strips_exif(lake):
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS info
    with_exif = png(fmt="JPEG", exif=exif.tobytes())
    assert b"SecretCam" in with_exif
    stored = lake.put_image(with_exif)
    assert stored.created and stored.key == f"raw/images/{stored.sha256[:2]}/{stored.sha256}.jpg"
    assert (stored.width, stored.height) == (32, 24)
    data = lake.get_bytes(stored.key)
    assert b"SecretCam" not in data and b"Exif" not in data
    assert Image.open(io.BytesIO(data)).getexif() == {}
    # The same picture without the metadata gets the same address, and is not written twice.
    again = lake.put_image(png(fmt="JPEG"))
    assert again.sha256 == stored.sha256 and not again.created
    assert lake.list("raw/images/") == [stored.key]


def test_put_image_applies_orientation_before_dropping_exif(lake):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    stored = lake.put_image(png(40, 10, fmt="JPEG", exif=exif.tobytes()))
    assert (stored.width, stored.height) == (10, 40)


@pytest.mark.parametrize("data, error, message", [
    (b"", ImageError, "empty"),
    (b"this is not an image at all", ImageError, "not a readable image"),
    (png()[:60], ImageError, "corrupt or truncated"),
    (png(1500, 800), ImageTooLarge, "pixels, over the limit"),
    (np.random.default_rng(0).bytes(3 * 2**20), ImageTooLarge, "bytes, over the limit"),
])
def test_bad_images_get_clear_errors_and_write_nothing(lake, data, error, message):
    with pytest.raises(error, match=message):
        lake.put_image(data)
    assert lake.list() == []


def test_browser_url_fetches_the_object(lake):
    stored = lake.put_image(png())
    url = lake.browser_url(stored.key)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == lake.get_bytes(stored.key)


def test_check_key_and_partition_prefix():
    assert check_key("raw/images/ab/ab12.png") == "raw/images/ab/ab12.png"
    assert check_key("curated/dt=2026-11-03/slice=001/a-b_c@d+e.parquet").endswith("e.parquet")
    assert check_key("curated/", prefix=True) == "curated/" and check_key("", prefix=True) == ""
    # A final newline slipped through a per-segment "^...$" match before; the one-match path must refuse it too.
    for bad in ("", "/abs", "a/../b", "a/.hidden", "a//b", "..", "a/b/", ".x", "a/b..c", "a/b\n", "a\nb", "ü"):
        with pytest.raises(ValueError, match="lake key"):
            check_key(bad)
    assert partition_prefix("raw/interactions", "2026-11-03", 7) == "raw/interactions/dt=2026-11-03/hour=07/"
    with pytest.raises(ValueError, match="hour"):
        partition_prefix("raw/interactions", DAY, 24)
    with pytest.raises(ValueError, match="not a date"):
        partition_prefix("raw/interactions", "yesterday")


def test_write_hourly_splits_by_hour_and_replaces_the_day(lake):
    base = dt.datetime.combine(DAY, dt.time(0), dt.timezone.utc)
    rows = [{"request_id": f"r{i}", "ts": base + dt.timedelta(minutes=37 * i), "user_key": "u",
             "question": "q", "answer": "a", "base_model": "m", "arm": "champion", "status": "ok"}
            for i in range(30)]  # 30 * 37 min spans hours 0..18
    keys = lake.write_hourly("raw/interactions", INTERACTION.to_table(rows), DAY)
    assert len(keys) == len({(37 * i) // 60 for i in range(30)})
    assert all(k.startswith(f"raw/interactions/dt={DAY}/hour=") for k in keys)
    back = lake.read_partitions("raw/interactions", DAY, schema=INTERACTION.arrow)
    assert sorted(back.column("request_id").to_pylist()) == sorted(r["request_id"] for r in rows)
    for k in keys:  # each file holds only its hour
        hours = {t.hour for t in lake.read_parquet(k, ["ts"]).column("ts").to_pylist()}
        assert hours == {int(k.split("hour=")[1][:2])}
    # Re-running the day with fewer rows replaces it: no stale hours remain.
    lake.write_hourly("raw/interactions", INTERACTION.to_table(rows[:3]), DAY)
    assert lake.read_partitions("raw/interactions", DAY).num_rows == 3
    files = [k for k in lake.list(partition_prefix("raw/interactions", DAY)) if k.endswith(".parquet")]
    assert len(files) == len({(37 * i) // 60 for i in range(3)})


def test_write_hourly_refuses_rows_from_another_day(lake):
    with pytest.raises(ValueError, match="cannot go into the partition"):
        lake.write_hourly("raw/interactions", interactions(3, DAY + dt.timedelta(days=1)), DAY)
    assert lake.list() == []


def test_parquet_files_use_the_record_schema_encodings(lake):
    key = lake.write_partition("raw/interactions", interactions(50), DAY)
    meta = pq.ParquetFile(pa.BufferReader(lake.get_bytes(key))).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert any("DICTIONARY" in e for e in encodings["arm"])
    assert not any("DICTIONARY" in e for e in encodings["request_id"])
