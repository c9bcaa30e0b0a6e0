"""Showing dead letters safely: any bytes become JSON (text, base64, decoded Avro) or an escaped preview.

A dead-letter record copies whatever a client sent, so its key, value and headers may be any bytes, and
the value of a quarantined run is Avro. ``entry_json`` turns a record of a dead-letter topic (a decodable
``DlqRecord`` or not) into plain JSON; ``entry_line`` into one line for a terminal.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from calmrun.errors import DecodeError
from calmrun.wire.avro import is_single_object
from calmrun.wire.codec import RecordCodec
from calmrun.wire.dlq import DlqRecord

PREVIEW_CHARS = 60


def bytes_json(data: bytes | None, codec: RecordCodec | None = None) -> dict[str, Any] | None:
    """``{"encoding": "utf-8" | "base64", "data": ..., "size": n}``, plus ``avro`` when it decodes.

    ``avro`` is ``{"schema": name, "record": {...}}`` for Avro single-object bytes of a known schema;
    for other Avro-marked bytes ``avro_error`` says why they did not decode.
    """
    if data is None:
        return None
    out: dict[str, Any] = {"size": len(data)}
    try:
        out |= {"encoding": "utf-8", "data": data.decode("utf-8")}
    except UnicodeDecodeError:
        out |= {"encoding": "base64", "data": base64.b64encode(data).decode("ascii")}
    if codec is not None and is_single_object(data):
        try:
            rec = codec.decode(data)
        except DecodeError as exc:
            out["avro_error"] = str(exc)
        else:
            out["avro"] = {"schema": type(rec).__name__, "record": jsonable(rec, codec)}
    return out


def jsonable(value: Any, codec: RecordCodec | None = None) -> Any:
    """``value`` (a record, or what it holds) as JSON-able data; bytes anywhere become ``bytes_json``."""
    if isinstance(value, BaseModel):
        return {k: jsonable(getattr(value, k), codec) for k in type(value).model_fields}
    if isinstance(value, bytes):
        return bytes_json(value, codec)
    if isinstance(value, dict):
        return {str(k): jsonable(v, codec) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, codec) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    return value


def entry_json(rec: DlqRecord | RawEntry, codec: RecordCodec) -> dict[str, Any]:
    """One dead-letter topic record as JSON: the ``DlqRecord``'s fields, or the raw record if not one."""
    if isinstance(rec, RawEntry):
        return {
            "undecodable": True,
            "error": rec.error,
            "topic": rec.topic,
            "partition": rec.partition,
            "offset": rec.offset,
            "key": bytes_json(rec.key, codec),
            "value": bytes_json(rec.value, codec),
            "headers": {k: bytes_json(v, codec) for k, v in rec.headers.items()},
        }
    data: dict[str, Any] = jsonable(rec, codec)
    return data


def preview(data: bytes | None, codec: RecordCodec | None = None) -> str:
    """A short, escaped, single-line view of ``data``: text in quotes, else bytes; Avro by its schema."""
    if data is None:
        return "null"
    if codec is not None and is_single_object(data):
        try:
            rec = codec.decode(data)
        except DecodeError:
            pass
        else:
            return f"avro:{type(rec).__name__}({len(data)} B)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        shown = repr(data[:PREVIEW_CHARS])
    else:
        shown = repr(text[:PREVIEW_CHARS])  # repr escapes control characters and lone surrogates
    more = f"...({len(data):,} B)" if len(data) > PREVIEW_CHARS else ""
    return shown + more


def entry_line(rec: DlqRecord | RawEntry, codec: RecordCodec, when: str) -> str:
    """One line for a terminal (plain text: escape it before handing it to a markup renderer)."""
    if isinstance(rec, RawEntry):
        return (
            f"undecodable dead letter {rec.topic}[{rec.partition}]@{rec.offset}: {rec.error[:200]}  "
            f"key={preview(rec.key)} value={preview(rec.value, codec)}"
        )
    cuts = "".join(f" cut:{c.field}={c.size:,}B/sha256:{c.sha256[:12]}" for c in rec.truncated)
    return (
        f"{when} {rec.reason} {rec.error_type}: {' '.join(rec.error[:200].split())}  "
        f"run={rec.run_id or '-'} step={rec.step or '-'} attempt={rec.attempt} "
        f"source={rec.source_topic}[{rec.source_partition}]@{rec.source_offset} "
        f"key={preview(rec.key)} value={preview(rec.value, codec)}{cuts}"
    )


@dataclass(frozen=True)
class RawEntry:
    """A record of a dead-letter topic that is not a decodable ``DlqRecord`` (written by someone else)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    error: str
