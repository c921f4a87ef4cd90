from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from vloop.store.schema import FEEDBACK, INTERACTION, RecordError

TS = dt.datetime(2026, 11, 3, 12, 0, tzinfo=dt.timezone.utc)


def interaction(**over):
    rec = {"request_id": "r1", "ts": TS, "user_key": "k", "question": "colour?", "answer": "red",
           "base_model": "tiny", "arm": "canary", "status": "ok", "token_logprobs": [-0.1, -2.0],
           "confidence": 0.5, "latency_ms": 30, "image_sha256": "ab" * 32,
           "image_key": "raw/images/ab/x.png", "image_w": 64, "image_h": 64}
    rec.update(over)
    return rec


def test_arrow_schemas_follow_the_contract():
    s = INTERACTION.arrow
    assert s.names == ["request_id", "ts", "user_key", "session_id", "category", "image_sha256",
                       "image_key", "image_w", "image_h", "question", "answer", "token_logprobs",
                       "confidence", "latency_ms", "base_model", "adapter", "arm", "status",
                       "redactions", "app"]
    assert s.field("ts").type == pa.timestamp("us", tz="UTC")
    assert s.field("token_logprobs").type == pa.list_(pa.float32())
    assert not s.field("request_id").nullable and s.field("adapter").nullable
    assert FEEDBACK.arrow.names == ["event_id", "request_id", "ts", "type", "edited_text",
                                    "dwell_ms", "rating"]


def test_to_row_normalises():
    row = INTERACTION.to_row(interaction(ts="2026-11-03T20:00:00+08:00", latency_ms=np.float32(3.5)))
    assert row["ts"] == TS
    assert row["latency_ms"] == 3.5 and row["adapter"] is None and row["session_id"] is None
    table = INTERACTION.to_table([interaction(), interaction(request_id="r2", adapter="a@3")])
    assert table.schema == INTERACTION.arrow and table.num_rows == 2


@pytest.mark.parametrize("over, field, reason", [
    ({"request_id": None}, "request_id", "required"),
    ({"question": 42}, "question", "expected a string"),
    ({"arm": "blue"}, "arm", "not one of champion, canary, holdout, unassigned, direct"),
    ({"ts": dt.datetime(2026, 11, 3)}, "ts", "no time zone"),
    ({"ts": "tuesday"}, "ts", "not an ISO 8601"),
    ({"token_logprobs": [-0.1, "x"]}, "token_logprobs[1]", "expected a number"),
    ({"token_logprobs": "-0.1"}, "token_logprobs", "list of numbers"),
    ({"confidence": float("nan")}, "confidence", "NaN"),
    ({"image_w": 6.5}, "image_w", "expected an integer"),
    ({"image_w": True}, "image_w", "expected an integer"),
    ({"latency_ms": -1}, "latency_ms", "negative"),
    ({"answer": None}, "answer", "needs an answer"),
    ({"image_key": None}, "image_key", "together"),
    ({"user_id": "alice"}, "user_id", "unknown field"),
])
def test_bad_interaction_names_the_field(over, field, reason):
    with pytest.raises(RecordError, match=reason) as e:
        INTERACTION.to_row(interaction(**over))
    assert e.value.field == field
    assert field in str(e.value)


def test_missing_required_field_is_named():
    rec = interaction()
    del rec["base_model"]
    with pytest.raises(RecordError, match="'base_model'.*required"):
        INTERACTION.to_row(rec)


def test_error_status_may_have_no_answer():
    assert INTERACTION.to_row(interaction(status="error", answer=None))["answer"] is None


@pytest.mark.parametrize("event, ok_or_reason", [
    ({"type": "accept"}, None),
    ({"type": "edit", "edited_text": "it is blue"}, None),
    ({"type": "edit"}, "edited text"),
    ({"type": "dwell", "dwell_ms": 5000}, None),
    ({"type": "dwell"}, "needs dwell_ms"),
    ({"type": "rating", "rating": 6}, "between 1 and 5"),
    ({"type": "rating", "rating": 4}, None),
    ({"type": "like"}, "not one of"),
])
def test_feedback_rules(event, ok_or_reason):
    rec = {"event_id": "e1", "request_id": "r1", "ts": TS, **event}
    if ok_or_reason is None:
        assert FEEDBACK.to_row(rec)["type"] == event["type"]
    else:
        with pytest.raises(RecordError, match=ok_or_reason):
            FEEDBACK.to_row(rec)


def test_not_a_mapping():
    with pytest.raises(RecordError, match="expected a mapping"):
        FEEDBACK.to_row(["e1"])


def test_files_written_before_the_app_field_still_read(tmp_path):
    """`app` came after data existed: a file without the column reads with app = null."""
    from vloop.store.lake import LocalLake

    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    row = INTERACTION.to_row(interaction())
    del row["app"]
    old = pa.schema([f for f in INTERACTION.arrow if f.name != "app"])
    lake.write_partition("raw/interactions", pa.Table.from_pylist([row], schema=old), TS.date())
    t = lake.read_partitions("raw/interactions", TS.date(), schema=INTERACTION.arrow)
    assert t.schema == INTERACTION.arrow and t.column("app").to_pylist() == [None]
    assert t.column("request_id").to_pylist() == ["r1"]
