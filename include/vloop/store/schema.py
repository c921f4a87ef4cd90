"""The record schemas: one place for the shape of every row vloop writes to the lake.

Two records (see DESIGN.md, "Data contracts"):

* ``INTERACTION`` — one per answered request, written by the serving gateway.
* ``FEEDBACK`` — zero or more per request (accept, edit, ...), may arrive late.

Each is a :class:`RecordSchema`: a list of :class:`Field` specs from which the pyarrow schema is
derived, so the Arrow types, the required flags and the allowed values cannot drift apart.
:meth:`RecordSchema.to_row` checks a dict and returns a normalised row or raises
:class:`RecordError` naming the bad field and why.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa

# unassigned: no user id, served by the champion; direct: the request named its model. Neither is randomised.
ARMS = ("champion", "canary", "holdout", "unassigned", "direct")
STATUSES = ("ok", "error", "disconnected")  # disconnected: a streaming client left before the end
FEEDBACK_TYPES = ("accept", "edit", "skip", "regenerate", "repeat", "close", "dwell", "rating")
RATING_RANGE = (1, 5)

TIMESTAMP = pa.timestamp("us", tz="UTC")


class RecordError(ValueError):
    """A record does not fit its schema. ``field`` names the culprit, ``reason`` says why."""

    def __init__(self, record: str, field: str, reason: str):
        self.record, self.field, self.reason = record, field, reason
        super().__init__(f"{record} record: field {field!r}: {reason}")


@dataclass(frozen=True)
class Field:
    name: str
    type: pa.DataType
    required: bool
    doc: str
    choices: tuple[str, ...] | None = None
    # Parquet dictionary encoding pays off for repeated values (arms, categories, users) and
    # costs time on unique ids and floats, so only low-cardinality fields use it.
    dictionary: bool = False

    def arrow(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=not self.required,
                        metadata={"doc": self.doc})


class RecordSchema:
    """A named list of fields with the pyarrow schema derived from it."""

    def __init__(self, name: str, fields: Iterable[Field]):
        self.name = name
        self.fields: tuple[Field, ...] = tuple(fields)
        self.by_name = {f.name: f for f in self.fields}
        self.arrow: pa.Schema = pa.schema([f.arrow() for f in self.fields],
                                          metadata={"vloop.record": name})

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def required(self) -> list[str]:
        return [f.name for f in self.fields if f.required]

    def parquet_options(self) -> dict:
        """Keyword arguments for ``pyarrow.parquet.write_table`` suited to this record."""
        return {"use_dictionary": [f.name for f in self.fields if f.dictionary]}

    def to_row(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``record`` and return it normalised (all fields present, timestamps in UTC).

        Raises :class:`RecordError` on an unknown field, a missing required field, a value of
        the wrong type or a value outside the allowed set.
        """
        if not isinstance(record, Mapping):
            raise RecordError(self.name, "<record>", f"expected a mapping, got {type(record).__name__}")
        unknown = sorted(set(record) - set(self.by_name))
        if unknown:
            raise RecordError(self.name, unknown[0], "unknown field (not in the schema)")
        row = {}
        for f in self.fields:
            value = record.get(f.name)
            if value is None:
                if f.required:
                    raise RecordError(self.name, f.name, "required field is missing or null")
                row[f.name] = None
                continue
            row[f.name] = _convert(self.name, f, value)
        self._check_row(row)
        return row

    def _check_row(self, row: dict[str, Any]) -> None:
        """Rules that span several fields of one record (see ``_RULES``)."""
        for rule in _RULES.get(self.name, ()):
            rule(self.name, row)

    def to_table(self, records: Iterable[Mapping[str, Any]]) -> pa.Table:
        """Rows (checked with :meth:`to_row`) as an Arrow table with exactly this schema."""
        rows = [self.to_row(r) for r in records]
        return pa.Table.from_pylist(rows, schema=self.arrow)

    def empty_table(self) -> pa.Table:
        return self.arrow.empty_table()


def conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """``table`` with exactly ``target``'s columns and types. A nullable column the table lacks
    (a field added to the schema after the file was written, e.g. ``app``) is read as nulls, so
    old files keep reading; a missing required one is still an error (KeyError)."""
    for f in target:
        if f.name not in table.column_names and f.nullable:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(target.names).cast(target)


def _convert(record: str, f: Field, value: Any) -> Any:
    t = f.type
    if pa.types.is_string(t):
        if not isinstance(value, str):
            raise RecordError(record, f.name, f"expected a string, got {type(value).__name__}")
        if f.choices is not None and value not in f.choices:
            raise RecordError(record, f.name, f"{value!r} is not one of {', '.join(f.choices)}")
        return value
    if pa.types.is_timestamp(t):
        return _to_utc(record, f.name, value)
    if pa.types.is_integer(t):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecordError(record, f.name, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if pa.types.is_floating(t):
        return _to_float(record, f.name, value)
    if pa.types.is_list(t):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise RecordError(record, f.name, f"expected a list of numbers, got {type(value).__name__}")
        out = []
        for i, v in enumerate(value):
            out.append(_to_float(record, f"{f.name}[{i}]", v))
        return out
    raise TypeError(f"no converter for {t}")  # a schema bug, not bad input


def _to_float(record: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # numpy scalars are numbers too
        if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "fiu":
            value = value.item()
        else:
            raise RecordError(record, name, f"expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise RecordError(record, name, "NaN is not a value")
    return value


def _to_utc(record: str, name: str, value: Any) -> dt.datetime:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise RecordError(record, name, f"{value!r} is not an ISO 8601 timestamp") from None
    if not isinstance(value, dt.datetime):
        raise RecordError(record, name, f"expected a datetime or ISO 8601 string, got {type(value).__name__}")
    if value.tzinfo is None:
        raise RecordError(record, name, "timestamp has no time zone (naive); give it in UTC")
    return value.astimezone(dt.timezone.utc)


def _interaction_rules(record: str, row: dict) -> None:
    if row["status"] == "ok" and row["answer"] is None:
        raise RecordError(record, "answer", "an ok interaction needs an answer")
    for name in ("image_w", "image_h", "latency_ms", "redactions"):
        if row[name] is not None and row[name] < 0:
            raise RecordError(record, name, f"must not be negative, got {row[name]}")
    if (row["image_sha256"] is None) != (row["image_key"] is None):
        raise RecordError(record, "image_key", "image_sha256 and image_key come together or not at all")


def _feedback_rules(record: str, row: dict) -> None:
    kind = row["type"]
    if kind == "edit" and not row["edited_text"]:
        raise RecordError(record, "edited_text", "an edit event needs the edited text")
    if kind == "dwell" and row["dwell_ms"] is None:
        raise RecordError(record, "dwell_ms", "a dwell event needs dwell_ms")
    if kind == "rating":
        if row["rating"] is None:
            raise RecordError(record, "rating", "a rating event needs a rating")
        lo, hi = RATING_RANGE
        if not lo <= row["rating"] <= hi:
            raise RecordError(record, "rating", f"must be between {lo} and {hi}, got {row['rating']}")
    if row["dwell_ms"] is not None and row["dwell_ms"] < 0:
        raise RecordError(record, "dwell_ms", f"must not be negative, got {row['dwell_ms']}")


_RULES = {"interaction": (_interaction_rules,), "feedback": (_feedback_rules,)}

INTERACTION = RecordSchema("interaction", [
    Field("request_id", pa.string(), True, "unique id of the answered request"),
    Field("ts", TIMESTAMP, True, "when the request was answered (UTC)"),
    Field("user_key", pa.string(), True, "HMAC of the user id; never the raw id", dictionary=True),
    Field("session_id", pa.string(), False, "the app's session id", dictionary=True),
    Field("category", pa.string(), False, "product category, e.g. shoes or bags", dictionary=True),
    Field("image_sha256", pa.string(), False, "sha256 of the stored, metadata-free image"),
    Field("image_key", pa.string(), False, "lake key of the image"),
    Field("image_w", pa.int32(), False, "image width in pixels"),
    Field("image_h", pa.int32(), False, "image height in pixels"),
    Field("question", pa.string(), True, "the user's question, PII-redacted", dictionary=True),
    Field("answer", pa.string(), False, "the model's answer, PII-redacted; null on error", dictionary=True),
    Field("token_logprobs", pa.list_(pa.float32()), False, "log-probability of each answer token"),
    Field("confidence", pa.float32(), False, "confidence in [0, 1] derived from token_logprobs"),
    Field("latency_ms", pa.float32(), False, "end-to-end model latency in milliseconds"),
    Field("base_model", pa.string(), True, "base model id or path", dictionary=True),
    Field("adapter", pa.string(), False, "LoRA adapter name@version, null for the bare base", dictionary=True),
    Field("arm", pa.string(), True, "rollout arm", choices=ARMS, dictionary=True),
    Field("status", pa.string(), True, "ok, error or disconnected", choices=STATUSES, dictionary=True),
    Field("redactions", pa.int32(), False, "how many PII spans were replaced by placeholders"),
    # Added after data existed: files written before it lack the column (see conform).
    Field("app", pa.string(), False, "the app whose API key made the request (VLOOP_API_KEYS); null "
          "without keys", dictionary=True),
])

FEEDBACK = RecordSchema("feedback", [
    Field("event_id", pa.string(), True, "unique id of the event"),
    Field("request_id", pa.string(), True, "the interaction this reacts to"),
    Field("ts", TIMESTAMP, True, "when the user reacted (UTC)"),
    Field("type", pa.string(), True, "kind of reaction", choices=FEEDBACK_TYPES, dictionary=True),
    Field("edited_text", pa.string(), False, "the user's corrected answer (edit), PII-redacted"),
    Field("dwell_ms", pa.int64(), False, "time spent on the answer (dwell)"),
    Field("rating", pa.int32(), False, f"explicit rating {RATING_RANGE[0]}..{RATING_RANGE[1]}"),
])

RECORDS = {s.name: s for s in (INTERACTION, FEEDBACK)}
