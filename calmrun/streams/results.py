"""Reading step results from the results topic: JSON (any client, kcat included) or Avro single-object.

A pool executor, calmrun's or anyone's, answers a task record with a ``StepResultRecord``. ``parse_result``
is total, as ``parse_request`` is: it returns a result or raises ``DecodeError`` (``LimitExceededError``
for a record over the limits), so the worker parks what it cannot read and goes on; when
``named_attempt`` can still tell the run (and the attempt) it answers, that attempt fails at once too
(``streams.refusals``). An output that the runtime could not store (over ``limits.max_output_bytes``, too
deep) is not parked: it becomes a failed attempt with ``InvalidOutputError``, as the same output from a
local agent would, so the retry policy and the model ladder apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from calmrun.errors import CalmrunError, DecodeError, ErrorKind, InvalidOutputError, LimitExceededError
from calmrun.limits import check_output
from calmrun.settings import LimitsSettings
from calmrun.streams.requests import DEFAULT_LIMITS, MAX_ID_CHARS, record_size
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
    agent_of: Callable[[StepResultRecord], str | None] = lambda rec: None,
) -> StepResultRecord:
    """Decode a results-topic record.

    Args:
        agent_of: the agent of the result's step (from the run's definition), named by an invalid
            output's error; by default the result's ``cost.agent``, else its step.

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
            agent = agent_of(rec) or rec.cost.agent or f"(the agent of step {rec.step})"
            check_output(rec.output, limits, agent)
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


@dataclass(frozen=True)
class NamedAttempt:
    """What can still be read of a results record that is not a valid result: the attempt it answers.

    ``step`` or ``attempt`` is None when the record does not name it (the run's state may: see
    ``streams.intake``).
    """

    run_id: str
    workflow: str
    step: str | None
    attempt: int | None
    kind: Literal["run", "compensate"]


def named_attempt(
    key: bytes | None, value: bytes | None, limits: LimitsSettings = DEFAULT_LIMITS
) -> NamedAttempt | None:
    """The run (and step and attempt) a malformed result names, or None when no run can be read.

    The run is the body's ``run_id`` when the value is a JSON object that has one, else the record's
    key; a body and a key naming two different runs name none. Never raises.
    """
    data: object = None
    if value is not None and len(value) <= limits.max_request_bytes + limits.max_output_bytes:
        try:
            data = loads(value, max_depth=limits.max_json_depth, max_digits=limits.max_number_digits)
        except CalmrunError:
            data = None
    body = data if isinstance(data, dict) else {}
    try:
        key_id = key.decode() if key else None
    except UnicodeDecodeError:
        key_id = None

    def text(name: str) -> str | None:
        got = body.get(name)
        return got if isinstance(got, str) and 0 < len(got) <= MAX_ID_CHARS else None

    body_id = text("run_id")
    if body_id is not None and key_id is not None and body_id != key_id:
        return None
    run_id = body_id or key_id
    if run_id is None or len(run_id) > MAX_ID_CHARS:
        return None
    attempt = body.get("attempt")
    good_attempt = isinstance(attempt, int) and not isinstance(attempt, bool) and attempt >= 1
    return NamedAttempt(
        run_id=run_id,
        workflow=text("workflow") or "",
        step=text("step"),
        attempt=attempt if good_attempt else None,
        kind="compensate" if body.get("kind") == "compensate" else "run",
    )
