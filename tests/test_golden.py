"""`vloop golden build` / `show`: a golden set from annotators' labels, stratified by category and
intent, frozen (a second build refuses; --new-version cuts the next and keeps the old), held out
of training (its requests and near-copies, every version), and the missing-set error naming the
command."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from tests.test_training import write_labels
from vloop import cli
from vloop.curate import daily
from vloop.learn import golden as g
from vloop.learn.dataset import GOLDEN_KEY, DatasetConfig, GoldenSetMissing, build_dataset, ensure_golden, load_split
from vloop.sim.synth import World

DAY = dt.date(2026, 11, 20)


def _labels(lake, n=160, day=DAY, seed=5, **kw) -> pd.DataFrame:
    return write_labels(lake, day, World(seed).samples(n), **kw)


def _vloop(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_allocate_gives_every_stratum_its_floor_then_shares_in_proportion():
    alloc = g.allocate({"a": 100, "b": 30, "c": 2, "d": 0}, total=40, floor=5)
    assert sum(alloc.values()) == 40 and alloc["c"] == 2 and alloc["d"] == 0
    assert alloc["b"] >= 5 and alloc["a"] > alloc["b"]
    assert g.allocate({"a": 3, "b": 4}, total=50, floor=5) == {"a": 3, "b": 4}  # fewer than asked: all
    assert sum(g.allocate({s: 10 for s in "abcdefgh"}, total=4, floor=5).values()) == 4


def test_golden_build_stratifies_freezes_and_versions(local_lake, capsys):
    lake = local_lake
    labels = _labels(lake)
    code, out, err = _vloop(capsys, "golden", "build", "--url", lake.url, "--size", "60", "--min-size", "20",
                            "--min-per-stratum", "3", "--actor", "tester")
    assert code == 0, err
    assert "golden set v1: 60 examples" in out and "coverage (examples per category and intent)" in out
    golden = daily.get_frame(lake, GOLDEN_KEY)
    assert len(golden) == 60 and golden["request_id"].is_unique
    assert set(golden["request_id"]) <= set(labels["request_id"]) and (golden["source"] == "golden").all()
    # Stratified: every (category, intent) with labels is there, with its floor or all it has.
    from vloop.learn.evaluation import intent_of

    available = labels.assign(intent=labels["question"].map(intent_of)).groupby(["category", "intent"]).size()
    got = golden.groupby(["category", "intent"]).size()
    for stratum, n in available.items():
        assert got.get(stratum, 0) >= min(n, 3), (stratum, n, got.get(stratum, 0))
    for cat in set(labels["category"]):
        assert f"\n  {cat}" in out  # a coverage row per category
    rec = g.current(lake)
    assert rec["version"] == 1 and rec["actor"] == "tester" and rec["size"] == 60 and rec["source"] == "labels"
    assert sum(rec["by_stratum"].values()) == 60

    # Frozen: building again refuses and names the way to cut a new version; nothing changes.
    before = lake.get_bytes(GOLDEN_KEY)
    code, out, err = _vloop(capsys, "golden", "build", "--url", lake.url, "--size", "60", "--min-size", "20")
    assert code == 2 and "v1 is frozen" in err and "--new-version" in err
    assert lake.get_bytes(GOLDEN_KEY) == before

    # A new version: in force from now on, v1 kept. Its examples are new labels (v1's are held out).
    _labels(lake, 120, day=DAY + dt.timedelta(days=1), seed=9)
    code, out, err = _vloop(capsys, "golden", "build", "--url", lake.url, "--size", "50", "--min-size", "20",
                            "--new-version")
    assert code == 0, err
    assert "golden set v2: 50 examples" in out and "(nor those of v1, kept)" in out
    assert [r["version"] for r in g.versions(lake)] == [1, 2] and g.current(lake)["version"] == 2
    assert g.load_version(lake, 1).equals(golden)
    code, out, err = _vloop(capsys, "golden", "show", "--url", lake.url)
    assert code == 0 and "golden set v2: 50 examples" in out and "kept (held out of training): v1" in out
    code, out, err = _vloop(capsys, "golden", "show", "--url", lake.url, "--version", "1")
    assert code == 0 and "golden set v1: 60 examples" in out


def test_golden_examples_never_reach_training(local_lake, capsys):
    lake = local_lake
    _labels(lake, 120)
    assert _vloop(capsys, "golden", "build", "--url", lake.url, "--size", "40", "--min-size", "20")[0] == 0
    v1 = daily.get_frame(lake, GOLDEN_KEY)
    # A near-copy of a golden example (same photo, same question, another request) labelled later.
    first = v1.iloc[0]
    near = daily.get_frame(lake, daily.key(daily.LABELED, DAY, daily.LABELED_FILE))
    near = near[near["request_id"] == first["request_id"]].assign(request_id="later-copy", selected_on=str(DAY))
    later = DAY + dt.timedelta(days=1)
    daily.put_frame(lake, daily.key(daily.LABELED, later, daily.LABELED_FILE), near)
    daily.put_frame(lake, daily.key(daily.CURATED, later, "interactions.parquet"),
                    pd.DataFrame({"request_id": ["later-copy"], "user_key": ["shopper-1"]}))
    daily.put_frame(lake, daily.key(daily.CURATED, DAY, "interactions.parquet"), pd.concat(
        [daily.get_frame(lake, daily.key(daily.CURATED, DAY, "interactions.parquet")),
         pd.DataFrame({"request_id": ["later-copy"], "user_key": ["shopper-1"]})], ignore_index=True))

    m = build_dataset(lake, DatasetConfig(replay_ratio=0), today=later)
    used = pd.concat([load_split(lake, m["id"], s) for s in ("train", "heldout")])
    assert set(used["request_id"]).isdisjoint(v1["request_id"]) and "later-copy" not in set(used["request_id"])
    assert m["dropped"]["in the golden set"] == 40 + 1 and m["golden"]["version"] == 1
    assert len(load_split(lake, m["id"], "golden")) == 40

    # Cut v2: v1's examples stay out of training although v2 is in force.
    _labels(lake, 80, day=later + dt.timedelta(days=1), seed=9)
    assert _vloop(capsys, "golden", "build", "--url", lake.url, "--size", "30", "--min-size", "20",
                  "--new-version")[0] == 0
    v2 = daily.get_frame(lake, GOLDEN_KEY)  # may reuse v1's examples: held out either way
    m2 = build_dataset(lake, DatasetConfig(replay_ratio=0), today=later + dt.timedelta(days=1))
    used = pd.concat([load_split(lake, m2["id"], s) for s in ("train", "heldout")])
    assert set(used["request_id"]).isdisjoint(set(v1["request_id"]) | set(v2["request_id"]))
    assert m2["golden"]["version"] == 2
    # And a label a dataset already trained on is never drawn into a later golden version.
    assert set(v2["request_id"]).isdisjoint(set(load_split(lake, m["id"], "train")["request_id"]))


def test_missing_golden_set_names_the_command(local_lake, capsys):
    _labels(local_lake, 20)
    with pytest.raises(GoldenSetMissing, match="`vloop golden build`"):
        build_dataset(local_lake, DatasetConfig(replay_ratio=0), today=DAY)
    code, out, _ = _vloop(capsys, "golden", "show", "--url", local_lake.url)
    assert code == 1 and "`vloop golden build`" in out
    # Too few usable labels: refused with the count, nothing written.
    code, _, err = _vloop(capsys, "golden", "build", "--url", local_lake.url)
    assert code == 2 and "only 20 usable labels" in err and not local_lake.exists(GOLDEN_KEY)


def test_an_unversioned_set_is_kept_as_v0(local_lake, capsys):
    ensure_golden(local_lake, samples=World(424242).samples(10))  # written from samples: v1
    assert g.current(local_lake)["version"] == 1
    old = daily.get_frame(local_lake, GOLDEN_KEY)
    local_lake.delete(g.CURRENT_KEY)  # as a lake from before versions: a bare golden.parquet
    for k in local_lake.list(g.VERSIONS):
        local_lake.delete(k)
    _labels(local_lake, 60)
    code, _, err = _vloop(capsys, "golden", "build", "--url", local_lake.url, "--min-size", "20")
    assert code == 2 and "v0 is frozen" in err
    assert _vloop(capsys, "golden", "build", "--url", local_lake.url, "--min-size", "20", "--new-version")[0] == 0
    assert [r["version"] for r in g.versions(local_lake)] == [0, 1] and g.current(local_lake)["version"] == 1
    assert g.load_version(local_lake, 0).equals(old)


def test_erasure_reaches_every_golden_version(local_lake, capsys):
    """A golden set is drawn from users' labelled requests: erasing a user removes their rows from
    the set in force and from every frozen version (the lake's layout declares only the records,
    counts and a hash, free of personal data)."""
    from vloop.privacy.erasure import coverage, erase_user

    lake = local_lake
    labels = _labels(lake)
    for extra in ([], ["--new-version"]):
        assert _vloop(capsys, "golden", "build", "--url", lake.url, "--size", "60", "--min-size", "20", *extra)[0] == 0
    keys = [k for k in lake.list("datasets/golden/") if k.endswith(".parquet")]
    assert len(keys) == 3 and all(coverage(k) == "rows" for k in keys), keys
    owner = dict(zip(labels["request_id"], [f"shopper-{i % 7}" for i in range(len(labels))]))
    golden = daily.get_frame(lake, GOLDEN_KEY)
    victim = owner[golden["request_id"].iloc[0]]
    theirs = {r for r, u in owner.items() if u == victim}
    assert any(set(daily.get_frame(lake, k)["request_id"]) & theirs for k in keys)
    erase_user(lake, victim, actor="test")
    for k in keys:
        left = set(daily.get_frame(lake, k)["request_id"])
        assert left and not left & theirs, k
