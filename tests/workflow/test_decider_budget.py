"""Budgets, model escalation, Retry-After and history replay in the pure decider (no Kafka)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from calmrun.workflow.decider import Decision, decide
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequested, StepCost, StepResult, TimerFired
from calmrun.workflow.history import fold, inputs_from_events
from calmrun.workflow.state import RunState


def wf(**step: Any) -> Any:
    return parse_workflow(
        {
            "name": "w",
            "steps": [
                {
                    "name": "a",
                    "agent": "x",
                    "next": "b",
                    "retry": {"max_attempts": 2, "initial_backoff_s": 1},
                    **step,
                },
                {"name": "b", "agent": "x"},
            ],
        }
    )


class Run:
    def __init__(self, definition: Any, **req: Any) -> None:
        self.wf = definition
        self.events: list[Any] = []
        self.d = self.apply(RunRequested("r", "w", {}, 0, **req))

    def apply(self, inp: Any) -> Decision:
        self.d = decide(self.wf, getattr(self, "s", None), inp)
        if not self.d.ignored:
            self.s: RunState | None = self.d.state
            self.events += self.d.events
        return self.d

    def result(self, step: str, attempt: int, at: int, cost: str = "0", **kw: Any) -> Decision:
        return self.apply(StepResult("r", step, attempt, at, cost=StepCost(cost_usd=Decimal(cost)), **kw))


def test_invalid_output_escalates_at_once_then_retries_then_quarantines() -> None:
    run = Run(wf(models=["cheap", "smart"]))
    assert [t.model for t in run.d.tasks] == ["cheap"]
    d = run.result("a", 1, 10, error_type="InvalidOutputError", error="bad json")
    esc = [e for e in d.events if e.type == "step.escalated"]
    assert esc[0].data["from"] == "cheap" and esc[0].data["to"] == "smart"
    assert esc[0].data["reason"] == "invalid_output"
    assert [(t.attempt, t.model) for t in d.tasks] == [(2, "smart")]
    d = run.result("a", 2, 20, error_type="InvalidOutputError", error="bad again")
    assert [e.type for e in d.events][-1] == "step.retry_scheduled"  # no model left: the retry policy
    run.apply(TimerFired("r", 5000))
    d = run.result("a", 3, 5100, error_type="InvalidOutputError", error="still bad")
    assert run.s is not None and run.s.status == "quarantined"
    assert d.quarantine is not None and d.quarantine.error_type == "InvalidOutputError"


def test_low_confidence_escalates_and_the_last_model_is_accepted() -> None:
    run = Run(wf(models=["cheap", "smart"], confidence_field="confidence", min_confidence=0.7))
    d = run.result("a", 1, 10, output={"confidence": 0.3, "label": "x"})
    assert [e.type for e in d.events] == ["step.succeeded", "step.escalated", "step.scheduled"]
    assert d.events[1].data["confidence"] == 0.3
    d = run.result("a", 2, 20, output={"confidence": 0.3, "label": "y"})
    assert run.s is not None and run.s.steps["a"].status == "succeeded"
    assert run.s.steps["a"].output == {"confidence": 0.3, "label": "y"}
    assert run.s.steps["a"].model == "smart"


def test_exhausted_retries_escalate_with_a_fresh_budget() -> None:
    run = Run(wf(models=["cheap", "smart"]))
    run.result("a", 1, 10, error_type="RuntimeError", error="boom")
    run.apply(TimerFired("r", 5000))
    d = run.result("a", 2, 5010, error_type="RuntimeError", error="boom")
    assert [e.data.get("reason") for e in d.events if e.type == "step.escalated"] == ["exhausted"]
    assert [(t.attempt, t.model) for t in d.tasks] == [(3, "smart")]
    assert run.s is not None and run.s.steps["a"].retry_base == 2


def test_escalate_on_can_turn_immediate_escalation_off() -> None:
    run = Run(wf(models=["cheap", "smart"], escalate_on=["exhausted"]))
    d = run.result("a", 1, 10, error_type="InvalidOutputError", error="bad")
    assert [e.type for e in d.events][-1] == "step.retry_scheduled"


def test_run_budget_stops_before_the_step_that_would_exceed_it() -> None:
    definition = parse_workflow(
        {
            "name": "w",
            "budget_usd": "0.010",
            "steps": [
                {"name": "a", "agent": "x", "next": "b"},
                {"name": "b", "agent": "x", "estimated_cost_usd": "0.005"},
            ],
        }
    )
    run = Run(definition)
    d = run.result("a", 1, 10, cost="0.008", output={})
    assert run.s is not None and run.s.status == "over_budget"
    assert run.s.spent_usd == Decimal("0.008")
    types = [e.type for e in d.events]
    assert "run.over_budget" in types and "step.scheduled" not in types
    assert not d.tasks
    assert d.quarantine is not None and d.quarantine.error_type == "OverBudget" and d.quarantine.step == "b"


def test_request_budget_overrides_the_workflow_one() -> None:
    definition = parse_workflow({"name": "w", "budget_usd": "1", "steps": [{"name": "a", "agent": "x"}]})
    run = Run(definition, budget_usd=Decimal("0"))
    assert run.s is not None and run.s.budget_usd == Decimal("0")
    run.result("a", 1, 10, cost="0.001", error_type="RuntimeError", error="x")
    run.apply(TimerFired("r", 10_000))
    assert run.s.status == "over_budget"


def test_tenant_over_its_window_budget_is_refused_with_an_event() -> None:
    run = Run(
        wf(),
        tenant="acme",
        tenant_budget_usd=Decimal("5"),
        tenant_spent_usd=Decimal("5.01"),
        tenant_window="1h",
    )
    assert run.s is not None and run.s.status == "refused" and run.s.is_terminal()
    assert [e.type for e in run.d.events] == ["run.requested", "run.refused"]
    assert run.d.events[1].data["tenant"] == "acme" and not run.d.tasks


def test_retry_after_lengthens_the_backoff() -> None:
    run = Run(wf())
    d = run.result("a", 1, 10, error_type="ProviderError", error="429", retry_after_ms=7000)
    retry = next(e for e in d.events if e.type == "step.retry_scheduled")
    assert retry.data["delay_ms"] == 7000 and retry.data["due_ms"] == 7010


def test_history_refolds_to_the_same_events() -> None:
    definition = wf(models=["cheap", "smart"], confidence_field="c", min_confidence=0.5)
    run = Run(definition, budget_usd=Decimal("10"))
    run.result("a", 1, 10, output={"c": 0.1}, cost="0.5")
    run.result("a", 2, 20, error_type="RuntimeError", error="x", retry_after_ms=100)
    run.apply(TimerFired("r", 9000))
    run.result("a", 3, 9100, output={"c": 0.9})
    run.result("b", 1, 9200, output={})
    assert run.s is not None and run.s.status == "completed"
    state, events = fold(definition, inputs_from_events(run.events + run.events[:3]))
    assert events == run.events
    assert state == run.s
