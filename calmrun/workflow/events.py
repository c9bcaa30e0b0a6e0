"""Records that flow between processors, and the inputs of the decider.

``RunRequest`` and ``RunCommand`` enter on ``<prefix>.runs.requests``; ``StepTask`` goes to a step's
topic; ``RunEvent`` is the audit log on ``<prefix>.runs.events``. The decider's inputs
(``RunRequested``, ``StepResult``, ``TimerFired``, ``RedriveRequested``, and a person's ``Answer``,
``SignalReceived``, ``CancelRequested``) are recorded there too, as the first event of each decision, so a
run's history can be re-decided exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calmrun.jsontypes import JsonDict


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
    parent: JsonDict | None = Field(
        None, description="a child run: its parent's run_id, workflow and step (kind: workflow)"
    )


CommandKind = Literal["redrive", "approve", "reject", "signal", "cancel", "migrate", "child_done"]


class RunCommand(_Record):
    """An operator's command for an existing run, sent on the requests topic.

    ``redrive`` (``calmrun dlq redrive``); ``approve``/``reject`` an approval step (``step``, ``comment``);
    ``signal`` (``name``, payload ``data``); ``cancel`` (``reason``); ``migrate`` (``to_version``,
    ``to_digest``, ``checked_seq``: sent by ``calmrun deploy check --migrate``). Any Kafka client may send
    one as JSON.
    """

    command: CommandKind
    run_id: str
    workflow: str
    by: str | None = Field(None, description="who asked (the operator page's user); recorded on the event")
    step: str | None = Field(None, description="approve/reject: the approval step")
    comment: str | None = Field(None, description="approve/reject: recorded with the answer")
    tool_call_id: str | None = Field(
        None,
        description="approve/reject of an agent step's tool call: the call answered (absent: every "
        "call it waits on); an answer naming another call is ignored",
    )
    name: str | None = Field(None, description="signal: its name")
    data: JsonDict | None = Field(None, description="signal: its payload (a JSON object)")
    reason: str | None = Field(None, description="cancel: why; recorded on the event")
    # migrate (calmrun deploy check --migrate): the definition the run moves to
    to_version: str | None = None
    to_digest: str | None = None
    checked_seq: int | None = Field(None, description="migrate only if the run is still at this seq")

    @model_validator(mode="after")
    def _fields_fit(self) -> RunCommand:
        need = {
            "approve": "step",
            "reject": "step",
            "signal": "name",
            "migrate": "to_version",
            "child_done": "data",
        }.get(self.command)
        if need is not None and not getattr(self, need):
            raise ValueError(f"{self.command} needs `{need}`")
        return self


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
    "step.approved",
    "step.rejected",
    "signal.received",
    "run.cancel_requested",
    "run.migrated",
    "step.child_finished",
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
    "step.route_refused",  # an agent-chosen route outside route.allowed: the attempt failed
    "step.looped",  # a loop went back for another iteration
    "step.loop_exhausted",  # a loop reached max_iterations
    "step.mapped",  # a map step read its list: how many elements
    "step.child_started",  # a workflow step started its child run
    "step.model_chosen",
    "run.over_budget",
    "run.refused",
    "step.waiting",
    "step.signalled",
    "step.timed_out",
    "run.cancelled",
    "run.rejected",  # a request that could not start a run, under the run ID it names (workflow.rejection)
    # logged, never applied
    "input.ignored",
    "input.held",  # a command kept in the run's state for a worker that serves its version
    "input.released",  # a held command taken out of the state, to be decided now
]
HISTORY = 2
"""The format of the history a new run records: since 2, ``run.routed`` follows only a step with branches
(a step without them goes where its definition says, and the next ``step.scheduled`` or the end says it);
1 wrote one after every step. A run keeps its format (``RunState.history``) and replay re-decides it in it."""
HELD_NOTES = frozenset({"input.held", "input.released"})
"""Notes (seq -1) that change a run's state all the same: its ``held`` commands (``workflow.operator``)."""
INPUT_TYPES = frozenset(
    {
        "run.requested",
        "step.succeeded",
        "step.failed",
        "timer.fired",
        "run.redrive_requested",
        "step.approved",
        "step.rejected",
        "signal.received",
        "run.cancel_requested",
        "run.migrated",
        "step.child_finished",
    }
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
    iteration: int = Field(
        0, description="a step in a loop: which visit this attempt belongs to (0: the first)"
    )
    element: int | None = Field(None, description="a map step: the index of the element this attempt runs on")
    approvals: JsonDict | None = Field(
        None,
        description="tool calls of this attempt that waited for a person: tool call ID -> "
        "{approved, by, comment} (the resumed agent continues with these answers)",
    )
    first_issued_ms: int | None = Field(
        None,
        description="with approvals: when the attempt was first issued (its journal is read from there, "
        "however long the answer took)",
    )

    @property
    def idempotency_key(self) -> str:
        """Stable per attempt: agents pass it to downstream APIs so a re-executed attempt is recognised."""
        return attempt_key(self.run_id, self.step, self.kind, self.attempt, self.iteration, self.element)


def attempt_key(
    run_id: str, step: str, kind: str, attempt: int, iteration: int = 0, element: int | None = None
) -> str:
    """An attempt's idempotency key: ``run/step/kind/attempt``, the step as ``step#i`` in iteration i > 0
    of a loop (attempt numbers go on across iterations, so a key is never reused within a run) and as
    ``step[e]`` for element e of a map."""
    where = step if iteration == 0 else f"{step}#{iteration}"
    where = where if element is None else f"{where}[{element}]"
    return f"{run_id}/{where}/{kind}/{attempt}"


class StepResultRecord(_Record):
    """A pooled step's answer on ``<prefix>.runs.results``, keyed by run ID: what one attempt produced.

    Written by a pool executor (``calmrun worker --pool NAME``, or any Kafka client answering the task
    record of the step topic, JSON or Avro); the deciding worker turns it into a ``StepResult``. ``ok`` is
    false when ``error_type`` is set: then ``retriable`` says whether the retry policy may try again.
    """

    run_id: str
    workflow: str
    step: str
    attempt: int
    kind: Literal["run", "compensate"] = "run"
    version: str = ""
    output: JsonDict | None = None
    error_type: str | None = None
    error: str | None = None
    retriable: bool = True
    retry_after_ms: int | None = None
    traceback: str | None = None
    cost: StepCost = Field(default_factory=StepCost)
    pool: str | None = Field(None, description="the pool that executed it (for the audit log)")
    element: int | None = Field(None, description="a map step: the element of the task it answers")

    @property
    def idempotency_key(self) -> str:
        return attempt_key(self.run_id, self.step, self.kind, self.attempt, element=self.element)

    def to_input(self, at_ms: int) -> StepResult:
        """The decider's input; ``at_ms`` is when the record was written (its Kafka timestamp)."""
        return StepResult(
            run_id=self.run_id,
            step=self.step,
            attempt=self.attempt,
            at_ms=at_ms,
            kind=self.kind,
            output=dict(self.output) if self.output is not None else None,
            error_type=self.error_type,
            error=self.error,
            retriable=self.retriable,
            cost=self.cost,
            traceback=self.traceback,
            retry_after_ms=self.retry_after_ms,
            element=self.element,
        )

    @classmethod
    def of(cls, task: StepTask, result: StepResult, pool: str | None = None) -> StepResultRecord:
        return cls(
            run_id=task.run_id,
            workflow=task.workflow,
            step=task.step,
            attempt=task.attempt,
            kind=task.kind,
            version=task.version,
            output=result.output,
            error_type=result.error_type,
            error=result.error,
            retriable=result.retriable,
            retry_after_ms=result.retry_after_ms,
            traceback=result.traceback,
            cost=result.cost,
            pool=pool,
            element=task.element,
        )


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
    parent: dict[str, Any] | None = None
    """A child run's parent: ``run_id``, ``workflow``, ``step``."""
    history: int = HISTORY
    """The format of the history the run records (``HISTORY``); a run recorded before has 1."""


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
    element: int | None = None
    """A map step's element this result is for (None: a step's own attempt)."""

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


@dataclass(frozen=True)
class Answer:
    """A person's answer to an approval step (``calmrun approve``/``reject``)."""

    run_id: str
    step: str
    approved: bool
    at_ms: int
    by: str | None = None
    comment: str | None = None
    tool_call_id: str | None = None
    """An agent step's tool call this answers (None: every call the step waits on)."""


@dataclass(frozen=True)
class SignalReceived:
    """A named signal with its payload (``calmrun signal``): what a partner's webhook becomes."""

    run_id: str
    name: str
    at_ms: int
    data: dict[str, Any] = field(default_factory=dict)
    by: str | None = None


@dataclass(frozen=True)
class CancelRequested:
    run_id: str
    at_ms: int
    reason: str | None = None
    by: str | None = None


@dataclass(frozen=True)
class CommandHeld:
    """A command for a run pinned to a version no worker here serves: kept, in order, in the run's state.

    Holding is decided without the run's definition (the worker has none): it changes nothing but
    ``RunState.held`` and is logged, not applied (``input.held``, seq -1), so the run's seq, which a
    ``deploy check`` vouches for, does not move.
    """

    run_id: str
    at_ms: int
    command: dict[str, Any]
    """The command as JSON (``RunCommand.model_dump(mode="json")``)."""
    reason: str = ""


@dataclass(frozen=True)
class HeldReleased:
    """The oldest held command leaves the state, to be decided next (by a worker serving the version)."""

    run_id: str
    at_ms: int


@dataclass(frozen=True)
class ChildFinished:
    """A child run (``kind: workflow``) ended: sent by the child's decision to its parent's run."""

    run_id: str
    step: str
    at_ms: int
    child_run_id: str
    status: str
    outcome: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    spent_usd: Decimal = Decimal(0)
    error: str | None = None

    def data(self) -> dict[str, Any]:
        return {
            "child_run_id": self.child_run_id,
            "status": self.status,
            "outcome": self.outcome,
            "outputs": self.outputs,
            "spent_usd": str(self.spent_usd),
            "error": self.error,
        }


PersonInput = Answer | SignalReceived | CancelRequested
HeldInput = CommandHeld | HeldReleased
DeciderInput = (
    RunRequested
    | StepResult
    | TimerFired
    | RedriveRequested
    | MigrateRequested
    | PersonInput
    | HeldInput
    | ChildFinished
)


def command_input(run_id: str, cmd: RunCommand, at_ms: int) -> DeciderInput:
    """The decider input of a command read from the requests topic."""
    if cmd.command in ("approve", "reject"):
        assert cmd.step is not None  # the model's validator
        return Answer(
            run_id, cmd.step, cmd.command == "approve", at_ms, cmd.by, cmd.comment, cmd.tool_call_id
        )
    if cmd.command == "signal":
        assert cmd.name is not None
        return SignalReceived(run_id, cmd.name, at_ms, dict(cmd.data or {}), cmd.by)
    if cmd.command == "cancel":
        return CancelRequested(run_id, at_ms, cmd.reason, cmd.by)
    if cmd.command == "child_done":
        assert cmd.step is not None and cmd.data is not None
        return child_finished(run_id, cmd.step, at_ms, cmd.data)
    assert cmd.command == "redrive", "a migrate names its target definition: the intake decides it"
    return RedriveRequested(run_id, at_ms, cmd.by)


def child_finished(run_id: str, step: str, at_ms: int, d: dict[str, Any]) -> ChildFinished:
    """The input a ``child_done`` command (or its recorded ``step.child_finished`` event) carries."""
    return ChildFinished(
        run_id,
        step,
        at_ms,
        str(d.get("child_run_id", "")),
        str(d.get("status", "")),
        d.get("outcome"),
        dict(d.get("outputs") or {}),
        Decimal(str(d.get("spent_usd", "0"))),
        d.get("error"),
    )
