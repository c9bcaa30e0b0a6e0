"""Avro single-object encoding: the bytes name their schema; bad bytes give a clear error, never a crash."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from calmrun.errors import DecodeError, SerializationError, UnknownSchemaError
from calmrun.wire.avro import MARKER, AvroCodec, schema_fingerprint

PING = {
    "type": "record",
    "name": "Ping",
    "namespace": "calmrun.test",
    "fields": [
        {"name": "run_id", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}
OTHER = {"type": "record", "name": "Other", "fields": [{"name": "x", "type": "int"}]}


def test_null_fingerprint_matches_the_avro_spec() -> None:
    # Java's SchemaNormalization.parsingFingerprint64("null") = 0x63dd24e7cc258f8a, written little-endian.
    assert schema_fingerprint({"type": "null"}) == (0x63DD24E7CC258F8A).to_bytes(8, "little")


def test_round_trip_and_header_layout() -> None:
    codec = AvroCodec([PING, OTHER])
    data = codec.encode("calmrun.test.Ping", {"run_id": "r-1", "seq": 7, "note": "hi"})
    assert data[:2] == MARKER
    assert data[2:10] == schema_fingerprint(PING)
    assert codec.decode(data) == ("calmrun.test.Ping", {"run_id": "r-1", "seq": 7, "note": "hi"})


@given(st.text(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.none() | st.text())
def test_any_record_round_trips(run_id: str, seq: int, note: str | None) -> None:
    codec = AvroCodec([PING])
    rec = {"run_id": run_id, "seq": seq, "note": note}
    assert codec.decode(codec.encode("calmrun.test.Ping", rec))[1] == rec


def test_unknown_fingerprint_is_a_clear_error() -> None:
    data = AvroCodec([OTHER]).encode("Other", {"x": 1})
    with pytest.raises(UnknownSchemaError, match="unknown Avro schema fingerprint"):
        AvroCodec([PING]).decode(data)


@pytest.mark.parametrize("cut", [0, 1, 2, 9, 10, 11])
def test_truncated_bytes_are_a_clear_error(cut: int) -> None:
    codec = AvroCodec([PING])
    data = codec.encode("calmrun.test.Ping", {"run_id": "a-long-enough-run-id", "seq": 123456789})
    with pytest.raises(DecodeError):
        codec.decode(data[:cut])


@given(st.binary(max_size=64))
def test_random_bytes_never_crash(data: bytes) -> None:
    codec = AvroCodec([PING, OTHER])
    with contextlib.suppress(DecodeError):
        codec.decode(data)


def test_no_marker_and_trailing_bytes() -> None:
    codec = AvroCodec([PING])
    with pytest.raises(DecodeError, match="marker"):
        codec.decode(b'{"run_id": "json, not avro"}')
    good = codec.encode("calmrun.test.Ping", {"run_id": "r", "seq": 1})
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(good + b"\x00")


def test_encoding_a_mismatched_record_is_a_serialization_error() -> None:
    codec = AvroCodec([PING])
    with pytest.raises(SerializationError, match="does not match"):
        codec.encode("calmrun.test.Ping", {"run_id": 5, "seq": "x"})
    with pytest.raises(SerializationError, match="no Avro schema"):
        codec.encode("Nope", {})
