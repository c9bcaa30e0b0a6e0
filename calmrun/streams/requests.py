"""Reading run requests: JSON (any client, kcat included) or Avro single-object bytes.

``parse_request`` is total: whatever the key, value and headers, it returns a request or raises a
``DecodeError`` (``LimitExceededError`` when the record is over ``settings.limits``), so the worker can
park the record and go on; ``named`` reads whom a refused record was for, so the refusal can be recorded
under its run ID (``streams.refusals``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_json

from calmrun.errors import CalmrunError, DecodeError, LimitExceededError
from calmrun.settings import LimitsSettings
from calmrun.wire.codec import RecordCodec, is_avro
from calmrun.wire.jsonfield import check_value, loads
from calmrun.workflow.definition import describe_errors
from calmrun.workflow.events import RunCommand, RunRequest

DEFAULT_LIMITS = LimitsSettings()
MAX_ID_CHARS = 256
"""A run ID read from a record that is not a valid request is at most this long (else it is not read)."""
_FIELD = r'"{name}"\s*:\s*"([^"\\\x00-\x1f]{{1,{n}}})"'


@dataclass(frozen=True)
class Named:
    """What can still be read of a record that is not a valid request: whom its refusal is for."""

    run_id: str
    workflow: str = ""
    tenant: str = "default"


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> int:
    """Bytes of a record as the limits count them: key, value, header names and values."""
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(k.encode("utf-8", "surrogatepass")) + len(v or b"") for k, v in headers)
    )


def parse_request(
    key: bytes | None,
    value: bytes | None,
    codec: RecordCodec,
    *,
    fallback_id: str,
    limits: LimitsSettings = DEFAULT_LIMITS,
    headers: Sequence[tuple[str, bytes]] = (),
) -> tuple[str, RunRequest | RunCommand]:
    """Decode a requests-topic record into (run ID, request or command).

    The run ID is the record key, else the body's ``run_id``, else ``fallback_id`` (derived from the
    record's topic, partition and offset, so a re-delivered keyless request maps to the same run).

    Raises:
        LimitExceededError: the record is bigger than ``limits.max_request_bytes``, or its JSON is deeper
            than ``limits.max_json_depth`` or holds a number longer than ``limits.max_number_digits``.
        DecodeError: bytes that are neither valid JSON nor known Avro, or a body that does not validate.
    """
    try:
        return _parse(key, value, codec, fallback_id, limits, headers)
    except CalmrunError:
        raise
    # Broad on purpose: this reads bytes from any client; any failure to make a request of them is a
    # DecodeError of that record (the worker parks it), never an exception that stops the worker.
    except Exception as exc:
        raise DecodeError(f"unexpected {type(exc).__name__} while decoding a request: {exc}") from exc


def _parse(
    key: bytes | None,
    value: bytes | None,
    codec: RecordCodec,
    fallback_id: str,
    limits: LimitsSettings,
    headers: Sequence[tuple[str, bytes]],
) -> tuple[str, RunRequest | RunCommand]:
    if value is None:
        raise DecodeError("empty value (tombstone) on the requests topic")
    size = record_size(key, value, headers)
    if size > limits.max_request_bytes:
        raise LimitExceededError(
            "max_request_bytes", actual=size, maximum=limits.max_request_bytes, what="run request"
        )
    body: RunRequest | RunCommand
    if is_avro(value):
        rec = codec.decode(value)
        if not isinstance(rec, RunRequest | RunCommand):
            raise DecodeError(f"a {type(rec).__name__} is not a run request")
        if isinstance(rec, RunRequest):
            # the codec read the input at calmrun's ceilings; a request must also meet the configured limits
            check_value(
                rec.input,
                max_depth=limits.max_json_depth - 1,  # as in a JSON request, the body is one level
                max_digits=limits.max_number_digits,
                what="run input",
            )
        body = rec
    else:
        data = loads(
            value,
            max_depth=limits.max_json_depth,
            max_digits=limits.max_number_digits,
            what="run request (neither Avro single-object bytes nor JSON)",
        )
        if not isinstance(data, dict):
            raise DecodeError(f"a run request must be a JSON object, not {type(data).__name__}")
        model: type[RunRequest] | type[RunCommand] = RunCommand if "command" in data else RunRequest
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            why = describe_errors(exc, data, root="record")
            raise DecodeError(f"invalid {model.__name__}: {why}") from exc
    if isinstance(body, RunCommand) and body.data:
        # a signal's payload becomes a wait step's output: it is held to the outputs' limit
        size = len(to_json(body.data))
        if size > limits.max_output_bytes:
            raise LimitExceededError(
                "max_output_bytes", actual=size, maximum=limits.max_output_bytes, what="signal payload"
            )
    try:
        key_id = key.decode() if key else None
    except UnicodeDecodeError as exc:
        raise DecodeError("the record key is not UTF-8 text") from exc
    body_id = body.run_id
    if key_id and body_id and key_id != body_id:
        raise DecodeError(f"key {key_id!r} and run_id {body_id!r} differ")
    return key_id or body_id or fallback_id, body


def named(key: bytes | None, value: bytes | None, limits: LimitsSettings = DEFAULT_LIMITS) -> Named | None:
    """The run a refused requests-topic record names, if it can be read; None when it cannot.

    The run ID is the record's key when it is UTF-8 text (the key is the run ID, and it chose the
    partition); else the top-level ``run_id`` of a JSON object; else, for bytes that are not JSON (cut
    short, say), a ``"run_id": "..."`` found exactly once in them. ``workflow`` and ``tenant`` are read
    the same way, for the record of the refusal. Never raises.
    """
    data: dict[str, Any] = {}
    text = ""
    if value is not None and len(value) <= limits.max_request_bytes:
        text = value.decode("utf-8", errors="replace")
        try:
            parsed = loads(value, max_depth=limits.max_json_depth, max_digits=limits.max_number_digits)
        except CalmrunError:
            parsed = None
        if isinstance(parsed, dict):
            data, text = parsed, ""
    elif value is not None:  # over the limit: only its head is searched
        text = value[: limits.max_request_bytes].decode("utf-8", errors="replace")

    def read(name: str) -> str | None:
        if name in data:
            got = data[name]
            return got if isinstance(got, str) and 0 < len(got) <= MAX_ID_CHARS else None
        found = re.findall(_FIELD.format(name=name, n=MAX_ID_CHARS), text) if text else []
        return found[0] if len(found) == 1 else None

    try:
        key_id = key.decode() if key else None
    except UnicodeDecodeError:
        key_id = None
    run_id = key_id if key_id and len(key_id) <= MAX_ID_CHARS else read("run_id")
    if run_id is None:
        return None
    return Named(run_id, read("workflow") or "", read("tenant") or "default")
