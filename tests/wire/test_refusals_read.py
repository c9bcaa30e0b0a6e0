"""Whom a refused record is for, read without a broker: the run ID of a bad request, the attempt of a bad
result, the rejected run's history, and the checker's verdict on it."""

from __future__ import annotations

import json

import pytest

from calmrun.check.invariants import Rule, check_run
from calmrun.settings import LimitsSettings
from calmrun.streams.requests import Named, named
from calmrun.streams.results import NamedAttempt, named_attempt, parse_result
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent
from calmrun.workflow.rejection import rejected
from tests.runtime_support import linear

CODEC = RecordCodec(wire_models())


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (b"k1", b"\xff\xfe garbage", Named("k1")),  # the key is the run ID
        (b"k1", b'{"workflow": "w", "run_id": "other"}', Named("k1", "w")),  # even when the body differs
        (None, b'{"workflow": "w", "run_id": "r1", "tenant": "t", "x": 1}', Named("r1", "w", "t")),
        (None, b'{"workflow": "w", "run_id": "r1", "input": {"n": ', Named("r1", "w")),  # cut short
        (None, b'{"run_id": "r1", "input": {"run_id": "r2", ', None),  # two run IDs: none is read
        (None, b"[1, 2]", None),
        (None, None, None),
        (b"\xff\xfe", b'{"run_id": "r1"}', Named("r1")),  # a key that is not text: the body's
        (b"k" * 300, b"{}", None),  # an ID too long to be one
        (None, b'{"run_id": "r1", "pad": "' + b"a" * 300_000 + b'"}', Named("r1")),  # over the limit
    ],
)
def test_the_run_id_of_a_refused_request(
    key: bytes | None, value: bytes | None, expected: Named | None
) -> None:
    assert named(key, value) == expected


def result(**body: object) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (b"r1", b"{not json", NamedAttempt("r1", "", None, None, "run")),
        (None, result(run_id="r1", workflow="w", attempt=2), NamedAttempt("r1", "w", None, 2, "run")),
        (
            b"r1",
            result(run_id="r1", step="s", attempt=1, kind="compensate", output=[1]),
            NamedAttempt("r1", "", "s", 1, "compensate"),
        ),
        (b"r1", result(run_id="r1", step="s", attempt="1"), NamedAttempt("r1", "", "s", None, "run")),
        (b"r1", result(run_id="r2", step="s", attempt=1), None),  # key and body name two runs
        (None, b"{not json", None),
    ],
)
def test_the_attempt_a_malformed_result_answers(
    key: bytes | None, value: bytes, expected: NamedAttempt | None
) -> None:
    assert named_attempt(key, value) == expected


def test_an_output_over_the_limit_names_the_agent_not_the_pool() -> None:
    limits = LimitsSettings(max_output_bytes=256)
    value = result(run_id="r1", workflow="lin", step="s2", attempt=1, pool="gpu", output={"x": "y" * 300})
    rec = parse_result(b"r1", value, CODEC, limits=limits, agent_of=lambda r: "add_one")
    assert rec.error is not None and rec.error.startswith("agent 'add_one': invalid output")
    assert "gpu" not in rec.error


def test_a_run_id_whose_only_record_is_its_rejection_passes_the_checker() -> None:
    state, event = rejected("r1", workflow="nope", tenant="t", at_ms=5, error_type="E", error="why")
    assert state.is_terminal() and (state.status, state.seq, event.seq) == ("rejected", 0, -1)
    assert event.type == "run.rejected" and event.data == {"error_type": "E", "error": "why"}
    assert check_run("r1", [event], state, 0, [linear()]) == ([], 0, False)
    note = RunEvent(run_id="r1", seq=-1, type="input.ignored", at_ms=9, workflow="lin")
    assert check_run("r1", [event, note], state, 0, [linear()]) == ([], 0, False)
    # a rejected state is never the state of a history
    after = RunEvent(run_id="r1", seq=1, type="run.requested", at_ms=9, workflow="lin")
    violations, _, _ = check_run("r1", [event, after], state, 0, [linear()])
    assert {v.rule for v in violations} == {Rule.STATE}
