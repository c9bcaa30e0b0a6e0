"""The Avro contracts in schemas/ and the pydantic models are the same thing, and round-trip real records."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path

import fastavro

from calmrun.wire.avro import MARKER, AvroCodec, schema_fingerprint
from calmrun.wire.codec import RecordCodec, wire_models, write_schemas
from calmrun.wire.dlq import DlqRecord
from calmrun.workflow.events import RunEvent, RunRequest, StepCost, StepTask
from calmrun.workflow.state import RunState, StepState

ROOT = Path(__file__).resolve().parents[2]


def test_committed_schemas_match_the_models(tmp_path: Path) -> None:
    written = write_schemas(tmp_path)
    for path in written:
        committed = ROOT / "schemas" / path.name
        assert committed.exists(), (
            f"{path.name} missing from schemas/: run python -m calmrun.wire.codec schemas"
        )
        assert json.loads(committed.read_text()) == json.loads(path.read_text()), (
            f"schemas/{path.name} drifted from its pydantic model: run python -m calmrun.wire.codec schemas"
        )
    assert {p.name for p in written} == {p.name for p in (ROOT / "schemas").glob("*.avsc")}


def test_package_ships_the_schemas() -> None:
    codec = AvroCodec.from_package()
    assert {n.split(".")[-1] for n in codec.names} == {m.__name__ for m in wire_models()}


def test_records_round_trip() -> None:
    codec = RecordCodec(wire_models())
    records = [
        RunRequest(workflow="w", input={"a": [1, 2, {"b": None}]}, run_id="r", budget_usd=Decimal("1.50")),
        RunEvent(
            run_id="r",
            seq=3,
            type="step.succeeded",
            at_ms=5,
            workflow="w",
            step="s",
            attempt=1,
            data={"output": {"x": "é"}},
            cost=StepCost(tokens_in=3, cost_usd=Decimal("0.000001")),
        ),
        StepTask(
            run_id="r",
            workflow="w",
            version="1",
            step="s",
            attempt=2,
            agent="m:f",
            input={"q": 1},
            issued_ms=9,
            timeout_s=1.5,
        ),
        RunState(
            run_id="r", workflow="w", version="1", steps={"s": StepState(status="succeeded", output={})}
        ),
        DlqRecord(
            reason="poison",
            error_type="DecodeError",
            error="bad",
            source_topic="t",
            source_partition=0,
            source_offset=7,
            key=None,
            value=b"\xff\x00",
            headers={"h": b"\x01"},
            at_ms=1,
        ),
    ]
    for rec in records:
        assert codec.decode(codec.encode(rec)) == rec


def test_dead_letters_written_before_the_truncated_field_still_decode() -> None:
    """Quarantine topics keep records forever: those of the schema before ``truncated`` must stay readable."""
    codec = RecordCodec(wire_models())
    schema = dict(codec.schemas()["DlqRecord"])
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "truncated"]
    assert schema_fingerprint(schema).hex() == "d2076863d255fb92"  # what calmrun wrote until this change
    old = {
        "reason": "poison",
        "error_type": "DecodeError",
        "error": "bad",
        "traceback": None,
        "workflow": None,
        "run_id": None,
        "step": None,
        "attempt": 0,
        "source_topic": "t",
        "source_partition": 0,
        "source_offset": 3,
        "key": None,
        "value": b"\xff",
        "headers": {},
        "at_ms": 1,
    }
    buf = io.BytesIO()
    buf.write(MARKER + schema_fingerprint(schema))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), old)
    rec = codec.decode_as(buf.getvalue(), DlqRecord)
    assert (rec.value, rec.source_offset, rec.truncated) == (b"\xff", 3, [])
