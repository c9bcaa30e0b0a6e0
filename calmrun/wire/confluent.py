"""Confluent's wire format: a zero byte, the registry's schema ID (4 bytes, big-endian), the Avro body.

This is what ``KafkaAvroSerializer`` writes and ``KafkaAvroDeserializer`` reads. The schema lives in the
registry under a subject named by the strategy in ``wire.registry.subject_strategy``; a reader fetches
the writer's schema by its ID and resolves it against calmrun's own (Avro schema resolution), so a
producer may write an older or newer compatible version of a calmrun record.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro

from calmrun.errors import DecodeError, RegistryError, SchemaIncompatibleError
from calmrun.wire.avro import schema_fingerprint
from calmrun.wire.registry import RegistryClient
from calmrun.wire.settings import SubjectStrategy, WireSettings

MAGIC = 0
HEADER_SIZE = 5
FRAMED = frozenset({"RunRequest", "RunCommand", "RunEvent", "StepTask", "StepResultRecord"})
"""The records others read and write, framed as ``wire.format`` says; state and dead letters are not."""


def is_confluent(data: bytes) -> bool:
    """True when ``data`` starts as Confluent's wire format does (a zero byte and a schema ID)."""
    return len(data) >= HEADER_SIZE and data[0] == MAGIC


def subject(strategy: SubjectStrategy, topic: str, full_name: str) -> str:
    """The subject a record of ``full_name`` written to ``topic`` is registered under (record values)."""
    if strategy == "TopicName":
        return f"{topic}-value"
    if strategy == "RecordName":
        return full_name
    return f"{topic}-{full_name}"


@dataclass(frozen=True)
class SubjectCheck:
    """One subject as ``calmrun topics create`` found it."""

    subject: str
    record: str
    rule: str
    problems: tuple[str, ...]
    schema_id: int | None


def check_subjects(
    framing: ConfluentFraming, framed: Mapping[str, Sequence[str]], schemas: Mapping[str, Mapping[str, Any]]
) -> list[SubjectCheck]:
    """Check each calmrun schema against the latest version of its subject, by the subject's rule, and
    register those that pass (when ``auto_register``) so that a producer that may not register finds them.

    Args:
        framed: topic -> the record names written there (``Topics.framed``).
        schemas: record name -> its Avro schema (``RecordCodec.schemas``).

    Raises:
        RegistryError: the registry did not answer or refused us (``RegistryAuthError``).
    """
    out: list[SubjectCheck] = []
    seen: set[tuple[str, str]] = set()
    for topic, names in framed.items():
        for name in names:
            full = f"{schemas[name].get('namespace')}.{name}"
            subj = framing.subject(topic, full)
            if (subj, name) in seen:
                continue
            seen.add((subj, name))
            text = json.dumps(schemas[name])
            problems = tuple(framing.registry.incompatibilities(subj, text))
            schema_id = None
            if not problems and framing.auto_register:
                try:
                    schema_id = framing.registry.register(subj, text)
                except SchemaIncompatibleError as exc:  # a rule the check endpoint did not apply
                    problems = tuple(exc.messages)
            out.append(SubjectCheck(subj, name, framing.registry.compatibility(subj), problems, schema_id))
    return out


class ConfluentFraming:
    """Schema IDs for writing and writer schemas for reading, through one registry, cached.

    Args:
        registry: the registry client.
        strategy: how subjects are named.
        auto_register: register a schema the first time it is written under a subject (else look it up:
            it must have been registered, by ``calmrun topics create`` or by hand).
        write: frame the records calmrun writes this way (``wire.format: confluent``); reading detects
            Confluent framing either way.
    """

    def __init__(
        self, registry: RegistryClient, strategy: SubjectStrategy, *, auto_register: bool, write: bool
    ) -> None:
        self.registry, self.strategy = registry, strategy
        self.auto_register, self.write = auto_register, write
        self._headers: dict[tuple[str, str], bytes] = {}
        self._writers: dict[int, tuple[str, Any, bool]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, wire: WireSettings) -> ConfluentFraming | None:
        """The framing ``wire`` configures, or None when no registry is configured."""
        reg = wire.registry
        if reg.url is None:
            return None
        return cls(
            RegistryClient(reg),
            reg.subject_strategy,
            auto_register=reg.auto_register,
            write=wire.format == "confluent",
        )

    def subject(self, topic: str, full_name: str) -> str:
        return subject(self.strategy, topic, full_name)

    def header(self, topic: str, full_name: str, schema: Mapping[str, Any]) -> bytes:
        """The 5 bytes a record of ``full_name`` written to ``topic`` starts with.

        Raises:
            RegistryError: the registry refused or did not answer (``SchemaIncompatibleError`` when the
                subject's compatibility rule refuses the schema).
        """
        key = (topic, full_name)
        found = self._headers.get(key)  # a dict read needs no lock; only writes take it
        if found is not None:
            return found
        text = json.dumps(schema)
        name = self.subject(topic, full_name)
        schema_id = (
            self.registry.register(name, text) if self.auto_register else self.registry.lookup(name, text)
        )
        found = bytes([MAGIC]) + schema_id.to_bytes(4, "big")
        with self._lock:
            self._headers[key] = found
        return found

    def read(self, data: bytes, readers: Mapping[str, tuple[Any, bytes]]) -> tuple[str, dict[str, Any]]:
        """Decode Confluent-framed ``data`` into (full name, record), resolved against calmrun's schema.

        Args:
            readers: full name -> (parsed reader schema, its single-object fingerprint).

        Raises:
            DecodeError: truncated or corrupt bytes, a schema ID the registry does not have, or a writer
                schema of a record calmrun does not know.
            RegistryError: the registry did not answer or refused us (not the record's fault).
        """
        if not is_confluent(data):
            raise DecodeError(f"no Confluent framing (starts with {data[:HEADER_SIZE].hex()})")
        schema_id = int.from_bytes(data[1:HEADER_SIZE], "big")
        name, writer, same = self._writer(schema_id, readers)
        reader = None if same else readers[name][0]
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            record = fastavro.schemaless_reader(body, writer, reader)
        # Broad on purpose, as in AvroCodec.decode: any failure on these bytes means they are not this record.
        except Exception as exc:
            raise DecodeError(
                f"corrupt or truncated Avro body for {name} (schema {schema_id}): {exc!r}"
            ) from exc
        if body.tell() != len(data):
            raise DecodeError(f"{len(data) - body.tell()} trailing bytes after the {name} record")
        if not isinstance(record, dict):
            raise DecodeError(f"{name} did not decode to a record")
        return name, record

    def _writer(self, schema_id: int, readers: Mapping[str, tuple[Any, bytes]]) -> tuple[str, Any, bool]:
        found = self._writers.get(schema_id)
        if found is not None:
            return found
        try:
            text = self.registry.schema(schema_id)
        except RegistryError as exc:
            if exc.status == 404:
                where = self.registry.url
                raise DecodeError(f"schema ID {schema_id} is not in the registry {where}") from exc
            raise
        try:
            raw = json.loads(text)
            writer: Any = fastavro.parse_schema(raw)
        except Exception as exc:  # the registry holds something that is not an Avro schema
            raise DecodeError(f"schema ID {schema_id} is not an Avro schema: {exc}") from exc
        name = str(writer.get("name", "")) if isinstance(writer, dict) else ""
        if name not in readers:
            raise DecodeError(f"schema ID {schema_id} is {name or 'not a record'}, not a calmrun record")
        same = schema_fingerprint(raw) == readers[name][1]
        found = (name, writer, same)
        with self._lock:
            self._writers[schema_id] = found
        return found
