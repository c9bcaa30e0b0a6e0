"""docs/step-contract.md says what the code does: its fingerprint code, its bytes, its result examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from calmrun.streams.results import parse_result
from calmrun.wire.avro import MARKER, schema_fingerprint
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import StepTask

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "step-contract.md").read_text()
CODEC = RecordCodec(wire_models())


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, flags=re.S)


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "schemas" / f"{name}.avsc").read_text())
    return loaded


def test_the_docs_crc64_avro_code_gives_the_fingerprints_calmrun_writes() -> None:
    from fastavro import parse_schema
    from fastavro.schema import to_parsing_canonical_form

    [code] = [b for b in blocks("python") if "def crc64_avro" in b]
    scope: dict[str, Any] = {}
    exec(code, scope)  # the doc's own code, as an implementer would copy it
    for name in ("step_task", "step_result_record"):
        canonical = to_parsing_canonical_form(parse_schema(schema(name), _write_hint=False)).encode()
        assert scope["crc64_avro"](canonical) == schema_fingerprint(schema(name))
        assert f"{name} {schema_fingerprint(schema(name)).hex()}" in DOC  # the listed fingerprints


def test_the_docs_task_bytes_are_what_calmrun_writes() -> None:
    task = StepTask(
        run_id="r1",
        workflow="lin",
        version="1",
        step="s2",
        attempt=1,
        agent="node:upper",
        input={"n": 1},
        issued_ms=1700000000000,
        timeout_s=30.0,
    )
    [dump] = re.findall(r"```\n(c3 01 [0-9a-f \n]*)```", DOC)
    assert bytes.fromhex(dump.replace("\n", " ")) == CODEC.encode(task)
    assert CODEC.encode(task)[:2] == MARKER


def test_the_docs_result_examples_are_results() -> None:
    examples = [json.loads(b) for b in blocks("json")]
    inline = re.findall(r"A failure: `(\{.*?\})`", DOC, flags=re.S)
    examples += [json.loads(i.replace("\n", " ")) for i in inline]
    assert len(examples) == 3
    for body in examples:
        rec = parse_result(body["run_id"].encode(), json.dumps(body).encode(), CODEC)
        assert rec.output is not None or rec.error_type is not None
