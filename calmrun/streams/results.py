"""Reading step results from the results topic: JSON (any client, kcat included) or Avro single-object.

A pool executor, calmrun's or anyone's, answers a task record with a ``StepResultRecord``. ``parse_result``
is total, as ``parse_request`` is: it returns a result or raises ``DecodeError`` (``LimitExceededError``
for a record over the limits), so the worker parks what it cannot read and goes on. An output that the
runtime could not store (over ``limits.max_output_bytes``, too deep) is not parked: it becomes a failed
attempt with ``InvalidOutputError``, as the same output from a local agent would, so the retry policy and
the model ladder apply.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from calmrun.errors import CalmrunError, DecodeError, ErrorKind, InvalidOutputError, LimitExceededError
from calmrun.limits import check_output
from calmrun.settings import LimitsSettings
from calmrun.streams.requests import DEFAULT_LIMITS, record_size
from calmrun.wire.codec import RecordCodec, is_avro
from calmrun.wire.jsonfield import loads
from calmrun.workflow.definition import describe_errors
from calmrun.workflow.events import StepResultRecord


def parse_result(
    key: bytes | None,
    value: bytes | None,
    codec: RecordCodec,
    *,
    limits: LimitsSettings = DEFAULT_LIMITS,
    headers: Sequence[tuple[str, bytes]] = (),
) -> StepResultRecord:
    """Decode a results-topic record.

    Raises:
        LimitExceededError: the record is bigger than a request and an output may be together.
        DecodeError: neither JSON nor known Avro, a body that does not validate, or a key that is not the
            result's run ID.
    """
    try:
        rec = _parse(value, codec, limits, record_size(key, value, headers))
    except CalmrunError:
        raise
    # Broad on purpose: bytes from any client; whatever fails is a DecodeError of that record.
    except Exception as exc:
        raise DecodeError(f"unexpected {type(exc).__name__} while decoding a step result: {exc}") from exc
    if key is not None and key != rec.run_id.encode():
        raise DecodeError(f"key {key[:100]!r} is not the result's run_id {rec.run_id!r}")
    if rec.output is not None:
        try:
            check_output(rec.output, limits, rec.pool or "a pool executor")
        except InvalidOutputError as exc:
            return rec.model_copy(
                update={
                    "output": None,
                    "error_type": ErrorKind.INVALID_OUTPUT.value,
                    "error": str(exc),
                    "retriable": True,
                }
            )
    return rec


def _parse(value: bytes | None, codec: RecordCodec, limits: LimitsSettings, size: int) -> StepResultRecord:
    if value is None:
        raise DecodeError("empty value (tombstone) on the results topic")
    maximum = limits.max_request_bytes + limits.max_output_bytes
    if size > maximum:
        raise LimitExceededError(
            "max_request_bytes + max_output_bytes", actual=size, maximum=maximum, what="step result"
        )
    if is_avro(value):
        return codec.decode_as(value, StepResultRecord)
    data = loads(
        value,
        max_depth=limits.max_json_depth,
        max_digits=limits.max_number_digits,
        what="step result (neither Avro single-object bytes nor JSON)",
    )
    if not isinstance(data, dict):
        raise DecodeError(f"a step result must be a JSON object, not {type(data).__name__}")
    try:
        return StepResultRecord.model_validate(data)
    except ValidationError as exc:
        raise DecodeError(f"invalid StepResultRecord: {describe_errors(exc, data)}") from exc
