"""Run state: what the compacted ``<prefix>.runs.state`` topic holds per run ID."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from calmrun.jsontypes import JsonDict, JsonValue

RunStatus = Literal["running", "completed", "quarantined", "over_budget", "refused", "cancelled", "rejected"]
StepStatus = Literal[
    "scheduled",
    "retry_wait",
    "succeeded",
    "failed",
    "cancelled",
    "compensating",
    "compensated",
    "compensation_failed",
    "waiting",  # approval/wait steps: for an answer or a signal, until due_ms when it is set
    "timed_out",  # approval/wait steps: no answer by due_ms; the run took on_timeout
    "looped",  # a step of a loop's body, done in an earlier iteration: it runs again when reached
]
ACTIVE: frozenset[str] = frozenset({"scheduled", "retry_wait", "compensating", "waiting"})


class ElementState(BaseModel):
    """One element of a map step in flight, or waiting for its retry."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = 0
    retry_base: int = Field(0, description="attempts made before the last redrive")
    deadline_ms: int | None = Field(None, description="re-issue the attempt if no result by then")
    due_ms: int | None = Field(None, description="when the next attempt is issued (a retry)")


class MapState(BaseModel):
    """A map step's progress, compact whatever the width: the elements are issued in index order, so one
    counter says which were; only those in flight (at most ``max_concurrency``) have an entry; the
    outputs are one JSON list in element order (None until done, or for a collected failure)."""

    model_config = ConfigDict(extra="forbid")

    size: int
    issued: int = Field(0, description="elements 0..issued-1 were issued at least once")
    again: dict[str, int] = Field(
        default_factory=dict, description="failed elements a redrive issues anew: index -> attempts made"
    )
    running: dict[str, ElementState] = Field(default_factory=dict, description="by element index")
    done: int = Field(0, description="elements finished: with an output or, collected, with an error")
    outputs: JsonValue = None
    errors: JsonValue = None


class StepState(BaseModel):
    """One step of one run: its attempts, its recorded output, and when the runtime next acts on it."""

    model_config = ConfigDict(extra="forbid")

    status: StepStatus
    attempt: int = 0
    retry_base: int = Field(
        0, description="attempts made before the last redrive; the retry policy counts after it"
    )
    model: str | None = None
    model_index: int = Field(0, description="position on the step's model ladder")
    output: JsonDict | None = None
    error_type: str | None = None
    error: str | None = None
    scheduled_ms: int = 0
    deadline_ms: int | None = Field(None, description="re-issue the attempt if no result by then")
    due_ms: int | None = Field(
        None, description="retry_wait: when the next attempt is issued; waiting: when the wait times out"
    )
    finished_ms: int | None = None
    done_seq: int | None = Field(None, description="event seq at success: orders compensation")
    iteration: int = Field(0, description="loops: which visit of the step this is (0: the first)")
    map: MapState | None = Field(None, description="map steps: the elements' progress")
    tool_approval: JsonDict | None = Field(
        None,
        description="agent steps: tool calls that waited for a person ({pending: [calls], answers: "
        "{tool_call_id: {approved, by, comment}}})",
    )


class RunState(BaseModel):
    """The whole state of one run; folding its input events through the decider rebuilds it exactly."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    workflow: str
    version: str
    digest: str = Field("", description="content hash of the definition the run is pinned to")
    tenant: str = "default"
    status: RunStatus = "running"
    outcome: str | None = None
    input: JsonDict = Field(default_factory=dict)
    steps: dict[str, StepState] = Field(default_factory=dict)
    compensations: list[str] = Field(default_factory=list, description="steps still to compensate, in order")
    seq: int = Field(0, description="seq of the last event of this run")
    created_ms: int = 0
    clock_ms: int = Field(0, description="max event time seen: the decider's only notion of now")
    error_type: str | None = None
    error: str | None = None
    budget_usd: Decimal | None = None
    spent_usd: Decimal = Field(Decimal(0), description="money of every recorded attempt of this run")
    start_rungs: dict[str, int] = Field(
        default_factory=dict, description="step -> ladder rung chosen at the request (steps with choose)"
    )
    signals: JsonDict = Field(
        default_factory=dict,
        description="signal name -> payloads received before a step waited, oldest first",
    )
    parent: JsonDict | None = Field(
        None, description="a child run: its parent's run_id, workflow and step, told when this run ends"
    )
    held: list[str] = Field(
        default_factory=list,
        description="commands received while no worker here served the run's version (JSON, in order)",
    )
    history: int = Field(
        1,
        description="the history's format: 1 records run.routed after every step, 2 only after a step "
        "with branches (the others' route is the definition's)",
    )

    def next_due_ms(self) -> int | None:
        """Earliest time at which a timer must wake this run (a deadline or a retry), if any."""
        times = [t for s in self.steps.values() for t in (s.deadline_ms, s.due_ms) if t is not None]
        return min(times) if times else None

    def is_terminal(self) -> bool:
        return (
            self.status != "running"
            and not self.compensations
            and not any(s.status in ACTIVE for s in self.steps.values())
        )

    def outputs(self) -> dict[str, Any]:
        return {name: s.output for name, s in self.steps.items() if s.output is not None}
