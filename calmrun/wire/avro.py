"""Avro single-object encoding with fastavro: marker ``C3 01``, 8-byte schema fingerprint, binary body.

Any reader can tell the schema from the bytes alone: the fingerprint is the CRC-64-AVRO (Rabin) of the
schema's Parsing Canonical Form, little-endian, as the Avro specification defines it. fastavro is used
rather than the deprecated ``avro-python3`` (and its successor ``avro``) because it is several times
faster on small records; see docs/architecture.md.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from calmrun.errors import DecodeError, SerializationError, UnknownSchemaError
from calmrun.wire.avrowrite import Models, Unsure, Write, compile_writer

MARKER = b"\xc3\x01"
HEADER_SIZE = 10


def schema_fingerprint(schema: Mapping[str, Any]) -> bytes:
    """The 8 bytes that single-object encoding writes after the marker for ``schema``."""
    parsed = fastavro.parse_schema(dict(schema), _write_hint=False)
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


def is_single_object(data: bytes) -> bool:
    """True when ``data`` starts with the single-object marker."""
    return data[:2] == MARKER


class AvroCodec:
    """Encodes and decodes records of a fixed set of named schemas; schemas are parsed once.

    Args:
        schemas: Avro schemas (dicts) of named records; their full names are the lookup keys.
        readers: earlier versions of those schemas: records written with them still decode (under the
            same name), nothing is written with them.
        models: the pydantic models the compiled writers also take (``encode_model``), by record name.
    """

    def __init__(
        self,
        schemas: Iterable[Mapping[str, Any]],
        readers: Iterable[Mapping[str, Any]] = (),
        models: Models | None = None,
    ) -> None:
        self._by_name: dict[str, tuple[Any, bytes]] = {}
        self._writers: dict[str, Write] = {}  # compiled (calmrun.wire.avrowrite), where the schema allows
        self._by_fingerprint: dict[bytes, tuple[str, Any]] = {}
        for schema in schemas:
            parsed: Any = fastavro.parse_schema(dict(schema))
            name = str(parsed["name"])
            fp = schema_fingerprint(schema)
            self._by_name[name] = (parsed, MARKER + fp)
            writer = compile_writer(dict(schema), models=models)
            if writer is not None:
                self._writers[name] = writer
            self._by_fingerprint[fp] = (name, parsed)
        for schema in readers:
            parsed = fastavro.parse_schema(dict(schema))
            self._by_fingerprint.setdefault(schema_fingerprint(schema), (str(parsed["name"]), parsed))

    @classmethod
    def from_package(cls) -> AvroCodec:
        """A codec for every ``.avsc`` shipped in ``calmrun/schemas``."""
        folder = resources.files("calmrun").joinpath("schemas")
        return cls(
            json.loads(entry.read_text())
            for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".avsc")
        )

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def header(self, name: str) -> bytes:
        """The 10 bytes every single object of schema ``name`` starts with (marker and fingerprint)."""
        return self._by_name[name][1]

    def schema(self, name: str) -> Any:
        """The parsed schema registered under ``name``."""
        return self._by_name[name][0]

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Encode ``record`` with the schema ``name`` as a single object.

        Raises:
            SerializationError: unknown schema name, or the record does not match the schema.
        """
        try:
            header = self._by_name[name][1]
        except KeyError:
            raise SerializationError(f"no Avro schema named {name!r}; known: {self.names}") from None
        writer = self._writers.get(name)
        if writer is not None:
            out = bytearray(header)
            try:
                writer(record, out)
                return bytes(out)
            except Unsure:  # a value the compiled writer does not take: fastavro writes or refuses it
                pass
        return self.encode_slow(name, record)

    def encode_model(self, name: str, record: object) -> bytes | None:
        """``record`` (an instance of a model given as ``models``) as the single object that ``encode`` writes
        for its dict, or None where the compiled writer does not take it (the caller then dumps it)."""
        writer = self._writers.get(name)
        if writer is None:
            return None
        out = bytearray(self._by_name[name][1])
        try:
            writer(record, out)
        except Unsure:
            return None
        return bytes(out)

    def encode_slow(self, name: str, record: Mapping[str, Any]) -> bytes:
        """``encode`` with fastavro alone (the reference the compiled writers are checked against)."""
        parsed, header = self._by_name[name]
        buf = io.BytesIO()
        buf.write(header)
        try:
            fastavro.schemaless_writer(buf, parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerializationError(f"record does not match Avro schema {name}: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Decode single-object bytes into (schema name, record).

        Raises:
            DecodeError: no marker, truncated or corrupt bytes.
            UnknownSchemaError: the fingerprint names no schema of this codec.
        """
        if len(data) < HEADER_SIZE:
            raise DecodeError(f"{len(data)} bytes is shorter than the 10-byte single-object header")
        if data[:2] != MARKER:
            raise DecodeError(f"no Avro single-object marker (starts with {data[:2].hex()})")
        fp = data[2:HEADER_SIZE]
        try:
            name, parsed = self._by_fingerprint[fp]
        except KeyError:
            raise UnknownSchemaError(fp) from None
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            record = fastavro.schemaless_reader(body, parsed, None)
        # Broad on purpose: on hostile bytes fastavro raises EOFError, ValueError, OverflowError,
        # IndexError, UnicodeDecodeError...; every one of them means these bytes are not this record.
        except Exception as exc:
            raise DecodeError(f"corrupt or truncated Avro body for {name}: {exc!r}") from exc
        if body.tell() != len(data):
            raise DecodeError(f"{len(data) - body.tell()} trailing bytes after the {name} record")
        if not isinstance(record, dict):
            raise DecodeError(f"{name} did not decode to a record")
        return name, record
