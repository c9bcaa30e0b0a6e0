"""Decider inputs rebuilt from a run's recorded events.

Uses ``calmrun.workflow.history.inputs_from_events`` when that module exists (it knows every input the
decider has); until then, this module's own reading of the recorded input events.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, cast

from calmrun.workflow.events import (
    INPUT_TYPES,
    DeciderInput,
    RedriveRequested,
    RunEvent,
    RunRequested,
    StepCost,
    StepResult,
    TimerFired,
)


def _shared() -> Callable[[Sequence[RunEvent]], list[DeciderInput]] | None:
    try:
        mod = importlib.import_module("calmrun.workflow.history")
    except ImportError:
        return None
    fn = getattr(mod, "inputs_from_events", None)
    return cast("Callable[[Sequence[RunEvent]], list[DeciderInput]] | None", fn)


def inputs_from_events(events: Sequence[RunEvent]) -> list[DeciderInput]:
    """The decider inputs that ``events`` (one run's applied events, in seq order) record, in order."""
    shared = _shared()
    if shared is not None:
        return list(shared(events))
    return [_input(e) for e in events if e.type in INPUT_TYPES]


def is_input(e: RunEvent) -> bool:
    """Whether ``e`` records an input of the decider (the first event of each decision)."""
    return e.type in INPUT_TYPES


def _input(e: RunEvent) -> DeciderInput:
    if e.type == "run.requested":
        extra: dict[str, Any] = {}
        fields = getattr(RunRequested, "__dataclass_fields__", {})
        for name in ("budget_usd", "tenant_budget_usd", "tenant_spent_usd"):
            if name in fields and e.data.get(name) is not None:
                extra[name] = Decimal(str(e.data[name]))
        if "tenant_window" in fields and e.data.get("tenant_window") is not None:
            extra["tenant_window"] = e.data["tenant_window"]
        return RunRequested(e.run_id, e.workflow, dict(e.data.get("input") or {}), e.at_ms, e.tenant, **extra)
    if e.type in ("step.succeeded", "step.failed"):
        assert e.step is not None and e.attempt is not None
        ok = e.type == "step.succeeded"
        return StepResult(
            e.run_id,
            e.step,
            e.attempt,
            e.at_ms,
            kind=e.data.get("kind", "run"),
            output=e.data.get("output") if ok else None,
            error_type=None if ok else (e.data.get("error_type") or "Error"),
            error=None if ok else e.data.get("error"),
            retriable=bool(e.data.get("retriable", True)),
            cost=e.cost or StepCost(),
            **_retry_after(e),
        )
    if e.type == "timer.fired":
        return TimerFired(e.run_id, e.at_ms)
    if e.type == "run.redrive_requested":
        return RedriveRequested(e.run_id, e.at_ms)
    raise ValueError(f"event {e.type!r} (seq {e.seq}) is not a decider input")


def _retry_after(e: RunEvent) -> dict[str, Any]:
    if "retry_after_ms" in getattr(StepResult, "__dataclass_fields__", {}) and e.data.get("retry_after_ms"):
        return {"retry_after_ms": int(e.data["retry_after_ms"])}
    return {}
