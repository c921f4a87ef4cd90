"""Erasure, opt-outs, retention and the audit log (vloop.privacy.erasure, vloop.privacy) on both lake
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
from vloop.curate import daily
from vloop.learn.dataset import DatasetConfig, build_dataset
from vloop.sim.traffic import simulated_day
from vloop.privacy.erasure import (RetentionPolicy, apply_retention, erase_user, pending_erasures, request_erasure,
                                   work_erasure_queue)
from vloop.curate.labelstudio import LabelStudio
from vloop.privacy import audit_log, read_opt_outs, read_tombstones, record_opt_out, remove_opt_out
from vloop.learn.registry import AdapterVersion, Registry
from vloop.store.schema import FEEDBACK, INTERACTION
from vloop.capture.spool import Shipper, Spool
from vloop.sim.synth import World, golden_samples

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
    from vloop.curate.labelstudio import LabelStudioError

    with pytest.raises(LabelStudioError):
        erase_user(lake, victim, actor="support@shop", label_studio=LabelStudio("http://127.0.0.1:9", "t", retries=0))
    assert victim in set(lake.read_partitions("raw/interactions", D1, D1).to_pandas()["user_key"])
    lake.delete(f"privacy/tombstones/{victim}.json")  # compare the retry's work against a clean slate
    # The victim's photo was shipped just now: it may go only once every shipper is past it (a
    # record of someone else's naming it could still be in a spool). Time passes:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    shippers_through(lake, later)
    before = {k: lake.get_bytes(k) for k in lake.list("")}
    # The erasure deletes their tasks in every project of the server: the session's Label Studio
    # may hold another test file's project with the same simulated users.
    theirs_everywhere = [t for p in ls.projects() for t in ls.export(p["id"], all_tasks=True)
                         if t["data"].get("user_key") == victim or t["data"].get("request_id") in victim_requests]
    res = erase_user(lake, victim, actor="support@shop", label_studio=ls, now=later)

    # Nothing of theirs anywhere: every object scanned.
    after = lake.list("")
    assert victim_image not in after and res.images_deleted >= 1
    for k in after:
        text = strings_of(lake, k)
        if k.startswith("privacy/") or k.startswith("registry/events/"):
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
        if k.endswith(".parquet") and not k.endswith("/phrasings.parquet"):  # phrasings: rebuilt (own test)
            old = pq.read_table(io.BytesIO(before[k])).to_pandas()
            new = pq.read_table(io.BytesIO(lake.get_bytes(k))).to_pandas()
            if "user_key" in old or "request_id" in old:
                mine = old["user_key"].eq(victim) if "user_key" in old else False
                mine = mine | (old["request_id"].isin(victim_requests) if "request_id" in old else False)
            else:  # rows about an image (its quality), of images only they had sent
                mine = old["image_key"].isin(deleted)
            assert len(new) == len(old) - mine.sum() and len(new) < len(old), k
    assert res.rows_removed["raw/interactions"] == len(victim_requests)
    # The slices' shares of the report were made again from what is left: they count no one erased.
    parts = [k for k in changed if k.endswith("/" + daily.REPORT_PART)]
    assert parts
    for k in parts:
        folder = k[:-len(daily.REPORT_PART)]
        assert lake.get_json(k)["interactions"] == len(daily.get_frame(lake, folder + "interactions.parquet"))
        assert json.loads(before[k])["interactions"] > lake.get_json(k)["interactions"]
    # Label Studio: their tasks (with annotations) are gone, everyone else's stay.
    left = ls.export(project, all_tasks=True)
    assert {t["id"] for t in left} == {t["id"] for t in others}
    assert res.label_studio_tasks_deleted == len(theirs_everywhere) >= len(theirs)
    assert not [t for p in ls.projects() for t in ls.export(p["id"], all_tasks=True)
                if t["data"].get("user_key") == victim or t["data"].get("request_id") in victim_requests]
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


# -- issue 21, item 4: registry metrics, phrasings, every kind of object; item 10: one pass ---------
def demo_like_lake(lake, tmp_path, days=(D1, D2), rows=150):
    """A lake as a demo day leaves it (cheaply): simulated traffic, a replica's spool shipped, the
    daily steps and reports, labels, a dataset snapshot, an adapter with its evaluation registered."""
    import pandas as pd

    from vloop.curate.labelstudio import LABELED_COLUMNS

    for d in days:
        simulated_day(lake, d, rows, seed=SEED)
    inter = lake.read_partitions("raw/interactions", days[0], days[0]).to_pandas()
    victim = inter["user_key"].value_counts().index[0]
    ship_victim_records(lake, tmp_path / "spool", victim)
    for d in days:
        run_steps(lake, d)
        daily.mine_day_phrasings(lake, d)
        daily.report(lake, d)
    sel = daily.get_frame(lake, daily.key(daily.LABELING, days[-1], "selected.parquet"))
    raw = lake.read_partitions("raw/interactions", days[0], days[-1]).to_pandas()
    picked = pd.concat([sel.head(20), raw[raw["user_key"] == victim].head(5)]).drop_duplicates("request_id")
    lab = pd.DataFrame({c: picked[c].to_numpy() if c in picked else None for c in LABELED_COLUMNS})
    lab = lab.assign(task_id=range(len(lab)), annotation_id=range(len(lab)), lead_time_s=5.0, verdict="wrong",
                     corrected_answer="pink", selected_on=str(days[-1]), annotator="a@x",
                     created_at=pd.Timestamp("2026-10-06T12:00Z"), updated_at=pd.Timestamp("2026-10-06T12:00Z"))
    daily.put_frame(lake, daily.key(daily.LABELED, days[-1], daily.LABELED_FILE), lab)
    manifest = build_dataset(lake, DatasetConfig(replay_ratio=0.5, heldout_share=0.5), today=days[-1],
                             golden_samples=golden_samples(6))
    held = daily.get_frame(lake, f"datasets/{manifest['id']}/heldout.parquet")
    ids = [*held["example_id"], "golden-1", "golden-2"]
    metrics = {"candidate": "shoes@v1", "dataset_id": manifest["id"],
               "sets": {"heldout": {who: {"overall": {"n": len(ids), "exact_match": 0.5}}
                                    for who in ("candidate", "champion")}},
               "paired": {"heldout": {"example_id": ids,
                                      "candidate_correct": [i % 2 for i in range(len(ids))],
                                      "champion_correct": [int(i % 3 == 0) for i in range(len(ids))]}}}
    lake.put_json("adapters/shoes/v1/metrics.json", metrics)
    lake.put_json("adapters/shoes/v1/training.json", {"dataset_sha256": "x", "seconds": 1})
    lake.put_bytes("adapters/shoes/v1/adapter_model.safetensors", b"weights")
    Registry(lake).register(AdapterVersion(name="shoes", version="v1", path="adapters/shoes/v1/", base_model="b",
                                           dataset_id=manifest["id"], metrics=metrics), actor="test")
    return victim, manifest


# Keys the code writes that demo_like_lake does not make (Label Studio, training, the canary, the
# decoding config, the demo's loop report): declared, so the layout check sees them too.
WRITTEN_ELSEWHERE = ["labeling/dt=2026-10-06/pushed.json", "adapters/shoes/v1/adapter_config.json",
                     "adapters/shoes/v1/loss.png", "adapters/shoes/v1/README.md",
                     "registry/serving/0000000001.json", "rollout/exp-1/looks/20261006T120000-s0.json",
                     "rollout/exp-1/counts/through-20261006T120000.parquet", "config/decoding.json",
                     "config/decoding/00000001.json", "reports/loop/2026-10-05/index.html",
                     "quarantine/spool/interactions/seg-1.json", "privacy/erased_images/u/waiting.json"]


def test_erasure_covers_every_kind_of_object(local_lake, tmp_path):
    """Every key of a demo-like lake (and every key the code writes elsewhere) is declared in
    vloop.privacy.erasure.LAYOUT: covered by the erasure, or free of personal data. A new kind of object
    fails here until it is declared. Objects declared as "rows" really carry a user key or a
    request id, the columns the erasure matches. On the previous main nothing declared the lake's
    layout, and registry versions and phrasings were not covered at all."""
    from vloop.privacy.erasure import LAYOUT, coverage

    lake = local_lake
    demo_like_lake(lake, tmp_path, days=(D1,), rows=80)
    keys = lake.list("")
    assert any(k.startswith("registry/versions/") for k in keys) and any(k.endswith("/phrasings.parquet") for k in keys)
    missing = sorted({k for k in keys + WRITTEN_ELSEWHERE if coverage(k) is None})
    assert not missing, f"objects erasure neither covers nor declares free of personal data: {missing}"
    for k in keys:
        if coverage(k) == "rows":
            cols = set(pq.read_schema(io.BytesIO(lake.get_bytes(k))).names)
            assert cols & {"user_key", "request_id"}, f"{k} is declared as rows but has neither column"
    assert coverage("newarea/dt=2026-10-05/thing.parquet") is None  # a new kind of object is caught
    assert all(how for _, how in LAYOUT)


def test_erasure_cleans_registry_metrics_and_phrasings(local_lake, tmp_path):
    """Registry versions and the adapter's metrics.json lose the erased user's example ids *with*
    their paired entries (the rest keeps its pairs, the gate still runs and its figures are
    recomputed beside the marked aggregates); the day's phrasings keep the request ids they came
    from and are rebuilt without the user's wordings. On the previous main the registry version
    kept the ids (registry/ was skipped), metrics.json lost ids but not their paired entries
    (the gate refused the misaligned lists), and phrasings.parquet kept the user's wordings with
    nothing to match them by."""
    from vloop.curate.mining import cluster_phrasings
    from vloop.learn.retrain import GateConfig, gate_decision

    lake = local_lake
    demo_like_lake(lake, tmp_path, days=(D1,), rows=300)
    cands = daily.read_table(lake, daily.CURATED, D1, "phrasing_candidates.parquet")
    phr = daily.get_frame(lake, daily.key(daily.CURATED, D1, "phrasings.parquet"))
    assert "request_ids" in phr and set(cands["request_id"]) == {r for ids in phr["request_ids"] for r in ids}
    # The victim: a user whose wording is in the phrasings, with examples in the evaluation.
    ver = Registry(lake).get("shoes@v1")
    paired = ver.metrics["paired"]["heldout"]
    raw = lake.read_partitions("raw/interactions", D1, D2).to_pandas()
    owner = dict(zip(raw["request_id"], raw["user_key"]))
    in_eval = {owner.get(i.partition("-")[2]) for i in paired["example_id"]} - {None}
    victim = next(u for u in cands["user_key"].unique() if u in in_eval)
    theirs = set(raw.loc[raw["user_key"] == victim, "request_id"])
    assert theirs & set(cands["request_id"])
    before = {i: (c, h) for i, c, h in zip(paired["example_id"], paired["candidate_correct"],
                                          paired["champion_correct"])}

    erase_user(lake, victim, actor="dpo", rebuild_reports=False)

    for m in (Registry(lake).get("shoes@v1").metrics, lake.get_json("adapters/shoes/v1/metrics.json")):
        p = m["paired"]["heldout"]
        assert len(p["example_id"]) == len(p["candidate_correct"]) == len(p["champion_correct"])
        assert not any(i.partition("-")[2] in theirs for i in p["example_id"])
        # Everyone else's examples keep their own results, in order.
        assert {i: (c, h) for i, c, h in zip(p["example_id"], p["candidate_correct"], p["champion_correct"])} == \
            {i: v for i, v in before.items() if i.partition("-")[2] not in theirs}
        n_gone = len(before) - len(p["example_id"])
        assert n_gone > 0 and m["erased_examples"] == {"heldout": n_gone} and "erased_examples_note" in m
        d = gate_decision(m, GateConfig(set_name="heldout"))
        assert d["n"] == len(p["example_id"]) and "do not line up" not in d["reason"]
        assert {k: m["paired_after_erasure"]["heldout"][k] for k in ("n", "b", "c", "p")} == \
            {k: d[k] for k in ("n", "b", "c", "p")}
    assert victim not in strings_of(lake, "registry/versions/shoes/v1.json")
    # Phrasings: rebuilt from the cleaned candidates; none of the user's requests or own wordings.
    phr = daily.get_frame(lake, daily.key(daily.CURATED, D1, "phrasings.parquet"))
    cleaned = daily.read_table(lake, daily.CURATED, D1, "phrasing_candidates.parquet")
    assert victim not in set(cleaned["user_key"])
    assert not {r for ids in phr["request_ids"] for r in ids} & theirs
    expect = cluster_phrasings(cleaned)
    assert phr.drop(columns="request_ids").reset_index(drop=True).equals(
        expect.drop(columns="request_ids").reset_index(drop=True))
    only_theirs = set(cands.loc[cands["user_key"] == victim, "question"]) - set(cleaned["question"])
    text = strings_of(lake, daily.key(daily.CURATED, D1, "phrasings.parquet"))
    assert only_theirs and not any(json.dumps(q)[1:-1] in text for q in only_theirs)


def test_erasure_queue_is_one_pass(local_lake, tmp_path):
    """Three queued erasures: the lake is listed once and no object is read more often than for a
    single user's erasure, and the lake ends exactly as erasing the three one by one leaves it.
    On the previous main each queued user scanned the whole lake on its own (three listings, every
    object read three times over)."""
    from vloop.store.lake import LocalLake

    lake = local_lake
    demo_like_lake(lake, tmp_path, days=(D1,), rows=120)
    copies = []
    for name in ("one-by-one", "single"):
        shutil.copytree(lake.root, tmp_path / name)
        copies.append(LocalLake(tmp_path / name, max_image_bytes=lake.max_image_bytes,
                                max_image_pixels=lake.max_image_pixels))
    one_by_one, single = copies
    inter = lake.read_partitions("raw/interactions", D1, D1).to_pandas()
    users = list(inter["user_key"].value_counts().index[:3])

    def counting(lk):
        listings, reads = [], {}
        real_list, real_read = lk.list, lk.read_parquet
        lk.list = lambda prefix="", *a, **kw: (listings.append(prefix), real_list(prefix, *a, **kw))[1]
        lk.read_parquet = lambda k, *a, **kw: (reads.__setitem__(k, reads.get(k, 0) + 1), real_read(k, *a, **kw))[1]
        return listings, reads

    for u in users:
        request_erasure(lake, u, actor="app")
    listings, reads = counting(lake)
    done = work_erasure_queue(lake, actor="privacy_maintenance test")
    assert sorted(d["user_key"] for d in done) == sorted(users)
    assert listings.count("") == 1, f"{listings.count('')} whole-lake listings for {len(users)} queued users"
    s_listings, s_reads = counting(single)
    erase_user(single, users[0], actor="dpo")
    assert max(reads.values()) <= max(s_reads.values()), "an object was read more often than for one user"

    for u in users:
        erase_user(one_by_one, u, actor="dpo")

    def content(lk):
        return {k: lk.get_bytes(k) for k in lk.list("")
                if not k.startswith(("privacy/", "registry/events/")) and not k.endswith("/manifest.json")}

    a, b = content(lake), content(one_by_one)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # Dataset manifests: the same counts and erasure entries (only their times differ).
    ma, mb = ([lk.get_json(k) for k in sorted(lk.list("datasets/")) if k.endswith("/manifest.json")]
              for lk in (lake, one_by_one))
    strip = lambda m: {**m, "erasures": sorted(e["examples_removed"] for e in m.get("erasures", []))}  # noqa: E731
    assert [strip(m) for m in ma] == [strip(m) for m in mb]
