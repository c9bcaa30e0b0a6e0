"""A run's recorded history as decider inputs, and the fold that re-decides it.

Every decision logs its input first (``run.requested``, ``step.succeeded``, ``step.failed``,
``timer.fired``, ``run.redrive_requested``, ``step.approved``, ``step.rejected``, ``signal.received``,
``run.cancel_requested``, ``run.migrated``), so the inputs of a run can be rebuilt from its events and
folded through the decider again: with the same definition this reproduces the recorded events exactly;
with a changed one, the first difference is where the change would alter runs in flight.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from calmrun.workflow.decider import decide
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import (
    INPUT_TYPES,
    Answer,
    CancelRequested,
    CommandHeld,
    DeciderInput,
    HeldInput,
    HeldReleased,
    MigrateRequested,
    RedriveRequested,
    RunEvent,
    RunRequested,
    SignalReceived,
    StepCost,
    StepResult,
    TimerFired,
    child_finished,
)
from calmrun.workflow.state import RunState


def applied(events: Iterable[RunEvent]) -> list[RunEvent]:
    """The applied events of one run in seq order; copies re-sent after a crash (same seq) appear once."""
    by_seq: dict[int, RunEvent] = {}
    for ev in events:
        if ev.seq > 0:
            by_seq.setdefault(ev.seq, ev)
    return [by_seq[k] for k in sorted(by_seq)]


def _dec(data: dict[str, Any], key: str) -> Decimal | None:
    value = data.get(key)
    return None if value is None else Decimal(str(value))


def inputs_from_events(events: Iterable[RunEvent]) -> list[DeciderInput]:
    """Rebuild the decider inputs of one run from its recorded events."""
    out: list[DeciderInput] = []
    for ev in applied(events):
        if ev.type not in INPUT_TYPES:
            continue
        d = ev.data
        if ev.type == "run.requested":
            out.append(
                RunRequested(
                    run_id=ev.run_id,
                    workflow=ev.workflow,
                    input=dict(d.get("input") or {}),
                    at_ms=ev.at_ms,
                    tenant=ev.tenant,
                    budget_usd=_dec(d, "budget_usd"),
                    tenant_budget_usd=_dec(d, "tenant_budget_usd"),
                    tenant_spent_usd=_dec(d, "tenant_spent_usd"),
                    tenant_window=d.get("tenant_window"),
                    model_stats=d.get("model_stats"),
                    parent=d.get("parent"),
                    history=int(d.get("history", 1)),
                )
            )
        elif ev.type in ("step.succeeded", "step.failed"):
            assert ev.step is not None and ev.attempt is not None
            ok = ev.type == "step.succeeded"
            out.append(
                StepResult(
                    run_id=ev.run_id,
                    step=ev.step,
                    attempt=ev.attempt,
                    at_ms=ev.at_ms,
                    kind=d.get("kind", "run"),
                    output=d.get("output"),  # a failure's: the tool calls a paused attempt waits on
                    error_type=None if ok else (d.get("error_type") or "Error"),
                    error=None if ok else d.get("error"),
                    retriable=bool(d.get("retriable", True)),
                    cost=ev.cost or StepCost(),
                    retry_after_ms=d.get("retry_after_ms"),
                    element=d.get("element"),
                )
            )
        elif ev.type == "timer.fired":
            out.append(TimerFired(ev.run_id, int(d.get("at_ms", ev.at_ms))))
        elif ev.type in ("step.approved", "step.rejected"):
            assert ev.step is not None
            approved = ev.type == "step.approved"
            call = d.get("tool_call_id")
            out.append(Answer(ev.run_id, ev.step, approved, ev.at_ms, d.get("by"), d.get("comment"), call))
        elif ev.type == "signal.received":
            out.append(SignalReceived(ev.run_id, d["name"], ev.at_ms, dict(d.get("data") or {}), d.get("by")))
        elif ev.type == "run.cancel_requested":
            out.append(CancelRequested(ev.run_id, ev.at_ms, d.get("reason"), d.get("by")))
        elif ev.type == "step.child_finished":
            assert ev.step is not None
            out.append(child_finished(ev.run_id, ev.step, ev.at_ms, d))
        elif ev.type == "run.migrated":
            to, seq = d.get("to") or {}, d.get("checked_seq")
            version, digest = str(to.get("version")), str(to.get("digest"))
            out.append(MigrateRequested(ev.run_id, ev.at_ms, version, digest, d.get("by"), seq))
        else:
            out.append(RedriveRequested(ev.run_id, ev.at_ms, d.get("by")))
    return out


def held_from_notes(notes: Iterable[RunEvent]) -> list[tuple[int, HeldInput]]:
    """The holding inputs of one run from its ``input.held``/``input.released`` notes, in log order, each
    with the seq the run was at (notes written before 0.4 carry no command and are left out)."""
    out: list[tuple[int, HeldInput]] = []
    for ev in notes:
        after = ev.data.get("after_seq")
        if after is None:
            continue
        if ev.type == "input.held" and "entry" in ev.data:
            entry = json.loads(ev.data["entry"])
            held = CommandHeld(ev.run_id, int(entry["at_ms"]), entry["command"], ev.data.get("reason", ""))
            out.append((int(after), held))
        elif ev.type == "input.released":
            out.append((int(after), HeldReleased(ev.run_id, ev.at_ms)))
    return out


Resolve = Callable[[MigrateRequested], WorkflowDef | None]
"""The definition a migration moves a run to (None: go on with the one in use)."""


def fold(
    wf: WorkflowDef, inputs: Iterable[DeciderInput], resolve: Resolve | None = None
) -> tuple[RunState | None, list[RunEvent]]:
    """Decide ``inputs`` in order from no state; returns the final state and the applied events.

    ``resolve`` picks the definition after each ``run.migrated`` (its target); without it, ``wf`` decides
    every input (which is how ``calmrun deploy check`` asks whether a new definition converges).
    """
    state: RunState | None = None
    events: list[RunEvent] = []
    for inp in inputs:
        if isinstance(inp, MigrateRequested) and resolve is not None:
            wf = resolve(inp) or wf
        d = decide(wf, state, inp)
        if d.ignored is None:
            state = d.state
            events.extend(d.events)
    return state, events
