"""What the page sends for each action, and what it refuses before sending anything (a table, no Kafka)."""

from __future__ import annotations

from typing import Any

import pytest

from calmrun.ui.actions import Refused, command_for
from calmrun.workflow.state import RunState, StepState

GATE = {"step": "gate", "kind": "approval", "approvers": ["alice", "carol"], "signal": None}
PAY = {"step": "pay", "kind": "wait", "approvers": [], "signal": "paid"}


def state(status: str = "running", **steps: str) -> RunState:
    return RunState(
        run_id="r-1",
        workflow="hitl",
        version="1",
        status=status,  # type: ignore[arg-type]
        steps={name: StepState(status=st) for name, st in steps.items()},  # type: ignore[arg-type]
    )


def test_each_action_is_the_cli_command_with_the_users_name() -> None:
    waiting = state(gate="waiting", pay="waiting")
    approve = command_for("approve", {"step": "gate", "comment": " ok "}, waiting, "alice", [GATE, PAY])
    assert (approve.command, approve.step, approve.by, approve.comment) == ("approve", "gate", "alice", "ok")
    reject = command_for("reject", {"step": "gate", "comment": "dup"}, waiting, "carol", [GATE])
    assert (reject.command, reject.by, reject.comment) == ("reject", "carol", "dup")
    signal = command_for("signal", {"name": "paid", "data": {"amount": 3}}, waiting, "alice", [PAY])
    assert (signal.name, signal.data, signal.by) == ("paid", {"amount": 3}, "ui:alice")
    cancel = command_for("cancel", {"reason": "withdrawn"}, state("quarantined"), "bob", [])
    assert (cancel.reason, cancel.by, cancel.workflow) == ("withdrawn", "ui:bob", "hitl")
    anyone = {**GATE, "approvers": []}
    assert command_for("approve", {"step": "gate"}, waiting, "zed", [anyone]).by == "zed"


@pytest.mark.parametrize(
    ("kind", "body", "st", "user", "status", "why"),
    [
        ("reject", {"step": "gate", "comment": "  "}, state(gate="waiting"), "alice", 400, "needs a comment"),
        ("approve", {"step": "gate"}, state(gate="waiting"), "bob", 403, "approvers are alice, carol"),
        ("approve", {"step": "gate"}, state(gate="succeeded"), "alice", 409, "not waiting"),
        ("approve", {"step": "nope"}, state(gate="waiting"), "alice", 409, "it is not started"),
        ("approve", {}, state(gate="waiting"), "alice", 400, "step is required"),
        ("approve", {"step": "pay"}, state(pay="waiting"), "alice", 409, "waits for the signal 'paid'"),
        ("signal", {"name": "paid", "data": [1]}, state(pay="waiting"), "alice", 400, "JSON object"),
        ("signal", {"name": "paid"}, state("completed"), "alice", 409, "is completed"),
        ("signal", {"data": {}}, state(pay="waiting"), "alice", 400, "name is required"),
        ("cancel", {"reason": ""}, state(), "alice", 400, "reason is required"),
        ("cancel", {"reason": "x"}, state("cancelled"), "alice", 409, "nothing to cancel"),
        ("migrate", {}, state(), "alice", 400, "unknown action 'migrate'"),
    ],
)
def test_refused_before_anything_is_sent(
    kind: str, body: dict[str, Any], st: RunState, user: str, status: int, why: str
) -> None:
    with pytest.raises(Refused, match=why) as info:
        command_for(kind, body, st, user, [GATE, PAY])
    assert info.value.status == status
