"""The step contract's pieces without a broker: pools in definitions, pool topics, the result record."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from calmrun.errors import ConfigError, DecodeError, ErrorKind, LimitExceededError
from calmrun.kafka.topics import Topics
from calmrun.settings import LimitsSettings
from calmrun.streams.results import parse_result
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import StepCost, StepResult, StepResultRecord, StepTask
from tests.runtime_support import linear

CODEC = RecordCodec(wire_models())


def pooled(**pools: str) -> WorkflowDef:
    data = linear().model_dump(mode="json")
    for step in data["steps"]:
        step["pool"] = pools.get(step["name"], "default")
    return parse_workflow(data)


def test_a_step_names_its_pool_and_topics_follow_it() -> None:
    wf = pooled(s2="gpu")
    assert [s.pool for s in wf.steps] == ["default", "gpu", "default"]
    t = Topics("p")
    assert t.step_topics([wf], "gpu") == ["p.step.lin.s2"]
    assert t.step_topics([wf], "default") == ["p.step.lin.s1", "p.step.lin.s3"]
    assert len(t.step_topics([wf])) == 3
    assert t.results in t.all([wf])
    assert t.pool_group("gpu") == "p.pool.gpu"


def test_none_is_not_a_pool_name() -> None:
    with pytest.raises(ConfigError, match="'none' is not a pool name"):
        pooled(s2="none")


def result_json(**over: object) -> bytes:
    body = {"run_id": "r1", "workflow": "lin", "step": "s2", "attempt": 1, "output": {"n": 2}, **over}
    return json.dumps(body).encode()


def test_a_json_result_from_any_client_reads_as_the_attempts_result() -> None:
    rec = parse_result(b"r1", result_json(cost={"tokens_in": 3, "cost_usd": "0.01"}), CODEC)
    got = rec.to_input(at_ms=5)
    assert got == StepResult(
        run_id="r1",
        step="s2",
        attempt=1,
        at_ms=5,
        output={"n": 2},
        cost=StepCost(tokens_in=3, cost_usd=Decimal("0.01")),
    )
    assert rec.idempotency_key == "r1/s2/run/1"


def test_an_avro_result_round_trips() -> None:
    task = StepTask(
        run_id="r1", workflow="lin", version="1", step="s2", attempt=2, agent="a", issued_ms=1, timeout_s=1
    )
    res = StepResult("r1", "s2", 2, 9, error_type="Boom", error="no", retriable=False, traceback="tb")
    rec = StepResultRecord.of(task, res, "gpu")
    back = parse_result(b"r1", CODEC.encode(rec), CODEC)
    assert back == rec and not back.to_input(9).ok and back.pool == "gpu"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (b"r1", None, "tombstone"),
        (b"r1", b"\xff\xfe", "neither Avro"),
        (b"r1", b"[1]", "JSON object"),
        (b"r1", b'{"run_id": "r1"}', "invalid StepResultRecord"),
        (b"other", result_json(), "is not the result's run_id"),
    ],
)
def test_what_is_not_a_result_is_a_decode_error(key: bytes, value: bytes | None, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        parse_result(key, value, CODEC)


def test_an_output_over_the_limit_fails_the_attempt_instead_of_parking_it() -> None:
    limits = LimitsSettings(max_output_bytes=256)
    rec = parse_result(b"r1", result_json(output={"x": "y" * 300}), CODEC, limits=limits)
    assert rec.output is None and rec.error_type == ErrorKind.INVALID_OUTPUT and rec.retriable
    with pytest.raises(LimitExceededError):
        parse_result(b"r1", result_json(output={"x": "y" * 600_000}), CODEC)
