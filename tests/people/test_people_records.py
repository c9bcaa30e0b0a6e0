"""The approve/reject/signal/cancel records as any Kafka client sends them (docs/people.md), and Avro."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calmrun.errors import DecodeError, LimitExceededError
from calmrun.settings import LimitsSettings
from calmrun.streams.requests import parse_request
from calmrun.wire.avro import AvroCodec
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import (
    Answer,
    CancelRequested,
    RunCommand,
    SignalReceived,
    command_input,
)

CODEC = RecordCodec(wire_models())
DOCUMENTED = {
    "approve": {
        "command": "approve",
        "run_id": "run-42",
        "workflow": "triage",
        "step": "approve_refund",
        "by": "finance-lead",
        "comment": "ok",
    },
    "reject": {
        "command": "reject",
        "run_id": "run-42",
        "workflow": "triage",
        "step": "approve_refund",
        "by": "support-lead",
    },
    "signal": {
        "command": "signal",
        "run_id": "run-42",
        "workflow": "triage",
        "name": "paid",
        "data": {"amount": "119.00"},
        "by": "psp",
    },
    "cancel": {
        "command": "cancel",
        "run_id": "run-42",
        "workflow": "triage",
        "reason": "customer withdrew",
        "by": "ops",
    },
}


DEFAULTS = LimitsSettings()


def parse(value: bytes, limits: LimitsSettings = DEFAULTS) -> RunCommand:
    run_id, body = parse_request(b"run-42", value, CODEC, fallback_id="x", limits=limits)
    assert run_id == "run-42" and isinstance(body, RunCommand)
    return body


@pytest.mark.parametrize("kind", list(DOCUMENTED))
def test_the_readme_records_parse_to_their_decider_inputs(kind: str) -> None:
    cmd = parse(json.dumps(DOCUMENTED[kind]).encode())
    inp = command_input("run-42", cmd, 7)
    expected = {
        "approve": Answer("run-42", "approve_refund", True, 7, "finance-lead", "ok"),
        "reject": Answer("run-42", "approve_refund", False, 7, "support-lead", None),
        "signal": SignalReceived("run-42", "paid", 7, {"amount": "119.00"}, "psp"),
        "cancel": CancelRequested("run-42", 7, "customer withdrew", "ops"),
    }[kind]
    assert inp == expected
    assert parse(CODEC.encode(cmd)) == cmd  # and the same command as Avro single-object bytes


OLD_SCHEMA = {  # schemas/run_command.avsc before approve/reject/signal/cancel
    "type": "record",
    "name": "RunCommand",
    "namespace": "io.calmrun",
    "fields": [
        {"name": "command", "type": "string"},
        {"name": "run_id", "type": "string"},
        {"name": "workflow", "type": "string"},
        {"name": "by", "type": ["null", "string"], "default": None},
    ],
}


def test_a_redrive_written_before_the_new_fields_still_decodes() -> None:
    old = AvroCodec([OLD_SCHEMA]).encode(
        "io.calmrun.RunCommand", {"command": "redrive", "run_id": "run-42", "workflow": "triage", "by": "ops"}
    )
    assert parse(old) == RunCommand(command="redrive", run_id="run-42", workflow="triage", by="ops")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"command": "approve", "run_id": "run-42", "workflow": "triage"}, "approve needs `step`"),
        ({"command": "signal", "run_id": "run-42", "workflow": "triage"}, "signal needs `name`"),
        ({"command": "pause", "run_id": "run-42", "workflow": "triage"}, "command"),
    ],
)
def test_a_command_missing_its_field_is_a_clear_decode_error(body: dict[str, object], fragment: str) -> None:
    with pytest.raises(DecodeError, match=fragment):
        parse(json.dumps(body).encode())


def test_a_signal_payload_is_held_to_the_output_limit() -> None:
    big = {**DOCUMENTED["signal"], "data": {"blob": "x" * 2000}}
    with pytest.raises(LimitExceededError, match=r"signal payload is over limits\.max_output_bytes"):
        parse(json.dumps(big).encode(), LimitsSettings(max_output_bytes=1024))


def test_the_signal_verb_refuses_a_bad_payload_before_connecting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from calmrun.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["signal", "run-42", "paid", "--data", "[1, 2]"])
    assert listed.exit_code == 2 and "must be a JSON object, not list" in listed.output
    broken = runner.invoke(app, ["signal", "run-42", "paid", "--data", "{nope"])
    assert broken.exit_code == 2 and "--data is not JSON" in broken.output
    missing = runner.invoke(app, ["signal", "run-42", "paid", "--data", f"@{tmp_path}/none.json"])
    # the console wraps a long path at 80 columns without a terminal: compare without the line breaks
    assert missing.exit_code == 2 and "none.json" in "".join(missing.output.split())
