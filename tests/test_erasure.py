"""Erasure, opt-outs, retention and the audit log (vloop.erasure, vloop.privacy) on both lake
backends (a local directory and the session's S3 server) and with the real Label Studio server.

The erased user has records on two days (shipped through a real spool), tasks and annotations in
Label Studio, labels in a dataset snapshot and an adapter trained on it. After the erasure every
object in the lake is scanned for anything of theirs; every object that held nothing of theirs
must be byte-for-byte what it was."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import threading

import pyarrow.parquet as pq
import pytest

from tests.test_feedback_daily import run_steps
from tests.test_labelstudio import annotate
from vloop import daily
from vloop.dataset import DatasetConfig, build_dataset
from vloop.demo import simulated_day
from vloop.erasure import (RetentionPolicy, apply_retention, erase_user, pending_erasures, request_erasure,
                           work_erasure_queue)
from vloop.labelstudio import LabelStudio
from vloop.privacy import audit_log, read_opt_outs, read_tombstones, record_opt_out, remove_opt_out
from vloop.registry import AdapterVersion, Registry
from vloop.schema import FEEDBACK, INTERACTION
from vloop.spool import Shipper, Spool
from vloop.synth import World, golden_samples

D1, D2 = dt.date(2026, 10, 5), dt.date(2026, 10, 6)
SEED = 77


def strings_of(lake, key: str) -> str:
    """Everything readable in an object, as text (Parquet decoded: its pages are compressed)."""
    data = lake.get_bytes(key)
    if key.endswith(".parquet"):
        return json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str)
    return data.decode("utf-8", errors="replace")


def ship_victim_records(lake, spool_dir, user: str) -> tuple[list[str], str, dict]:
    """Two interactions of ``user`` on D2 with a photo nobody else sent, and an edit with corrected
    text, through a real spool and shipper. Returns (request ids, image key, a copy of the sealed
    segments for a later re-ship)."""
    spool = Spool(spool_dir)
    img = World(SEED + 1).sample(0)
    stored = lake.put_image(img.image_bytes())  # only to learn the key; removed again below
    lake.delete(stored.key)
    spool.put_image(stored.key, img.image_bytes())
    ids = []
    for i in range(2):
        rid = f"victim-{i}"
        ids.append(rid)
        spool.append("interactions", INTERACTION.to_row({
            "request_id": rid, "ts": dt.datetime.combine(D2, dt.time(15, i), dt.timezone.utc), "user_key": user,
            "question": "what colour are these shoes?", "answer": "red", "confidence": 0.4, "latency_ms": 90.0,
            "image_key": stored.key, "image_sha256": stored.sha256, "base_model": "sim-base", "arm": "champion",
            "status": "ok", "token_logprobs": [-0.9], "redactions": 0, "category": "shoes"}))
    spool.append("feedback", FEEDBACK.to_row({"event_id": "victim-fb", "request_id": ids[0], "type": "edit",
                                              "ts": dt.datetime.combine(D2, dt.time(15, 5), dt.timezone.utc),
                                              "edited_text": "they are pink, my sister's"}))
    spool.close()
    backup = {p: p.read_bytes() for s in spool.streams.values() for p in s.sealed()}
    backup.update({p: p.read_bytes() for _, p in spool.pending_images()})
    assert Shipper(spool, lake).ship_once() == 3
    return ids, stored.key, backup


def shippers_through(lake, t: dt.datetime) -> None:
    """As if every shipper had shipped all its records up to ``t`` (time passing, in a test)."""
    for k in lake.list("shippers/"):
        lake.put_json(k, {**lake.get_json(k), "shipped_through": t.isoformat(), "updated_at": t.isoformat()})


@pytest.fixture
def ls_client(label_studio):
    url, token, _ = label_studio
    with LabelStudio(url, token) as ls:
        yield ls


def test_erase_a_user_everywhere(lake, ls_client, tmp_path, monkeypatch):
    from tests.conftest import S3_READ_ONLY_KEYS

    ls = ls_client
    monkeypatch.setenv("VLOOP_LABEL_STUDIO_S3_ACCESS_KEY", S3_READ_ONLY_KEYS[0])  # Label Studio reads only
    monkeypatch.setenv("VLOOP_LABEL_STUDIO_S3_SECRET_KEY", S3_READ_ONLY_KEYS[1])
    title = f"erasure test {lake.__class__.__name__}"
    for day in (D1, D2):
        simulated_day(lake, day, 300, seed=SEED)
    inter1 = lake.read_partitions("raw/interactions", D1, D1).to_pandas()
    victim = inter1["user_key"].value_counts().index[0]  # the busiest user of the first day
    victim_ids, victim_image, backup = ship_victim_records(lake, tmp_path / "spool", victim)
    for day in (D1, D2):
        run_steps(lake, day)
        daily.push_to_label_studio(lake, day, ls, project_title=title)
    project = ls.ensure_project(title)
    tasks = ls.export(project, all_tasks=True)
    raw = lake.read_partitions("raw/interactions", D1, D2).to_pandas()
    victim_requests = set(raw.loc[raw["user_key"] == victim, "request_id"])
    assert set(victim_ids) <= victim_requests and len(victim_requests) > 10
    theirs = [t for t in tasks if t["data"]["request_id"] in victim_requests]
    others = [t for t in tasks if t["data"]["request_id"] not in victim_requests]
    assert theirs and others, "the selection must have picked requests of both the victim and others"
    for t in theirs + others[:10]:  # annotators corrected them
        annotate(ls, t["id"], "wrong", "a corrected answer")
    daily.pull_annotations(lake, D2, ls, project_title=title)
    manifest = build_dataset(lake, DatasetConfig(replay_ratio=0.5, heldout_share=0), today=D2,
                             golden_samples=golden_samples(10))
    train = daily.get_frame(lake, f"datasets/{manifest['id']}/train.parquet")
    assert set(train["request_id"]) & victim_requests, "the victim's labels are in the dataset"
    reg = Registry(lake)
    ref = reg.register(AdapterVersion(name="shoes", version="v1", path="adapters/shoes/v1/", base_model="b",
                                      dataset_id=manifest["id"]), actor="test").ref
    for day in (D1, D2):
        daily.report(lake, day)

    # Label Studio unreachable (a real client, a closed port): the erasure fails loudly before it
    # removes anything from the lake, and keeps what it needs for the retry.
    from vloop.labelstudio import LabelStudioError

    with pytest.raises(LabelStudioError):
        erase_user(lake, victim, actor="support@shop", label_studio=LabelStudio("http://127.0.0.1:9", "t", retries=0))
    assert victim in set(lake.read_partitions("raw/interactions", D1, D1).to_pandas()["user_key"])
    lake.delete(f"privacy/tombstones/{victim}.json")  # compare the retry's work against a clean slate
    # The victim's photo was shipped just now: it may go only once every shipper is past it (a
    # record of someone else's naming it could still be in a spool). Time passes:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    shippers_through(lake, later)
    before = {k: lake.get_bytes(k) for k in lake.list("")}
    res = erase_user(lake, victim, actor="support@shop", label_studio=ls, now=later)

    # Nothing of theirs anywhere: every object scanned.
    after = lake.list("")
    assert victim_image not in after and res.images_deleted >= 1
    for k in after:
        text = strings_of(lake, k)
        if k.startswith("privacy/") or k.startswith("registry/"):
            continue  # the tombstone, the audit log and the lineage event name the key, by design
        assert victim not in text, k
        assert not any(rid in text for rid in victim_requests), k
        assert "my sister" not in text, k
    # Everyone else's objects are untouched, byte for byte.
    changed, deleted = set(res.objects_rewritten), set(before) - set(after)
    assert victim_image in deleted and len(deleted) == res.images_deleted
    assert all(k.startswith("raw/images/") for k in deleted)  # images only they had sent
    for k, data in before.items():
        if k in changed | deleted or k.startswith(("reports/", "privacy/", "registry/")):
            continue
        assert lake.get_bytes(k) == data, f"{k} changed but held nothing of the user's"
    # Rewritten objects lost exactly the user's rows.
    for k in changed:
        if k.endswith(".parquet"):
            old = pq.read_table(io.BytesIO(before[k])).to_pandas()
            new = pq.read_table(io.BytesIO(lake.get_bytes(k))).to_pandas()
            if "user_key" in old or "request_id" in old:
                mine = old["user_key"].eq(victim) if "user_key" in old else False
                mine = mine | (old["request_id"].isin(victim_requests) if "request_id" in old else False)
            else:  # rows about an image (its quality), of images only they had sent
                mine = old["image_key"].isin(deleted)
            assert len(new) == len(old) - mine.sum() and len(new) < len(old), k
    assert res.rows_removed["raw/interactions"] == len(victim_requests)
    # Label Studio: their tasks (with annotations) are gone, everyone else's stay.
    left = ls.export(project, all_tasks=True)
    assert {t["id"] for t in left} == {t["id"] for t in others}
    assert res.label_studio_tasks_deleted == len(theirs)
    # Lineage, tombstone and audit.
    assert res.adapters_to_retrain == [ref]
    assert any(e.get("kind") == "needs_retraining" and e["ref"] == ref for e in reg.history())
    assert victim in read_tombstones(lake)
    erase_audits = [a for a in audit_log(lake) if a["action"] == "erase"]
    assert erase_audits[-1]["user_key"] == victim and erase_audits[-1]["actor"] == "support@shop"
    assert erase_audits[-1]["rows_removed"] == res.total_rows > 0

    # A gateway re-ships an old segment (say, restored from a backup): nothing comes back.
    for path, data in backup.items():
        path.write_bytes(data)
    Shipper(Spool(tmp_path / "spool"), lake).ship_once()
    again = lake.read_partitions("raw/interactions", D2, D2).to_pandas()
    assert victim not in set(again["user_key"])
    # The re-shipped photo is not deleted by the shipper (another user's record for the same photo
    # could be in an open segment) but noted; the next erasure run, once shippers are past it, does.
    assert lake.list(f"privacy/erased_images/{victim}/")
    shippers_through(lake, later + dt.timedelta(hours=1))
    swept = erase_user(lake, victim, actor="support@shop", label_studio=ls, now=later + dt.timedelta(hours=1))
    assert swept.images_deleted == 1 and victim_image not in lake.list("raw/images/")
    fb = lake.read_partitions("raw/feedback", D2, D2).to_pandas()
    assert "victim-fb" not in set(fb["event_id"])
    # Only the feedback segment, on a replica that never saw the interaction: dropped as well.
    other = tmp_path / "other-replica"
    for path, data in backup.items():
        if path.parent.name == "feedback":
            (other / "feedback").mkdir(parents=True, exist_ok=True)
            (other / "feedback" / path.name).write_bytes(data)
    Shipper(Spool(other), lake).ship_once()
    assert "victim-fb" not in set(lake.read_partitions("raw/feedback", D2, D2).to_pandas()["event_id"])
    # Selection and training leave them out on a re-run; a second erasure finds nothing.
    run_steps(lake, D2)
    assert victim not in set(daily.get_frame(lake, daily.key(daily.LABELING, D2, "selected.parquet"))["user_key"])
    second = erase_user(lake, victim, actor="support@shop", label_studio=ls)
    assert second.total_rows == 0 and second.images_deleted == 0 and second.already_tombstoned


def test_erasure_queue_and_cli(local_lake, monkeypatch, capsys):
    """`vloop privacy erase --user` hashes the raw id with the secret (the raw id is never
    stored); --queue leaves it to the privacy_maintenance DAG's queue worker."""
    from vloop.cli import main
    from vloop.privacy import user_key

    lake = local_lake
    monkeypatch.setenv("VLOOP_LAKE_URL", lake.url)
    monkeypatch.setenv("VLOOP_USER_KEY_SECRET", "s3cret")
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    simulated_day(lake, D1, 100, seed=SEED)
    inter = lake.read_partitions("raw/interactions", D1, D1).to_pandas()
    # Give two simulated users the keys the app's raw ids hash to.
    alice, bob = user_key("alice@shop.example", "s3cret"), user_key("bob@shop.example", "s3cret")
    users = inter["user_key"].unique()
    inter["user_key"] = inter["user_key"].replace({users[0]: alice, users[1]: bob})
    lake.delete_prefix("raw/interactions/")
    lake.write_hourly("raw/interactions", __import__("pyarrow").Table.from_pandas(inter, schema=INTERACTION.arrow,
                                                                                   preserve_index=False), D1)

    assert main(["privacy", "erase", "--user", "alice@shop.example", "--actor", "dpo"]) == 2  # Label Studio?
    assert "LABEL_STUDIO_URL" in capsys.readouterr().err
    assert main(["privacy", "erase", "--user", "", "--no-label-studio"]) == 2  # not the anonymous key
    capsys.readouterr()
    assert main(["privacy", "erase", "--user", "alice@shop.example", "--actor", "dpo", "--no-label-studio"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["user_key"] == alice and out["rows_removed"]["raw/interactions"] == (inter["user_key"] == alice).sum()
    assert main(["privacy", "erase", "--user", "bob@shop.example", "--queue"]) == 0
    assert pending_erasures(lake) == [bob]
    done = work_erasure_queue(lake, actor="privacy_maintenance test")
    assert [d["user_key"] for d in done] == [bob] and pending_erasures(lake) == []
    left = set(lake.read_partitions("raw/interactions", D1, D1).to_pandas()["user_key"])
    assert alice not in left and bob not in left and len(left) == len(users) - 2

    assert main(["privacy", "audit"]) == 0
    log = capsys.readouterr().out
    assert "erase" in log and "erasure requested" in log and "alice@shop.example" not in log
    assert all("alice@shop.example" not in strings_of(lake, k) for k in lake.list(""))

    monkeypatch.delenv("VLOOP_USER_KEY_SECRET")
    assert main(["privacy", "erase", "--user", "carol", "--no-label-studio"]) == 2  # no secret: a clear error


def test_opt_outs_are_concurrency_safe(lake, monkeypatch, capsys):
    """Many writers adding and removing at once lose nothing (one object per user, no
    read-modify-write), on both backends; the CLI adds, lists and removes."""
    keys = [f"user{i:03d}" for i in range(40)]
    errors = []

    def add(k):
        try:
            record_opt_out(lake, k, actor="gateway")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and read_opt_outs(lake) == set(keys)
    removers = [threading.Thread(target=remove_opt_out, args=(lake, k), kwargs={"actor": "app"}) for k in keys[:20]]
    adders = [threading.Thread(target=add, args=(f"late{i}",)) for i in range(20)]
    for t in removers + adders:
        t.start()
    for t in removers + adders:
        t.join()
    assert read_opt_outs(lake) == set(keys[20:]) | {f"late{i}" for i in range(20)}
    with pytest.raises(ValueError, match="not a user key"):
        record_opt_out(lake, "../escape")

    from vloop.cli import main

    monkeypatch.setenv("VLOOP_LAKE_URL", lake.url if not hasattr(lake, "bucket") else "file:///nonexistent")
    if hasattr(lake, "bucket"):
        return  # the CLI reads VLOOP_LAKE_URL; its S3 settings are exercised by the lake tests
    from vloop.privacy import user_key

    cli_user = user_key("cli-user", "s3cret")  # --user-key takes only a whole key as the gateway makes it
    assert main(["privacy", "opt-out", "add", "--user-key", cli_user]) == 0
    assert main(["privacy", "opt-out", "list"]) == 0
    assert cli_user in capsys.readouterr().out.split()
    assert main(["privacy", "opt-out", "remove", "--user-key", cli_user]) == 0
    assert cli_user not in read_opt_outs(lake)


def test_retention_deletes_exactly_what_is_older(lake):
    """Partitions older than each setting go; younger ones, referenced images and the dataset a
    serving adapter was trained on stay."""
    days = [dt.date(2026, 9, 1) + dt.timedelta(days=i) for i in range(0, 40, 3)]
    for d in days:
        simulated_day(lake, d, 30, seed=SEED, pool=5)
        daily.put_frame(lake, daily.key(daily.CURATED, d, "marker.parquet"), __import__("pandas").DataFrame({"x": [1]}))
    orphan = lake.put_image(World(SEED + 2).sample(3).image_bytes()).key  # referenced by nothing
    today = dt.date(2026, 10, 11)
    policy = RetentionPolicy(raw_days=20, curated_days=30, labeled_days=365, datasets_days=365)
    before = set(lake.list(""))
    summary = apply_retention(lake, policy, today=today, actor="test")
    after = set(lake.list(""))
    for d in days:
        raw_kept = any(k.startswith(f"raw/interactions/dt={d}/") for k in after)
        cur_kept = lake.exists(daily.key(daily.CURATED, d, "marker.parquet"))
        assert raw_kept == ((today - d).days <= 20), d
        assert cur_kept == ((today - d).days <= 30), d
    # Images: the orphan was written just now (younger than 20 days), so it stays; images still
    # referenced stay whatever their age.
    assert orphan in after
    gone = before - after
    assert gone and all(k.startswith(("raw/interactions/", "raw/feedback/", "curated/")) for k in gone)
    assert summary["objects_deleted"]["raw/interactions"] > 0 and audit_log(lake)[-1]["action"] == "retention"


def test_retention_of_old_unreferenced_images(local_lake):
    """An image nothing references goes once it is older than raw_days (by its write time)."""
    import os

    lake = local_lake
    img = lake.put_image(World(SEED + 3).sample(0).image_bytes()).key
    young = lake.put_image(World(SEED + 3).sample(1).image_bytes()).key
    old = (dt.datetime.now() - dt.timedelta(days=40)).timestamp()
    os.utime(lake.root / img, (old, old))
    apply_retention(lake, RetentionPolicy(raw_days=30), today=dt.date.today(), actor="test")
    assert not lake.exists(img) and lake.exists(young)


def test_queue_request_is_idempotent(local_lake):
    request_erasure(local_lake, "u1", actor="app")
    request_erasure(local_lake, "u1", actor="app")
    assert pending_erasures(local_lake) == ["u1"]
    shutil.rmtree(local_lake.root / "privacy" / "erasure_requests")
    assert pending_erasures(local_lake) == []


def test_privacy_maintenance_dag(airflow_db, local_lake, monkeypatch):
    """The DAG (dag.test()) erases the queued user, then applies retention; both are audited.
    No Label Studio connection here: the lake is still erased."""
    from tests.conftest import load_dag

    lake = local_lake
    monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({"conn_type": "generic", "extra": {"lake_url": lake.url}}))
    monkeypatch.delenv("AIRFLOW_CONN_VLOOP_LABEL_STUDIO", raising=False)
    old_day, today = dt.date(2026, 6, 1), dt.date.today()
    simulated_day(lake, old_day, 40, seed=SEED, pool=5)
    simulated_day(lake, today, 40, seed=SEED, pool=5)
    victim = lake.read_partitions("raw/interactions", today, today).to_pandas()["user_key"].iloc[0]
    request_erasure(lake, victim, actor="app backend")

    dr = load_dag("privacy_maintenance").test()
    assert {ti.task_id: ti.state for ti in dr.get_task_instances()} == {"erase": "success", "retention": "success"}
    assert pending_erasures(lake) == [] and victim in read_tombstones(lake)
    left = lake.read_partitions("raw/interactions", today, today).to_pandas()
    assert len(left) and victim not in set(left["user_key"])
    assert not lake.list(f"raw/interactions/dt={old_day}/")  # older than VLOOP_RETAIN_RAW_DAYS (90)
    actions = [a["action"] for a in audit_log(lake)]
    assert actions[-3:] == ["erasure requested", "erase", "retention"]


def test_erasing_a_user_with_nothing_stored(local_lake):
    """An erasure request for someone who never used the assistant (or on an empty first day)
    succeeds, removes nothing and still leaves a tombstone and an audit record."""
    res = erase_user(local_lake, "never-seen", actor="support")
    assert res.total_rows == 0 and res.images_deleted == 0 and "never-seen" in read_tombstones(local_lake)
    assert audit_log(local_lake)[-1]["action"] == "erase"


def lake_bytes(lake) -> dict[str, bytes]:
    return {k: lake.get_bytes(k) for k in lake.list("")}


def test_cli_refuses_a_user_key_that_is_not_whole(local_lake, monkeypatch, capsys):
    """`--user-key` takes only what user_key (HMAC-SHA256, 64 lowercase hex) produces. A key cut
    short (the log prints 12 characters), one character off, in capitals or a test token is
    refused with a clear message, and nothing in the lake changes — no tombstone, no audit record,
    no rewritten object. On the previous main any 1-128 character token was accepted: the
    truncated key was erased (exit 0), tombstoned and matched as a substring."""
    from vloop.cli import main
    from vloop.privacy import user_key

    lake = local_lake
    monkeypatch.setenv("VLOOP_LAKE_URL", lake.url)
    monkeypatch.setenv("VLOOP_USER_KEY_SECRET", "s3cret")
    simulated_day(lake, D1, 60, seed=SEED)
    inter = lake.read_partitions("raw/interactions", D1, D1).to_pandas()
    alice = user_key("alice@shop.example", "s3cret")
    inter["user_key"] = inter["user_key"].replace({inter["user_key"].iloc[0]: alice})
    lake.delete_prefix("raw/interactions/")
    lake.write_hourly("raw/interactions", __import__("pyarrow").Table.from_pandas(inter, schema=INTERACTION.arrow,
                                                                                   preserve_index=False), D1)
    lake.put_json("labeling/dt=2026-10-05/pushed.json", {"request_ids": sorted(inter["request_id"])})
    before = lake_bytes(lake)
    for bad in (alice[:12], alice[:-1], alice + "0", alice.upper(), inter["user_key"].iloc[-1], " "):
        assert main(["privacy", "erase", "--user-key", bad, "--no-label-studio"]) == 2, bad
        err = capsys.readouterr().err
        assert "not a whole user key" in err and "64 lowercase hex" in err, err
    assert main(["privacy", "erase", "--user-key", alice[:12], "--queue"]) == 2
    assert main(["privacy", "opt-out", "add", "--user-key", alice[:12]]) == 2
    assert "not a whole user key" in capsys.readouterr().err
    assert lake_bytes(lake) == before  # nothing changed at all
    # The whole key is accepted and erases exactly that user.
    assert main(["privacy", "erase", "--user-key", alice, "--no-label-studio"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows_removed"]["raw/interactions"] == (inter["user_key"] == alice).sum() > 0


def test_erasure_matches_whole_values_never_substrings(local_lake):
    """Erasing user A leaves every JSON object that names user B as it was, where B's key and
    request ids have A's as a prefix (cust-7 / cust-71, r-7 / r-71 / r-7b); A's own entries go. A
    mistyped short key ("00") erases nothing of anyone: day manifests (file names with hour=00),
    the shippers' watermarks and config/ stay byte for byte. On the previous main the JSON pass
    matched substrings: it stripped B's entries with A's, and "00" struck the hour=00 files (and any
    other name with "00" in it) from the day manifests, hiding everyone's rows."""
    import pyarrow as pa

    lake = local_lake
    simulated_day(lake, D1, 60, seed=SEED)
    lake.put_json("shippers/gw-00a1b2c3.json", {"spool": "gw-00a1b2c3", "shipped_through": "2026-10-05T00:00:00+00:00"})
    lake.put_json("config/decoding.json", {"version": 100, "banned": ["可能", "maybe"], "author": "ops-007"})
    lake.write_parquet("curated/dt=2026-10-05/people.parquet", pa.table({
        "user_key": ["cust-7", "cust-71", "cust-71"], "request_id": ["r-7", "r-71", "r-7b"],
        "question": ["a", "b", "c"]}))
    lake.put_json("labeling/dt=2026-10-05/pushed.json", {"day": "2026-10-05", "request_ids": ["r-7", "r-71", "r-7b"]})
    line_b = '{"user_key": "cust-71", "request_id": "r-7b", "question": "hi'  # torn lines kept raw
    line_a = '{"user_key": "cust-7", "request_id": "r-7", "quest'
    lake.put_json("quarantine/spool/interactions/seg-1.json", [
        {"record": {"user_key": "cust-7", "request_id": "r-7"}, "reason": "bad ts"},
        {"record": {"user_key": "cust-71", "request_id": "r-71"}, "reason": "bad ts"},
        {"line": 3, "text": line_b, "reason": "not JSON"}, {"line": 4, "text": line_a, "reason": "not JSON"}])
    lake.put_json("quarantine/spool/interactions/seg-2.json", [
        {"record": {"user_key": "cust-71", "request_id": "r-71"}, "reason": "bad ts"}])
    lake.put_json("adapters/shoes/v1/metrics.json", {"heldout": {"example_id": [
        "label_corrected-r-7", "label_corrected-r-71", "replay-r-7b", "golden-7"]}})
    before = lake_bytes(lake)
    assert any("hour=00/" in f for k in before if k.endswith("_manifest.json")
               for f in json.loads(before[k])["files"])  # a short key "00" would hit these file names

    res = erase_user(lake, "cust-7", actor="support", rebuild_reports=False)
    assert lake.get_json("labeling/dt=2026-10-05/pushed.json")["request_ids"] == ["r-71", "r-7b"]
    seg = lake.get_json("quarantine/spool/interactions/seg-1.json")
    assert [e.get("record", {}).get("request_id") or e["text"] for e in seg] == ["r-71", line_b]
    assert lake.get_json("adapters/shoes/v1/metrics.json")["heldout"]["example_id"] == [
        "label_corrected-r-71", "replay-r-7b", "golden-7"]
    assert lake.read_parquet("curated/dt=2026-10-05/people.parquet")["request_id"].to_pylist() == ["r-71", "r-7b"]
    assert set(res.objects_rewritten) == {"curated/dt=2026-10-05/people.parquet", "labeling/dt=2026-10-05/pushed.json",
                                          "quarantine/spool/interactions/seg-1.json", "adapters/shoes/v1/metrics.json"}
    after = lake_bytes(lake)
    for k, data in before.items():  # everything else, B's own objects included, byte for byte
        if k not in res.objects_rewritten:
            assert after[k] == data, k

    for typo in ("00", "cust"):  # a mistyped short key (a prefix of A's and B's): nothing of anyone's goes
        snapshot = {k: v for k, v in lake_bytes(lake).items() if not k.startswith("privacy/")}
        res = erase_user(lake, typo, actor="support", rebuild_reports=False)
        assert res.total_rows == 0 and res.objects_rewritten == [], typo
        assert {k: v for k, v in lake_bytes(lake).items() if not k.startswith("privacy/")} == snapshot, typo
