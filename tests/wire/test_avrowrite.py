"""The compiled Avro writers write exactly fastavro's bytes, or hand the record to fastavro."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calmrun.errors import SerializationError
from calmrun.wire.avro import AvroCodec
from calmrun.wire.avrowrite import Unsure, compile_writer
from calmrun.wire.codec import NAMESPACE, wire_codec

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
