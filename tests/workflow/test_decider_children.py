"""Child workflows (``kind: workflow``): the parent starts a run of its own, waits durably, routes on its
end; cancel cascades; the child's cost rolls up; a child's end delivered twice or after the parent's
cancel converges. Parent and child are decided here by hand: what one decision writes to the requests
topic is fed to the other, as the worker does."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calmrun.errors import ConfigError, ErrorKind
from calmrun.workflow.decider import Decision, decide
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import (
    CancelRequested,
    DeciderInput,
    RunCommand,
    RunRequest,
    RunRequested,
    StepCost,
    StepResult,
    command_input,
)
from calmrun.workflow.history import fold, inputs_from_events
from calmrun.workflow.registry import check_children
from calmrun.workflow.state import RunState

PARENT = parse_workflow(
    {
        "name": "invoice",
        "outcomes": ["paid", "disputed", "stuck"],
        "steps": [
            {"name": "check", "agent": "c", "next": "fraud"},
            {
                "name": "fraud",
                "kind": "workflow",
                "workflow": "fraud",
                "input": {"amount": "steps.check.amount"},
                "on_failure": "end:stuck",
                "branches": [{"when": {"field": "outcome", "value": "cleared"}, "goto": "end:paid"}],
                "next": "end:disputed",
            },
        ],
    }
)
CHILD = parse_workflow(
    {
        "name": "fraud",
        "outcomes": ["cleared", "flagged"],
        "steps": [
            {
                "name": "score",
                "agent": "s",
                "retry": {"max_attempts": 1},
                "branches": [{"when": {"field": "risk", "op": "lt", "value": 0.5}, "goto": "end:cleared"}],
                "next": "end:flagged",
            }
        ],
    }
)
WFS = {"invoice": PARENT, "fraud": CHILD}


class Runs:
    """Runs of several workflows, fed one input at a time; the requests decisions write are queued."""

    def __init__(self) -> None:
        self.states: dict[str, RunState] = {}
        self.events: dict[str, list[Any]] = {}
        self.outbox: list[RunRequest | RunCommand] = []
        self.at = 1000

    def feed(self, wf: WorkflowDef, inp: DeciderInput) -> Decision:
        self.at += 10
        d = decide(wf, self.states.get(inp.run_id), inp)
        if d.ignored is None:
            assert d.state is not None
            self.states[inp.run_id] = d.state
            self.events.setdefault(inp.run_id, []).extend(d.events)
            self.outbox.extend(d.requests)
        return d

    def deliver(self) -> list[Decision]:
        """Decide every queued request, as the intake would."""
        out = []
        while self.outbox:
            rec = self.outbox.pop(0)
            if isinstance(rec, RunRequest):
                assert rec.run_id is not None
                inp: DeciderInput = RunRequested(
                    rec.run_id, rec.workflow, rec.input, self.at, rec.tenant, parent=rec.parent
                )
                out.append(self.feed(WFS[rec.workflow], inp))
            else:
                state = self.states.get(rec.run_id)
                wf = WFS[state.workflow if state else rec.workflow]
                out.append(self.feed(wf, command_input(rec.run_id, rec, self.at)))
        return out

    def result(
        self,
        run_id: str,
        step: str,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        usd: str = "0",
    ) -> Decision:
        s = self.states[run_id]
        cost = StepCost(cost_usd=Decimal(usd))
        inp = StepResult(
            run_id,
            step,
            s.steps[step].attempt,
            self.at,
            output=output,
            error_type=error,
            error=error,
            retriable=False,
            cost=cost,
        )
        return self.feed(WFS[s.workflow], inp)


def start(amount: int = 10) -> Runs:
    r = Runs()
    r.feed(PARENT, RunRequested("p1", "invoice", {}, 1000))
    r.result("p1", "check", {"amount": amount}, usd="0.01")
    return r


def test_the_parent_starts_a_child_with_a_derived_id_and_waits_for_it() -> None:
    r = start()
    (req,) = r.outbox
    assert isinstance(req, RunRequest) and (req.run_id, req.workflow, req.input) == (
        "p1.fraud",
        "fraud",
        {"amount": 10},
    )
    assert req.parent == {"run_id": "p1", "workflow": "invoice", "step": "fraud"}
    assert r.states["p1"].steps["fraud"].status == "waiting"
    r.deliver()
    child = r.states["p1.fraud"]
    assert (
        child.parent == {"run_id": "p1", "workflow": "invoice", "step": "fraud"} and child.status == "running"
    )
    r.result("p1.fraud", "score", {"risk": 0.1}, usd="0.25")
    r.deliver()
    parent = r.states["p1"]
    assert (parent.status, parent.outcome) == ("completed", "paid")
    assert parent.steps["fraud"].output == {
        "run_id": "p1.fraud",
        "status": "completed",
        "outcome": "cleared",
        "outputs": {"score": {"risk": 0.1}},
    }
    assert parent.spent_usd == Decimal("0.26")  # the child's cost rolled up
    for run_id, wf in (("p1", PARENT), ("p1.fraud", CHILD)):
        assert fold(wf, inputs_from_events(r.events[run_id])) == (r.states[run_id], r.events[run_id])


def test_a_failed_child_takes_on_failure_or_quarantines_the_parent() -> None:
    r = start()
    r.deliver()
    r.result("p1.fraud", "score", error="Down")
    r.deliver()
    assert r.states["p1.fraud"].status == "quarantined"
    assert (r.states["p1"].status, r.states["p1"].outcome) == ("completed", "stuck")
    strict = parse_workflow(
        {
            **PARENT.model_dump(mode="json"),
            "steps": [
                PARENT.steps[0].model_dump(mode="json"),
                {**PARENT.steps[1].model_dump(mode="json"), "on_failure": None},
            ],
        }
    )
    WFS["invoice"] = strict
    try:
        r2 = Runs()
        r2.feed(strict, RunRequested("p2", "invoice", {}, 1000))
        r2.result("p2", "check", {"amount": 1})
        r2.deliver()
        r2.result("p2.fraud", "score", error="Down")
        r2.deliver()
        assert (
            r2.states["p2"].status == "quarantined" and r2.states["p2"].error_type == ErrorKind.CHILD_FAILED
        )
    finally:
        WFS["invoice"] = PARENT


def test_cancel_of_the_parent_cancels_the_child_and_a_late_end_is_ignored() -> None:
    r = start()
    r.deliver()
    r.feed(PARENT, CancelRequested("p1", r.at, "withdrawn"))
    assert r.states["p1"].status == "cancelled"
    (cancel,) = r.outbox
    assert isinstance(cancel, RunCommand) and (cancel.command, cancel.run_id) == ("cancel", "p1.fraud")
    done = r.deliver()
    assert r.states["p1.fraud"].status == "cancelled"
    # the child's end reaches a parent that no longer waits: ignored, nothing changes
    assert [d.ignored is not None for d in done[1:]] == [True]
    assert r.states["p1"].status == "cancelled"


@settings(max_examples=60, deadline=None)
@given(twice=st.booleans(), cancel_first=st.booleans(), risk=st.floats(0, 1))
def test_a_child_end_delivered_twice_or_after_cancel_converges(
    twice: bool, cancel_first: bool, risk: float
) -> None:
    r = start()
    r.deliver()
    r.result("p1.fraud", "score", {"risk": risk})
    tell = list(r.outbox)
    if cancel_first:
        r.feed(PARENT, CancelRequested("p1", r.at, "withdrawn"))
    r.deliver()
    if twice:
        r.outbox.extend(tell)
        assert all(d.ignored is not None for d in r.deliver())
    parent = r.states["p1"]
    assert parent.is_terminal()
    assert parent.status == ("cancelled" if cancel_first else "completed")
    assert fold(PARENT, inputs_from_events(r.events["p1"])) == (parent, r.events["p1"])


def test_child_workflows_not_served_or_in_a_circle_are_refused() -> None:
    with pytest.raises(ConfigError, match="step 'fraud' workflow: 'fraud' is not served"):
        check_children([PARENT])
    loop = parse_workflow(
        {"name": "fraud", "steps": [{"name": "again", "kind": "workflow", "workflow": "invoice"}]}
    )
    with pytest.raises(ConfigError, match="circle: fraud -> invoice -> fraud"):
        check_children([PARENT, loop])
    check_children([PARENT, CHILD])


def test_status_links_parent_and_children() -> None:
    from calmrun.cli.runs import family_lines

    r = start()
    r.deliver()
    assert family_lines(r.states["p1.fraud"], r.events["p1.fraud"]) == ["child of p1 (invoice, step fraud)"]
    assert family_lines(r.states["p1"], r.events["p1"]) == [
        "children: p1.fraud (fraud); spent $0.01 with theirs"
    ]
