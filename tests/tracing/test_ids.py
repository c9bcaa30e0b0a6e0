"""A run's trace identity and the traceparent header: pure functions, as tables."""

from __future__ import annotations

import pytest

from calmrun.tracing import SpanRef, parse_traceparent, run_ids


def test_a_runs_trace_is_the_same_everywhere_and_its_own_per_prefix() -> None:
    assert run_ids("calmrun", "run-1") == run_ids("calmrun", "run-1")
    assert run_ids("calmrun", "run-1") != run_ids("calmrun", "run-2")
    assert run_ids("calmrun", "run-1") != run_ids("shadow", "run-1")  # a replay into another prefix
    trace_id, span_id = run_ids("calmrun", "run-1")
    assert 0 < trace_id < 1 << 128 and 0 < span_id < 1 << 64


def test_traceparent_round_trips() -> None:
    ref = SpanRef(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True)
    assert ref.header() == b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(ref.header()) == ref
    assert parse_traceparent(SpanRef(1, 2, False).header()) == SpanRef(1, 2, False)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"garbage",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace ID
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span ID
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ],
)
def test_a_malformed_traceparent_is_ignored(value: bytes | None) -> None:
    assert parse_traceparent(value) is None
