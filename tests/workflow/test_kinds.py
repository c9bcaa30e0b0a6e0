"""Step kinds as a discriminated union: ``kind`` picks the model (``agent`` when absent), each kind keeps
its own fields, and a definition written before kinds existed keeps its digest (runs stay pinned)."""

from __future__ import annotations

import pytest

from calmrun.errors import ConfigError
from calmrun.workflow.definition import AgentStep, StepDef, WorkflowDef, parse_workflow
from calmrun.workflow.kinds import ApprovalStep, WaitStep
from tests.workflow.test_decider_people import WF as PEOPLE


def test_kind_picks_the_model_and_agent_is_the_default() -> None:
    wf = parse_workflow(
        {
            "name": "k",
            "steps": [
                {"name": "a", "agent": "x", "next": "b"},
                {"name": "b", "kind": "approval", "next": "c"},
                {"name": "c", "kind": "wait", "signal": "go"},
            ],
        }
    )
    assert [type(s) for s in wf.steps] == [AgentStep, ApprovalStep, WaitStep]
    assert wf.step("a").kind == "agent" and wf.step("a").timeout_s == 30.0
    assert wf.step("b").timeout_s is None  # a wait without a timeout waits until answered
    assert parse_workflow(wf.model_dump(mode="json")) == wf


def test_stepdef_builds_the_kind_its_fields_name() -> None:
    assert type(StepDef(name="a", agent="x")) is AgentStep
    assert type(StepDef(name="w", kind="wait", signal="s")) is WaitStep
    with pytest.raises(ValueError, match="unknown step kind 'loopy'"):
        StepDef(name="w", kind="loopy")


def test_an_unknown_kind_is_refused_with_the_step_and_the_kinds() -> None:
    with pytest.raises(ConfigError, match=r"steps\[0\] \(w\): unknown step kind; kinds are agent"):
        parse_workflow({"name": "k", "steps": [{"name": "w", "kind": "loopy"}]})


def test_errors_name_the_field_not_the_union_tag() -> None:
    data = {
        "name": "k",
        "steps": [{"name": "w", "kind": "wait", "signal": "s", "retry": {"max_attempts": 0}}],
    }
    with pytest.raises(ConfigError) as info:
        parse_workflow(data)
    assert "steps[0] (w).retry.max_attempts" in str(info.value)


def test_definitions_written_before_kinds_keep_their_digest() -> None:
    """Digests printed by calmrun 0.3 (the flat StepDef) for the same definitions."""
    assert PEOPLE.digest == "6b8b4166724c"
    ladder = {
        "name": "o",
        "steps": [
            {
                "name": "a",
                "agent": "x",
                "models": ["c", "s"],
                "choose": {"cheapest_meeting": {"success_rate": 0.8}},
                "next": "w",
            },
            {"name": "w", "kind": "wait", "signal": "go"},
        ],
    }
    assert parse_workflow(ladder).digest == "f8220d5f7c0f"
    assert WorkflowDef.model_validate(ladder).digest == "f8220d5f7c0f"


# Written by calmrun 0.3 (before loops and maps): a run state with one step, and a step task.
STATE_03 = (
    "c30175dc639a5fa52725027202770231000e64656661756c740e72756e6e696e6700047b7d0202611273756363656564656404"
    "000000020e7b2278223a317d000000000000000000000000000000023000047b7d00"
)
TASK_03 = "c30182e30b86be9660b90272027702310261020672756e027800047b7d0e64656661756c74020000000000000840"


def test_records_written_before_loops_and_maps_still_decode() -> None:
    from calmrun.wire.codec import RecordCodec, wire_models
    from calmrun.workflow.events import StepTask
    from calmrun.workflow.state import RunState

    codec = RecordCodec(wire_models())
    state = codec.decode_as(bytes.fromhex(STATE_03), RunState)
    assert state.steps["a"].output == {"x": 1} and (state.steps["a"].iteration, state.steps["a"].map) == (
        0,
        None,
    )
    task = codec.decode_as(bytes.fromhex(TASK_03), StepTask)
    assert task.idempotency_key == "r/a/run/1" and (task.iteration, task.element) == (0, None)
