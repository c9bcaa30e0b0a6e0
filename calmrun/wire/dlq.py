"""The quarantine: what a dead-letter record holds, so an operator can see the cause and re-drive it.

A dead-letter record always fits its topic: ``DlqRecord.fitted`` cuts the copied key, headers and value
to a budget (``limits.dlq_max_payload_bytes``) and records, for each part it cut, the original length and
SHA-256. Error texts are capped too, so a record of any size, with any bytes, can be parked.
"""

from __future__ import annotations

import hashlib
import traceback
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_ERROR_CHARS = 2_000
MAX_TRACEBACK_CHARS = 8_000
MAX_KEY_BYTES = 1_024
MAX_HEADER_BYTES = 1_024
MAX_HEADER_NAME_CHARS = 256


class Cut(BaseModel):
    """One part of the original record that is stored shortened: what it was before the cut."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(description="key, value, headers.<name>, or headers (some headers dropped)")
    size: int = Field(description="original length in bytes")
    sha256: str = Field(description="hex SHA-256 of the original bytes")
    kept: int = Field(description="bytes kept (a prefix)")


class DlqRecord(BaseModel):
    """A record that could not be processed, or the task of a run quarantined after its last attempt.

    The original bytes, key and headers are kept as they were read, so a redrive can re-inject them;
    unless ``truncated`` lists a cut, in which case the record cannot be re-driven from here.
    """

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(description="poison (the record itself is bad) or quarantined (a run gave up)")
    error_type: str
    error: str
    traceback: str | None = None
    workflow: str | None = None
    run_id: str | None = None
    step: str | None = None
    attempt: int = 0
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: dict[str, bytes] = Field(default_factory=dict)
    at_ms: int
    truncated: list[Cut] = Field(
        default_factory=list, description="parts of the original record stored shortened"
    )

    @classmethod
    def poison(cls, rec: Any, exc: BaseException, workflow: str | None, at_ms: int) -> DlqRecord:
        """A consumed record (as aiokafka gives it) that cannot be processed at all, with its cause."""
        return cls(
            reason="poison",
            error_type=type(exc).__name__,
            error=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            workflow=workflow,
            source_topic=rec.topic,
            source_partition=rec.partition,
            source_offset=rec.offset,
            key=rec.key,
            value=rec.value,
            headers={k: v or b"" for k, v in rec.headers},  # a header's value may be null
            at_ms=at_ms,
        )

    def fitted(self, budget: int) -> DlqRecord:
        """This record with at most ``budget`` bytes of key + headers + value, and error texts capped.

        The key keeps up to 1 KiB, each header value up to 1 KiB (headers past a quarter of the budget
        are dropped), the value the rest; every cut is listed in ``truncated``.
        """
        cuts = list(self.truncated)
        key = _cut("key", self.key, min(MAX_KEY_BYTES, budget // 8), cuts)
        room = budget - len(key or b"")
        headers: dict[str, bytes] = {}
        header_room = budget // 4
        dropped = [(n, v) for n, v in self.headers.items()]
        while dropped:
            name, raw = dropped[0]
            short_name = _text(name)[:MAX_HEADER_NAME_CHARS]
            value = _cut(f"headers.{short_name}", raw or b"", MAX_HEADER_BYTES, cuts) or b""
            cost = len(short_name.encode()) + len(value)
            if cost > header_room:
                break
            dropped.pop(0)
            headers[short_name] = value
            header_room -= cost
            room -= cost
        if dropped:
            lost = b"".join(_text(n).encode() + b"\0" + (v or b"") + b"\0" for n, v in dropped)
            cuts.append(Cut(field="headers", size=len(lost), sha256=_sha(lost), kept=0))
        body = _cut("value", self.value, max(room, 0), cuts)
        return self.model_copy(
            update={
                "error_type": _text(self.error_type)[:200],
                "error": _text(self.error)[:MAX_ERROR_CHARS],
                "traceback": None if self.traceback is None else _text(self.traceback)[-MAX_TRACEBACK_CHARS:],
                "workflow": None if self.workflow is None else _text(self.workflow)[:200],
                "run_id": None if self.run_id is None else _text(self.run_id)[:MAX_KEY_BYTES],
                "step": None if self.step is None else _text(self.step)[:200],
                "key": key,
                "value": body,
                "headers": headers,
                "truncated": cuts,
            }
        )


def _cut(field: str, data: bytes | None, keep: int, cuts: list[Cut]) -> bytes | None:
    if data is None or len(data) <= keep:
        return data
    cuts.append(Cut(field=field, size=len(data), sha256=_sha(data), kept=keep))
    return data[:keep]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text(s: Any) -> str:
    """``s`` as text Avro can carry: lone surrogates become ``\\udxxx`` escapes."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")
