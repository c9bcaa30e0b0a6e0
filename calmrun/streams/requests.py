"""Reading run requests: JSON (any client, kcat included) or Avro single-object bytes."""

from __future__ import annotations

import json

from pydantic import ValidationError

from calmrun.avro import is_single_object
from calmrun.codec import RecordCodec
from calmrun.errors import DecodeError
from calmrun.workflow.definition import describe_errors
from calmrun.workflow.events import RunCommand, RunRequest


def parse_request(
    key: bytes | None, value: bytes | None, codec: RecordCodec, *, fallback_id: str
) -> tuple[str, RunRequest | RunCommand]:
    """Decode a requests-topic record into (run ID, request or command).

    The run ID is the record key, else the body's ``run_id``, else ``fallback_id`` (derived from the
    record's topic, partition and offset, so a re-delivered keyless request maps to the same run).

    Raises:
        DecodeError: bytes that are neither valid JSON nor known Avro, or a body that does not validate.
    """
    if value is None:
        raise DecodeError("empty value (tombstone) on the requests topic")
    body: RunRequest | RunCommand
    if is_single_object(value):
        rec = codec.decode(value)
        if not isinstance(rec, RunRequest | RunCommand):
            raise DecodeError(f"a {type(rec).__name__} is not a run request")
        body = rec
    else:
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"neither Avro single-object bytes nor JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DecodeError(f"a run request must be a JSON object, not {type(data).__name__}")
        model: type[RunRequest] | type[RunCommand] = RunCommand if "command" in data else RunRequest
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            raise DecodeError(f"invalid {model.__name__}: {describe_errors(exc, data)}") from exc
    try:
        key_id = key.decode() if key else None
    except UnicodeDecodeError as exc:
        raise DecodeError("the record key is not UTF-8 text") from exc
    body_id = body.run_id
    if key_id and body_id and key_id != body_id:
        raise DecodeError(f"key {key_id!r} and run_id {body_id!r} differ")
    return key_id or body_id or fallback_id, body
