"""Cold start: seed validation with line numbers, paraphrase expansion, the template library that
grows from users' phrasings, and the first adapter trained and registered on the tiny model."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pandas as pd
import pytest

from tests.conftest import ROOT
from vloop.learn.coldstart import ColdStartConfig, SeedError, cold_start, expand, read_seed, template_library
from vloop.learn.evaluation import intent_of

SAMPLE = ROOT / "examples" / "seed.jsonl"


@pytest.fixture
def seed_dir(tmp_path):
    """A writable copy of the sample seed file and its images."""
    shutil.copytree(SAMPLE.parent, tmp_path / "examples")
    return tmp_path / "examples"


def test_the_sample_seed_file_is_valid():
    rows, bad = read_seed(SAMPLE)
    assert bad == [] and len(rows) == len(SAMPLE.read_text().splitlines()) >= 50
    assert {intent_of(r.question) for r in rows} >= {"colour", "category", "count"}
    assert all(r.image_bytes[:8] == b"\x89PNG\r\n\x1a\n" for r in rows)


def test_a_malformed_jsonl_seed_is_refused_with_line_numbers(seed_dir):
    good = SAMPLE.read_text().splitlines()
    first = json.loads(good[0])
    lines = [good[0],
             "{not json",
             json.dumps({**first, "answer": ""}),
             json.dumps({**first, "image": "seed_images/nope.png", "question": "What is this?"}),
             good[0],  # the same image and question as line 1
             json.dumps({**first, "question": "x" * 3000}),
             "",  # blank lines are skipped, and still counted
             json.dumps({**first, "category": "shoes; DROP TABLE", "question": "How many are there?"}),
             "[1, 2]",
             json.dumps({**first, "image": "bad.png", "question": "这是什么?"})]
    (seed_dir / "bad.png").write_bytes(b"not an image at all")
    path = seed_dir / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, bad = read_seed(path)
    assert [r.line for r in rows] == [1]
    why = dict(bad)
    assert sorted(why) == [2, 3, 4, 5, 6, 8, 9, 10]
    assert "not valid JSON" in why[2] and "missing or empty: answer" in why[3]
    assert "image not found: seed_images/nope.png" in why[4] and "duplicates line 1" in why[5]
    assert "over the limit" in why[6] and "category" in why[8] and "not a JSON object" in why[9]
    assert "not a readable image" in why[10]
    with pytest.raises(SeedError, match=r"8 bad row\(s\) refused") as e:
        cold_start(path, lake=None, base_model="unused: refused before any model is loaded")
    assert "line 2: not valid JSON" in str(e.value) and "line 10: image bad.png" in str(e.value)


def test_a_malformed_csv_seed_is_refused_with_line_numbers(seed_dir, capsys):
    from vloop.cli import main

    img = json.loads(SAMPLE.read_text().splitlines()[0])["image"]
    path = seed_dir / "seed.csv"
    # Line 3's answer spans two lines (a quoted field): the next row is on line 5.
    path.write_text("image,question,answer,category\n"
                    f"{img},What colour is this?,red,shoes\n"
                    f'{img},What is this?,"a shoe,\nfor running",shoes\n'
                    f"{img},,red,shoes\n")
    rows, bad = read_seed(path)
    assert [r.line for r in rows] == [2, 3] and bad == [(5, "missing or empty: question")]
    (seed_dir / "nohead.csv").write_text("picture,question,answer,category\nx,y,z,w\n")
    assert read_seed(seed_dir / "nohead.csv")[1][0][0] == 1  # the header is line 1
    # Through the command: exit status 2, every bad line on stderr, nothing trained.
    assert main(["cold-start", "--seed", str(path), "--base-model", str(seed_dir)]) == 2
    err = capsys.readouterr().err
    assert "line 5: missing or empty: question" in err
    with pytest.raises(SeedError, match="unknown format .txt"):
        read_seed(path.rename(seed_dir / "seed.txt"))


def test_paraphrases_keep_intent_and_language():
    lib = template_library()
    for q in ("What colour is this?", "这是什么颜色?", "How many are there?", "图里是什么东西?"):
        extra = expand(q, lib, 3, "row-1")
        assert len(extra) == 3 and q not in extra
        assert all(intent_of(x) == intent_of(q) for x in extra)
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in x) == any("\u4e00" <= ch <= "\u9fff" for ch in q)
                   for x in extra)
        assert expand(q, lib, 3, "row-1") == extra  # the same row gets the same wordings
    assert expand("Can I run in these?", lib, 3, "row-1") == []  # suitability questions carry specifics


def test_template_library_grows_from_users_phrasings(local_lake):
    from vloop.curate import daily
    from vloop.curate.mining import mine_phrasings

    q = "yo what colour is this thing"
    rows = [{"request_id": f"r{i}", "question": q if i % 2 else q.upper() + "??", "user_key": f"u{i}"}
            for i in range(4)]
    rows += [{"request_id": "p1", "question": "call me at [PHONE] what colour", "user_key": "u9"},
             {"request_id": "p2", "question": "Can I run in these?", "user_key": "u9"},
             {"request_id": "ok", "question": "what colour is the sky here", "user_key": "u8"}]
    inter = pd.DataFrame(rows)
    mined = pd.DataFrame({"request_id": inter["request_id"],
                          "reason": ["edited", "question repeated in the session", "regenerated", "edited",
                                     "edited", "edited", "accepted"]})
    ph = mine_phrasings(inter, mined)
    assert len(ph) == 1  # placeholder, suitability intent and an accepted answer left out; case merged
    assert ph.iloc[0]["asked"] == 4 and ph.iloc[0]["users"] == 4 and ph.iloc[0]["intent"] == "colour"
    assert ph.iloc[0]["lang"] == "en"
    assert q not in sum(template_library(local_lake)["colour"].values(), [])
    day = dt.date(2026, 11, 3)
    daily.put_frame(local_lake, daily.key("curated", day, "phrasings.parquet"), ph.assign(phrasing=q))
    assert q in template_library(local_lake)["colour"]["en"]
    assert q not in template_library(local_lake, min_users=5)["colour"]["en"]  # too few users


@pytest.mark.slow
def test_cold_start_trains_and_registers_an_adapter_from_the_sample(local_lake, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from vloop.learn.registry import Registry

    cfg = ColdStartConfig(work_dir=str(tmp_path / "work"), lora={"steps": 8, "batch_size": 4, "log_every": 4})
    r = cold_start(SAMPLE, lake=local_lake, base_model=str(tiny_model_dir), cfg=cfg, log=lambda *_: None)
    reg = Registry(local_lake)
    v = reg.get(r.ref)
    assert v.dataset_id == r.dataset_id and v.base_model == str(tiny_model_dir)
    assert reg.state().statuses[r.ref] == r.status and r.status in ("candidate", "rejected")
    assert "heldout" in v.metrics["sets"] and r.gate["set"] == "heldout"
    assert any(e["kind"] == "gate" and e["ref"] == r.ref for e in reg.history())
    # The dataset: every seed row, held-out rows as written, paraphrases only in training.
    from vloop.learn.dataset import load_split, manifest

    train, held = load_split(local_lake, r.dataset_id, "train"), load_split(local_lake, r.dataset_id, "heldout")
    assert train["request_id"].nunique() + held["request_id"].nunique() == r.seed_rows == 60
    assert len(held) and set(held["source"]) == {"seed"}
    para = train[train["source"] == "seed_paraphrase"]
    assert len(para) > r.seed_rows and (para["question"].map(intent_of) == para["intent"]).all()
    assert manifest(local_lake, r.dataset_id)["seed_file"] == "seed.jsonl"
    # A real PEFT adapter in the lake, its LoRA weights moved away from their zero start.
    files = set(local_lake.list(v.path))
    assert {v.path + "adapter_config.json", v.path + "adapter_model.safetensors"} <= files
    local = tmp_path / "adapter.safetensors"
    local.write_bytes(local_lake.get_bytes(v.path + "adapter_model.safetensors"))
    lora_b = [t for k, t in load_file(str(local)).items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().max()) > 0 for t in lora_b)
    assert r.training["examples"] == len(train) and r.training["final_loss"] > 0
