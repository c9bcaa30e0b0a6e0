"""The compiled Avro writers write exactly fastavro's bytes, or hand the record to fastavro."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calmrun.errors import CalmrunError, SerializationError
from calmrun.wire.avro import AvroCodec
from calmrun.wire.avrowrite import Unsure, compile_writer
from calmrun.wire.codec import NAMESPACE, wire_codec
from calmrun.workflow.decider import decide
from calmrun.workflow.events import RunRequest, RunRequested, StepCost, StepResult, StepResultRecord
from tests.runtime_support import linear

CODEC = wire_codec()
SCHEMAS = CODEC.schemas()
LONG = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def values(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of ``schema``: what a model dump holds, and now and then what a compiled writer refuses."""
    if isinstance(schema, list):
        return st.one_of(*(values(s, named) for s in schema))
    if isinstance(schema, str):
        prim: dict[str, st.SearchStrategy[Any]] = {
            "null": st.none(),
            "boolean": st.booleans(),
            "long": LONG | st.booleans(),  # a bool is an int to fastavro, not to the compiled writer
            "double": st.floats(allow_nan=False) | st.integers(-(2**53), 2**53),
            "string": st.text(max_size=20),
            "bytes": st.binary(max_size=20),
        }
        return prim[schema] if schema in prim else values(named[f"{NAMESPACE}.{schema}"], named)
    kind = schema["type"]
    if kind == "record":
        named[f"{schema.get('namespace', NAMESPACE)}.{schema['name']}"] = schema
        fields = {f["name"]: values(f["type"], named) for f in schema["fields"]}
        return st.fixed_dictionaries(fields)
    if kind == "map":
        return st.dictionaries(st.text(max_size=5), values(schema["values"], named), max_size=3)
    if kind == "array":
        return st.lists(values(schema["items"], named), max_size=3)
    return values(kind, named)


def encode_both(name: str, record: dict[str, Any]) -> tuple[bytes | str, bytes | str]:
    def one(encode: Any) -> bytes | str:
        try:
            return bytes(encode(f"{NAMESPACE}.{name}", record))
        except SerializationError as exc:
            return f"refused: {type(exc.__cause__).__name__}"

    return one(CODEC.avro.encode), one(CODEC.avro.encode_slow)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_wire_schema_is_compiled(name: str) -> None:
    assert compile_writer(SCHEMAS[name]) is not None


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_same_bytes_as_fastavro(name: str, data: st.DataObject) -> None:
    record = data.draw(values(SCHEMAS[name], {}))
    fast, slow = encode_both(name, record)
    assert fast == slow


def test_what_it_refuses_goes_to_fastavro() -> None:
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "n", "type": "long"},
            {"name": "x", "type": "double"},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "note", "type": ["null", "string"], "default": None},
        ],
    }
    writer = compile_writer(schema)
    assert writer is not None
    codec = AvroCodec([schema])
    for record in (
        {"n": True, "x": 1.0, "tags": [], "note": None},  # a bool for a long
        {"n": 1, "x": 1, "tags": [], "note": None},  # an int for a double
        {"n": 1, "x": 1.0, "tags": ("a",), "note": None},  # a tuple for an array
        {"n": 1, "x": 1.0, "tags": []},  # a field left to its default
        {"n": 2**63, "x": 1.0, "tags": [], "note": None},  # beyond 64 bits: fastavro refuses it
        {"n": 1, "x": 1.0, "tags": [], "note": 5},  # no branch of the union
    ):
        with pytest.raises(Unsure):
            writer(record, bytearray())
        assert outcome(codec.encode, record) == outcome(codec.encode_slow, record)


def outcome(encode: Any, record: dict[str, Any]) -> bytes | str:
    """The bytes, or the error fastavro's path raised (2**63 raises OverflowError there, as before)."""
    try:
        return bytes(encode("R", record))
    except Exception as exc:
        return type(exc).__name__


def test_schemas_beyond_its_reach_are_left_to_fastavro() -> None:
    three = {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", "long", "string"]}]}
    enum = {"type": "record", "name": "E", "fields": [{"name": "e", "type": "int"}]}
    assert compile_writer(three) is None
    assert compile_writer(enum) is None
    assert AvroCodec([three]).encode("U", {"u": 3}) == AvroCodec([three]).encode_slow("U", {"u": 3})


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_model_is_written_from_its_fields_as_from_its_dump(name: str, data: st.DataObject) -> None:
    """``RecordCodec.encode`` reads a model's fields as they are; its bytes are those of ``model_dump``
    and the converters (``encode_dumped``), for any record that decodes from what a dump may hold."""
    record = data.draw(values(SCHEMAS[name], {}))
    try:
        model = CODEC.decode(CODEC.avro.encode(f"{NAMESPACE}.{name}", record))
    except (SerializationError, CalmrunError):
        return  # not a valid record of the model: nothing to compare
    assert CODEC.avro.encode_model(f"{NAMESPACE}.{name}", model) is not None
    assert CODEC.encode(model) == CODEC.encode_dumped(model)


def test_what_the_fields_do_not_hold_as_a_dump_does_goes_through_the_dump() -> None:
    """An int held by a float field (a model built without validation) is converted as the dump's
    converters do; an instance of a subclass of a wire model is not taken from its fields."""
    cost = StepCost.model_construct(latency_ms=3, queue_wait_ms=0, cost_usd=Decimal("0.25"))
    result = StepResultRecord(run_id="r", workflow="w", step="s1", attempt=1, output={"n": 1}, cost=cost)
    assert type(result.cost.latency_ms) is int
    assert CODEC.encode(result) == CODEC.encode_dumped(result)

    class Sub(RunRequest):
        pass

    sub = Sub(workflow="w", run_id="r", input={"a": [1, 2.5, "x"]})
    assert CODEC.avro.encode_model(f"{NAMESPACE}.RunRequest", sub) is None


def test_the_records_a_run_writes_are_the_bytes_of_their_dumps() -> None:
    """Every event, task and state of a run with a failed and retried attempt, costs with tokens and money,
    and outputs of every JSON type: read from the fields, the bytes of ``model_dump`` and the converters."""
    wf = linear("lin", 3, agent="add_one", retry={"max_attempts": 3})
    cost = StepCost(latency_ms=1.5, tokens_in=12, tokens_out=3, model="m", cost_usd=Decimal("0.0012"))
    inputs: list[Any] = [
        RunRequested("run-1", "lin", {"n": 0, "tags": ["a", "é"], "x": 1.5, "none": None}, 1_000),
        StepResult("run-1", "s1", 1, 1_001, error_type="Boom", error="no", retriable=True, cost=cost),
        StepResult("run-1", "s1", 2, 1_002, output={"n": 1, "deep": {"a": [1, {"b": True}]}}, cost=cost),
        StepResult("run-1", "s2", 1, 1_003, output={"n": 2, "big": 2**70, "f": -0.0}),
        StepResult("run-1", "s3", 1, 1_004, output={"n": 3, "s": "x" * 300}),
    ]
    state, written = None, []
    for inp in inputs:
        d = decide(wf, state, inp)
        state = d.state
        written += [*d.events, *d.tasks, state]
    assert {type(r).__name__ for r in written} == {"RunEvent", "StepTask", "RunState"}
    for record in written:
        assert CODEC.avro.encode_model(f"{NAMESPACE}.{type(record).__name__}", record) is not None
        assert CODEC.encode(record) == CODEC.encode_dumped(record)
