"""Records that flow between processors, and the inputs of the decider.

``RunRequest`` and ``RunCommand`` enter on ``<prefix>.runs.requests``; ``StepTask`` goes to a step's
topic; ``RunEvent`` is the audit log on ``<prefix>.runs.events``. The decider's inputs
(``RunRequested``, ``StepResult``, ``TimerFired``, ``RedriveRequested``) are recorded there too, as
the first event of each decision, so a run's history can be re-decided exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from calmrun.wire.jsonfield import JsonDict


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRequest(_Record):
    """Start a run. JSON or Avro on the requests topic; the key (or ``run_id``) is the run ID."""

    workflow: str
    input: JsonDict = Field(default_factory=dict)
    run_id: str | None = None
    tenant: str = "default"
    budget_usd: Decimal | None = None
    version: str | None = Field(
        None, description="start on this version of the workflow (default: the newest a worker serves)"
    )


class RunCommand(_Record):
    """An operator's command for an existing run, sent on the requests topic (``calmrun dlq redrive``)."""

    command: Literal["redrive", "migrate"]
    run_id: str
    workflow: str
    by: str | None = Field(None, description="who asked (the operator page's user); recorded on the event")
    # migrate (calmrun deploy check --migrate): the definition the run moves to
    to_version: str | None = None
    to_digest: str | None = None
    checked_seq: int | None = Field(None, description="migrate only if the run is still at this seq")


class StepCost(_Record):
    """What one step attempt cost: time, tokens, calls and money (money as a Decimal, never a float)."""

    latency_ms: float = 0.0
    queue_wait_ms: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0
    api_calls: int = 0
    model: str | None = None
    agent: str | None = None
    cost_usd: Decimal = Decimal(0)
    price_source: str | None = None


EventType = Literal[
    # inputs of the decider
    "run.requested",
    "step.succeeded",
    "step.failed",
    "timer.fired",
    "run.redrive_requested",
    "run.migrated",
    # decisions
    "step.scheduled",
    "step.retry_scheduled",
    "step.reissued",
    "step.deadline_expired",  # written by calmrun before 0.2: a lost task then cost an attempt
    "run.routed",
    "run.completed",
    "run.quarantined",
    "step.compensation_scheduled",
    "step.compensated",
    "step.compensation_failed",
    "step.cancelled",
    "step.escalated",
    "step.model_chosen",
    "run.over_budget",
    "run.refused",
    # logged, never applied
    "input.ignored",
    "input.held",  # a command kept for a worker that serves the run's version (streams.versions)
]
INPUT_TYPES = frozenset(
    {"run.requested", "step.succeeded", "step.failed", "timer.fired", "run.redrive_requested", "run.migrated"}
)


class RunEvent(_Record):
    """One line of a run's audit log; ``seq`` orders a run's events (-1: logged but not applied)."""

    run_id: str
    seq: int
    type: EventType
    at_ms: int
    workflow: str
    version: str = ""
    tenant: str = "default"
    step: str | None = None
    attempt: int | None = None
    data: JsonDict = Field(default_factory=dict)
    cost: StepCost | None = None


class StepTask(_Record):
    """Run (or compensate) one attempt of one step; consumed by that step's processor."""

    run_id: str
    workflow: str
    version: str
    step: str
    attempt: int
    kind: Literal["run", "compensate"] = "run"
    agent: str
    model: str | None = None
    input: JsonDict = Field(default_factory=dict)
    tenant: str = "default"
    issued_ms: int
    timeout_s: float

    @property
    def idempotency_key(self) -> str:
        """Stable per attempt: agents pass it to downstream APIs so a re-executed attempt is recognised."""
        return f"{self.run_id}/{self.step}/{self.kind}/{self.attempt}"


# Inputs of the decider (in-process; recorded as the first event of each decision).


@dataclass(frozen=True)
class RunRequested:
    """A run request; the tenant's spend in its budget window is stamped on by the worker."""

    run_id: str
    workflow: str
    input: dict[str, Any]
    at_ms: int
    tenant: str = "default"
    budget_usd: Decimal | None = None
    tenant_budget_usd: Decimal | None = None
    tenant_spent_usd: Decimal | None = None
    tenant_window: str | None = None
    model_stats: dict[str, dict[str, dict[str, Any]]] | None = None
    """Stamped by the worker for steps with ``choose``: step -> alias -> observed figures
    (``attempts``, ``accepted``, ``cost_usd``, ``latency_ms``, ``window_s``) from the cost table."""


@dataclass(frozen=True)
class StepResult:
    """What an attempt produced: an output, or an error with whether retrying may help."""

    run_id: str
    step: str
    attempt: int
    at_ms: int
    kind: Literal["run", "compensate"] = "run"
    output: dict[str, Any] | None = None
    error_type: str | None = None
    error: str | None = None
    retriable: bool = True
    cost: StepCost = field(default_factory=StepCost)
    traceback: str | None = None
    retry_after_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


@dataclass(frozen=True)
class TimerFired:
    run_id: str
    at_ms: int


@dataclass(frozen=True)
class RedriveRequested:
    run_id: str
    at_ms: int
    by: str | None = None


@dataclass(frozen=True)
class MigrateRequested:
    """Move a run in flight to another definition of its workflow (checked by ``calmrun deploy check``)."""

    run_id: str
    at_ms: int
    version: str
    digest: str
    by: str | None = None
    checked_seq: int | None = None
    """The seq up to which the new definition was checked against the run's history: a run that moved on
    since is not migrated (what it decided since was not checked)."""


DeciderInput = RunRequested | StepResult | TimerFired | RedriveRequested | MigrateRequested
