"""How a run moves, whatever its steps' kinds: start, route, quarantine, compensate, settle.

``Transitions`` works on a private copy of one run's state and collects what one decision emits. It
knows no step kind: starting a step, a timer that finds it due, and a step's answer are each kind's own
(``calmrun.workflow.kinds``), which call back into these transitions.

Pure, as the decider is: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from calmrun.errors import ErrorKind
from calmrun.workflow.definition import END, WorkflowDef, targets
from calmrun.workflow.events import (
    ChildFinished,
    EventType,
    RunCommand,
    RunEvent,
    RunRequest,
    StepCost,
    StepTask,
)
from calmrun.workflow.state import ACTIVE, RunState, RunStatus, StepState

_UNDONE = ("compensated", "compensation_failed")


@dataclass(frozen=True)
class Quarantine:
    """Why a run was quarantined: the shell writes this cause to the workflow's dead-letter topic."""

    step: str | None
    attempt: int
    error_type: str
    error: str


@dataclass(frozen=True)
class Decision:
    """The outcome of one input: the new state, the events to log, the tasks to send.

    ``ignored`` holds the reason when the input changed nothing (a duplicate, a late result); the state
    is then the unchanged input state and ``events`` holds one ``input.ignored`` record for the log.
    """

    state: RunState | None
    events: tuple[RunEvent, ...] = ()
    tasks: tuple[StepTask, ...] = ()
    quarantine: Quarantine | None = None
    ignored: str | None = None
    requests: tuple[RunRequest | RunCommand, ...] = ()
    """Records for the requests topic, keyed by their ``run_id``: a child run to start, a child to
    cancel, a parent to tell that its child ended. Derived from the decision, so a replay makes the same."""


def awaits(
    state: RunState, step: str, attempt: int, kind: Literal["run", "compensate"], element: int | None = None
) -> bool:
    """Is this attempt of ``step`` (of its ``element``, for a map) in flight, so that its task should run
    and its result counts?

    The one test shared by the result path and the shell's "should this task record still run".
    """
    st = state.steps.get(step)
    if st is None or (st.map is None) != (element is None):
        return False
    if st.map is not None:
        el = st.map.running.get(str(element))
        return (
            kind == "run"
            and st.status == "scheduled"
            and el is not None
            and el.attempt == attempt
            and (el.deadline_ms is not None)
        )
    return (
        st.attempt == attempt
        and st.deadline_ms is not None
        and st.status == ("scheduled" if kind == "run" else "compensating")
    )


class Transitions:
    """Mutates a private copy of the state and collects what the decision emits."""

    def __init__(self, wf: WorkflowDef, s: RunState) -> None:
        self.wf, self.s = wf, s
        self.events: list[RunEvent] = []
        self.tasks: list[StepTask] = []
        self.requests: list[RunRequest | RunCommand] = []
        self.quarantine: Quarantine | None = None
        self._was_terminal = s.is_terminal()
        self.why = ""
        self._copied: set[str] = set()

    def mut(self, name: str) -> StepState:
        """The step's state, copied before its first change in this decision (inputs are never mutated)."""
        st = self.s.steps[name]
        if name not in self._copied:
            st = st.model_copy()
            self.s.steps[name] = st
            self._copied.add(name)
        return st

    def finish(self) -> Decision:
        self._settle()
        # a step issued and then cancelled within this decision (a sibling stopped the run) sends nothing
        tasks = tuple(t for t in self.tasks if awaits(self.s, t.step, t.attempt, t.kind, t.element))
        parent = self.s.parent
        if parent and not self._was_terminal and self.s.is_terminal():  # a child run ended: tell its parent
            self.requests.append(self._tell_parent(parent))
        return Decision(
            state=self.s,
            events=tuple(self.events),
            tasks=tasks,
            quarantine=self.quarantine,
            requests=tuple(self.requests),
        )

    def _tell_parent(self, parent: dict[str, Any]) -> RunCommand:
        s = self.s
        done = ChildFinished(
            str(parent["run_id"]),
            str(parent["step"]),
            s.clock_ms,
            s.run_id,
            s.status,
            s.outcome,
            s.outputs() if s.status == "completed" else {},
            s.spent_usd,
            None if s.status == "completed" else f"{s.error_type}: {s.error}",
        )
        return RunCommand(
            command="child_done",
            run_id=done.run_id,
            workflow=str(parent["workflow"]),
            step=done.step,
            data=done.data(),
            by=s.run_id,
        )

    def emit(
        self,
        type: EventType,
        step: str | None = None,
        attempt: int | None = None,
        data: dict[str, Any] | None = None,
        cost: StepCost | None = None,
    ) -> None:
        s = self.s
        s.seq += 1
        self.events.append(
            RunEvent(
                run_id=s.run_id,
                seq=s.seq,
                type=type,
                at_ms=s.clock_ms,
                workflow=s.workflow,
                version=s.version,
                tenant=s.tenant,
                step=step,
                attempt=attempt,
                data=data or {},
                cost=cost,
            )
        )

    # -- moving on -----------------------------------------------------------------------------------

    def route(self, name: str) -> None:
        """Go where the step's output leads: the first branch that holds, else ``next``."""
        sd = self.wf.step(name)
        output = self.s.steps[name].output
        chosen, by = targets(sd.next), "next"
        for i, branch in enumerate(sd.branches):
            if branch.when.holds(output):
                chosen, by = targets(branch.goto), f"branches[{i}]"
                break
        if sd.branches or self.s.history < 2:  # else the route is the definition's: step.scheduled says it
            self.emit("run.routed", name, data={"to": chosen, "by": by, **self.iteration_of(name)})
        self.goto(chosen)

    def goto(self, chosen: list[str]) -> None:
        for t in chosen:
            if t.startswith(END):
                self.s.outcome = self.s.outcome or t[len(END) :]
            else:
                self.start(t)

    def start(self, name: str) -> None:
        s = self.s
        before = s.steps.get(name)
        if (before is not None and before.status != "looped") or s.status != "running":
            return  # each step runs once per run (per loop iteration); a join is started by the last branch
        sd = self.wf.step(name)
        if any(n not in s.steps or s.steps[n].status != "succeeded" for n in sd.needs):
            return
        rung = s.start_rungs.get(name, 0)
        st = StepState(status="scheduled", model=sd.ladder[rung], model_index=rung)
        if before is not None:  # another iteration: attempts go on (a key is never reused), retries anew
            st.attempt = st.retry_base = before.attempt
            st.iteration = before.iteration
        s.steps[name] = st
        self._copied.add(name)
        sd.issue(self, name)

    def iteration_of(self, name: str) -> dict[str, int]:
        """``{"iteration": i}`` for events of a step in iteration i > 0 of a loop (else nothing: histories
        of steps outside loops read as before)."""
        st = self.s.steps.get(name)
        return {"iteration": st.iteration} if st is not None and st.iteration else {}

    def succeed(self, name: str, output: dict[str, Any]) -> StepState:
        """Record the step's output (it succeeded now); the caller routes the run on."""
        s, st = self.s, self.mut(name)
        st.status, st.output, st.due_ms, st.finished_ms = "succeeded", output, None, s.clock_ms
        st.done_seq = s.seq
        return st

    # -- stopping --------------------------------------------------------------------------------------

    def quarantine_run(
        self, step: str | None, attempt: int, error_type: str, error: str, status: RunStatus = "quarantined"
    ) -> None:
        s = self.s
        s.status, s.error_type, s.error = status, error_type, error
        self.cancel_active(f"run {status}")
        self.emit(
            "run.quarantined", step, attempt, {"error_type": error_type, "error": error, "status": status}
        )
        self.quarantine = Quarantine(step, attempt, error_type, error)
        self.saga()

    def cancel_active(self, reason: str) -> None:
        s = self.s
        for name in sorted(s.steps):
            if s.steps[name].status in ("scheduled", "retry_wait", "waiting"):
                st = self.mut(name)
                st.status, st.deadline_ms, st.due_ms = "cancelled", None, None
                self.emit("step.cancelled", name, st.attempt, {"reason": reason})
                self.wf.step(name).stopped(self, name, reason)

    def saga(self) -> None:
        """Compensate the succeeded steps that have a compensation, the last to succeed first."""
        s = self.s
        done = [
            (st.done_seq or 0, n)
            for n, st in s.steps.items()
            if st.status == "succeeded" and self.wf.step(n).compensation()
        ]
        s.compensations = [n for _, n in sorted(done, reverse=True)]
        self.next_compensation(done=None)

    def next_compensation(self, done: str | None) -> None:
        s = self.s
        if done is not None and s.compensations and s.compensations[0] == done:
            s.compensations.pop(0)
        if s.compensations:
            name = s.compensations[0]
            st = self.mut(name)
            st.retry_base = st.attempt
            self.wf.step(name).undo(self, name)
        elif s.status == "cancelled":  # a cancel's saga is done (or had nothing to undo): the run ends
            undone = {k: sorted(n for n, st in s.steps.items() if st.status == k) for k in _UNDONE}
            self.emit("run.cancelled", data={"reason": s.error, **undone})

    def _settle(self) -> None:
        s = self.s
        if s.status != "running" or any(st.status in ACTIVE for st in s.steps.values()):
            return
        if s.outcome is not None:
            s.status = "completed"
            self.emit("run.completed", data={"outcome": s.outcome, "outputs": s.outputs()})
        else:
            self.quarantine_run(
                None,
                0,
                ErrorKind.STUCK_RUN,
                "no step is active and no outcome was reached (a join waits for a step that did not run?)",
            )
