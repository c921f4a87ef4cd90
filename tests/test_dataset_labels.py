"""Which annotations may become training examples (vloop.learn.dataset's label rules), on a local lake."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from vloop.curate import daily
from vloop.learn.dataset import COLUMNS, GOLDEN_KEY, DatasetConfig, build_dataset, wrong_without_correction
from vloop.sim.synth import World

DAY = dt.date(2026, 11, 20)


def write_golden(lake) -> None:
    """A one-example golden set (unrelated to the labels), so build_dataset needs no synthetic one."""
    s = World(99).sample(0)
    img = lake.put_image(s.image_bytes())
    daily.put_frame(lake, GOLDEN_KEY, pd.DataFrame([{
        "example_id": "golden-0", "source": "golden", "request_id": None, "image_key": img.key,
        "image_sha256": img.sha256, "question": s.question, "answer": s.answer, "category": s.category,
        "intent": s.intent, "split": "golden"}], columns=COLUMNS))


def test_wrong_verdict_without_a_correction_is_dropped(local_lake):
    lake = local_lake
    write_golden(lake)
    cases = [("wrong", "red", "Red."),  # the model's answer left in place (normalised: the same) → dropped
             ("wrong", "red", "blue"),  # corrected
             ("correct", "red", "red"),  # confirmed: the model's answer is the right one
             ("wrong", None, "green")]  # a row without the model's answer cannot be checked: kept
    rows = []
    for i, ((verdict, model, fixed), s) in enumerate(zip(cases, World(5).samples(len(cases)))):
        img = lake.put_image(s.image_bytes())
        rows.append({"request_id": f"r{i}", "image_key": img.key, "question": s.question, "model_answer": model,
                     "corrected_answer": fixed, "verdict": verdict, "image_quality": "good",
                     "category": s.category, "adapter": None, "arm": "champion", "selected_on": str(DAY)})
    labels = pd.DataFrame(rows)
    assert wrong_without_correction(labels).tolist() == [True, False, False, False]
    # The interactions the labels came from (their users); a fifth label whose interaction is not
    # in the lake cannot be checked against opt-outs and erasures: dropped (fail closed).
    daily.put_frame(lake, daily.key(daily.CURATED, DAY, "interactions.parquet"),
                    pd.DataFrame({"request_id": labels["request_id"], "user_key": "shopper-1"}))
    orphan = {**rows[1], "request_id": "r-unknown", "corrected_answer": "black"}
    labels = pd.concat([labels, pd.DataFrame([orphan])], ignore_index=True)
    daily.put_frame(lake, daily.key(daily.LABELED, DAY, daily.LABELED_FILE), labels)

    m = build_dataset(lake, DatasetConfig(replay_ratio=0, heldout_share=0), today=DAY)
    assert m["dropped"]["wrong verdict without a correction"] == 1
    assert m["dropped"]["unknown user"] == 1
    train = daily.get_frame(lake, f"datasets/{m['id']}/train.parquet").set_index("request_id")
    assert sorted(train.index) == ["r1", "r2", "r3"]
    assert train.loc["r1", "answer"] == "blue" and train.loc["r1", "source"] == "label_corrected"
    assert train.loc["r2", "source"] == "label_confirmed"
