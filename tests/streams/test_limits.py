"""Limits in settings: their defaults and bounds, workflows refused at start, outputs failed per attempt."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import pytest

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext, execute
from calmrun.errors import ConfigError, LimitExceededError
from calmrun.limits import check_workflow
from calmrun.settings import load_settings
from calmrun.streams.requests import parse_request
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.wire.dlq import DlqRecord
from calmrun.wire.dlqview import entry_json, entry_line
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import StepTask
from tests.runtime_support import linear


def test_limits_come_from_the_environment_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALMRUN_LIMITS__MAX_JSON_DEPTH", "32")
    s = load_settings()
    assert s.limits.max_json_depth == 32
    assert s.limits.max_request_bytes == 262_144  # the defaults docs/limits.md lists
    monkeypatch.setenv("CALMRUN_LIMITS__MAX_JSON_DEPTH", "1000")  # past what Python can parse and write
    with pytest.raises(ConfigError, match="max_json_depth"):
        load_settings()


def test_workflows_over_the_limits_are_refused_at_start() -> None:
    s = load_settings(limits={"max_steps_per_run": 2})
    with pytest.raises(ConfigError, match="max_steps_per_run"):
        check_workflow(linear(steps=3), s)
    fan = parse_workflow(
        {
            "name": "fan",
            "steps": [
                {"name": "a", "agent": "x", "next": ["b", "c", "d"]},
                {"name": "b", "agent": "x"},
                {"name": "c", "agent": "x"},
                {"name": "d", "agent": "x"},
            ],
        }
    )
    with pytest.raises(ConfigError, match="max_fan_out"):
        check_workflow(fan, load_settings(limits={"max_fan_out": 2}))
    with pytest.raises(ConfigError, match="max_attempts_per_run"):
        check_workflow(
            linear(steps=3, retry={"max_attempts": 5}), load_settings(limits={"max_attempts_per_run": 10})
        )
    # a run state must fit one record: input + every step's output
    big = load_settings(limits={"max_output_bytes": 200_000})
    with pytest.raises(ConfigError, match="max_request_size"):
        check_workflow(linear(steps=5), big)
    assert check_workflow(
        linear(steps=5),
        load_settings(kafka={"max_request_size": 2_000_000}, limits={"max_output_bytes": 200_000}),
    )


def test_request_over_the_size_limit_is_refused_whatever_part_is_big() -> None:
    codec = RecordCodec(wire_models())
    limits = load_settings(limits={"max_request_bytes": 2_000}).limits
    body = b'{"workflow":"lin"}'
    for key, value, headers in [
        (b"k", body + b" " * 2_000, []),
        (b"k" * 2_000, body, []),
        (b"k", body, [("h", b"x" * 2_000)]),
    ]:
        with pytest.raises(LimitExceededError, match="max_request_bytes") as exc:
            parse_request(key, value, codec, fallback_id="f", limits=limits, headers=headers)
        assert exc.value.maximum == 2_000 and exc.value.actual > 2_000
    assert parse_request(b"k", body, codec, fallback_id="f", limits=limits)[0] == "k"


def test_dead_letter_cut_keeps_length_and_hash() -> None:
    value = bytes(range(256)) * 1000
    d = DlqRecord(
        reason="poison",
        error_type="X",
        error="e",
        source_topic="t",
        source_partition=0,
        source_offset=0,
        key=b"k" * 5000,
        value=value,
        headers={"a": b"1", "big": b"b" * 5000},
        at_ms=0,
    ).fitted(8192)
    assert [c.field for c in d.truncated] == ["key", "headers.big", "value"]
    v = d.truncated[-1]
    assert (v.size, v.sha256) == (len(value), hashlib.sha256(value).hexdigest())
    assert d.value == value[: v.kept]
    assert (
        len(d.key or b"") + len(d.value or b"") + sum(len(k) + len(x) for k, x in d.headers.items()) <= 8192
    )
    assert d.fitted(8192) == d  # fitting twice cuts nothing more


async def test_an_output_over_the_limit_fails_the_attempt_as_an_invalid_output() -> None:
    async def chatty(ctx: StepContext, item: dict[str, Any]) -> dict[str, Any]:
        return {"text": "x" * 12_000}

    task = StepTask(
        run_id="r",
        workflow="w",
        version="1",
        step="s",
        attempt=1,
        agent="chatty",
        issued_ms=0,
        timeout_s=5,
    )
    limits = load_settings(limits={"max_output_bytes": 10_000}).limits
    now = lambda: time.time_ns() // 1_000_000  # noqa: E731
    r = await execute(task, AgentRegistry({"chatty": chatty}), ModelRegistry({}), now_ms=now, limits=limits)
    assert (r.output, r.error_type, r.retriable) == (None, "InvalidOutputError", True)
    assert r.error and "max_output_bytes" in r.error
    ok = await execute(task, AgentRegistry({"chatty": chatty}), ModelRegistry({}), now_ms=now)
    assert ok.ok and ok.output == {"text": "x" * 12_000}  # under the default 16 KiB


def test_dlq_views_show_any_bytes_and_decode_known_avro() -> None:
    codec = RecordCodec(wire_models())
    task = StepTask(
        run_id="r", workflow="w", version="1", step="s", attempt=3, agent="a", issued_ms=0, timeout_s=5
    )
    d = DlqRecord(
        reason="quarantined",
        error_type="RuntimeError",
        error="[bold]not markup[/bold]\nsecond line",
        source_topic="t",
        source_partition=1,
        source_offset=-1,
        key=b"\xff\xfekey",
        value=codec.encode(task),
        headers={"calmrun-idempotency-key": b"r/s/run/3", "bin": b"\x00\xff"},
        at_ms=0,
    )
    view = json.loads(json.dumps(entry_json(d, codec)))
    assert view["key"] == {"size": 5, "encoding": "base64", "data": base64.b64encode(b"\xff\xfekey").decode()}
    assert view["value"]["encoding"] == "base64"
    assert view["value"]["avro"] == {"schema": "StepTask", "record": json.loads(task.model_dump_json())}
    assert view["headers"]["calmrun-idempotency-key"]["data"] == "r/s/run/3"
    assert view["headers"]["bin"]["encoding"] == "base64"
    line = entry_line(d, codec, "now")
    assert "key=b'\\xff\\xfekey'" in line and "value=avro:StepTask(" in line
    assert "\n" not in line
