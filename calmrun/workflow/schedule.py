"""How a run moves: the transitions the decider is made of (schedule, retry, escalate, quarantine,
compensate, route, settle), on a private copy of the run's state, collecting what the decision emits.

Pure, as the decider is: no I/O, no clock, no randomness (backoff jitter is a hash of run, step, attempt).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

from calmrun.errors import ErrorKind, InputMappingError
from calmrun.workflow.definition import DEFAULT_POOL, END, WorkflowDef, lookup, targets
from calmrun.workflow.events import (
    EventType,
    RunEvent,
    StepCost,
    StepTask,
)
from calmrun.workflow.state import ACTIVE, RunState, RunStatus, StepState


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


def backoff_ms(wf: WorkflowDef, run_id: str, step: str, attempt: int, retry_base: int) -> int:
    """Delay before the attempt after ``attempt``: exponential, capped, jitter hashed from its identity."""
    policy = wf.step(step).retry
    base = policy.initial_backoff_s * policy.multiplier ** max(0, attempt - retry_base - 1)
    base = min(base, policy.max_backoff_s)
    u = zlib.crc32(f"{run_id}/{step}/{attempt}".encode()) / 0xFFFFFFFF
    return max(0, round(base * (1 + policy.jitter * (2 * u - 1)) * 1000))


def resolve_input(wf: WorkflowDef, s: RunState, step: str) -> dict[str, Any]:
    """The agent's input for ``step``: the run input, or the step's mapping over input and outputs."""
    sd = wf.step(step)
    if sd.input is None:
        return dict(s.input)
    scope = {
        "input": s.input,
        "run": {"run_id": s.run_id, "tenant": s.tenant, "workflow": s.workflow},
        "steps": s.outputs(),
    }
    out: dict[str, Any] = {}
    for arg, path in sd.input.items():
        found, value = lookup(scope, path)
        if not found:
            raise InputMappingError(f"step {step!r} input {arg!r}: {path!r} is not in the run")
        out[arg] = value
    return out


def awaits(state: RunState, step: str, attempt: int, kind: Literal["run", "compensate"]) -> bool:
    """Is this attempt of ``step`` in flight, so that its task should run and its result counts?

    The one test shared by the result path and the shell's "should this task record still run".
    """
    st = state.steps.get(step)
    return (
        st is not None
        and st.attempt == attempt
        and st.deadline_ms is not None
        and st.status == ("scheduled" if kind == "run" else "compensating")
    )


def _pool(pool: str) -> dict[str, str]:
    """A scheduled task's pool, on its event only when it is not the default (who runs it, for people)."""
    return {} if pool == DEFAULT_POOL else {"pool": pool}


_UNDONE = ("compensated", "compensation_failed")


class Schedule:
    """Mutates a private copy of the state and collects what the decision emits."""

    def __init__(self, wf: WorkflowDef, s: RunState) -> None:
        self.wf, self.s = wf, s
        self.events: list[RunEvent] = []
        self.tasks: list[StepTask] = []
        self.quarantine: Quarantine | None = None
        self.why = ""
        self._copied: set[str] = set()

    def _mut(self, name: str) -> StepState:
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
        tasks = tuple(t for t in self.tasks if awaits(self.s, t.step, t.attempt, t.kind))
        return Decision(state=self.s, events=tuple(self.events), tasks=tasks, quarantine=self.quarantine)

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

    # -- inputs -------------------------------------------------------------------------------------

    def _low_confidence(self, name: str, output: dict[str, Any]) -> float | None:
        sd = self.wf.step(name)
        if sd.confidence_field is None or sd.min_confidence is None:
            return None
        found, value = lookup(output, sd.confidence_field)
        if not found or not isinstance(value, int | float) or isinstance(value, bool):
            return None
        return float(value) if value < sd.min_confidence else None

    def _can_escalate(self, name: str, reason: str) -> bool:
        sd, st = self.wf.step(name), self.s.steps[name]
        return reason in sd.escalate_on and st.model_index + 1 < len(sd.ladder)

    def _escalate(self, name: str, reason: str, detail: dict[str, Any]) -> None:
        """Move the step to the next model alias on its ladder, with a fresh retry budget."""
        sd, st = self.wf.step(name), self._mut(name)
        before = st.model
        st.model_index += 1
        st.model = sd.ladder[st.model_index]
        st.retry_base = st.attempt
        st.status = "scheduled"
        self.emit(
            "step.escalated", name, st.attempt, {"from": before, "to": st.model, "reason": reason, **detail}
        )
        self._issue(name, "run")

    def _route(self, name: str) -> None:
        sd = self.wf.step(name)
        output = self.s.steps[name].output
        chosen, by = targets(sd.next), "next"
        for i, branch in enumerate(sd.branches):
            if branch.when.holds(output):
                chosen, by = targets(branch.goto), f"branches[{i}]"
                break
        self.emit("run.routed", name, data={"to": chosen, "by": by})
        self.goto(chosen)

    def goto(self, chosen: list[str]) -> None:
        for t in chosen:
            if t.startswith(END):
                self.s.outcome = self.s.outcome or t[len(END) :]
            else:
                self._start(t)

    def _start(self, name: str) -> None:
        s = self.s
        if name in s.steps or s.status != "running":
            return  # each step runs once per run; a join is started by the last branch to arrive
        sd = self.wf.step(name)
        if any(n not in s.steps or s.steps[n].status != "succeeded" for n in sd.needs):
            return
        rung = s.start_rungs.get(name, 0)
        s.steps[name] = StepState(status="scheduled", model=sd.ladder[rung], model_index=rung)
        self._copied.add(name)
        self._issue(name, "run")

    def _issue(self, name: str, kind: Literal["run", "compensate"]) -> None:
        s, sd = self.s, self.wf.step(name)
        st = self._mut(name)
        try:
            task_input = resolve_input(self.wf, s, name)
        except InputMappingError as exc:
            st.status = "failed"
            self._quarantine(name, st.attempt, ErrorKind.INPUT_MAPPING, str(exc))
            return
        if kind == "run" and self._over_budget(name):
            return
        st.attempt += 1
        st.status = "scheduled" if kind == "run" else "compensating"
        st.scheduled_ms = s.clock_ms
        st.deadline_ms = s.clock_ms + round((sd.attempt_s + self.wf.deadline_grace_s) * 1000)
        st.due_ms = None
        agent = (sd.agent if kind == "run" else sd.compensate) or ""
        self.tasks.append(self._task(name, kind, agent, task_input))
        self.emit(
            "step.scheduled" if kind == "run" else "step.compensation_scheduled",
            name,
            st.attempt,
            {"agent": agent, "model": st.model, "deadline_ms": st.deadline_ms, **_pool(sd.pool)},
        )

    def _reissue(self, name: str, kind: Literal["run", "compensate"]) -> None:
        """Send the current attempt of ``name`` again (same attempt, same key) with a fresh deadline."""
        s, sd = self.s, self.wf.step(name)
        st = self._mut(name)
        previous = st.deadline_ms
        st.deadline_ms = s.clock_ms + round((sd.attempt_s + self.wf.deadline_grace_s) * 1000)
        agent = (sd.agent if kind == "run" else sd.compensate) or ""
        self.tasks.append(self._task(name, kind, agent, resolve_input(self.wf, s, name)))
        self.emit(
            "step.reissued",
            name,
            st.attempt,
            {
                "kind": kind,
                "agent": agent,
                "model": st.model,
                "expired_ms": previous,
                "deadline_ms": st.deadline_ms,
                **_pool(sd.pool),
            },
        )

    def _task(
        self, name: str, kind: Literal["run", "compensate"], agent: str, task_input: dict[str, Any]
    ) -> StepTask:
        s, st = self.s, self.s.steps[name]
        return StepTask(
            run_id=s.run_id,
            workflow=s.workflow,
            version=s.version,
            step=name,
            attempt=st.attempt,
            kind=kind,
            agent=agent,
            model=st.model,
            input=task_input,
            tenant=s.tenant,
            issued_ms=s.clock_ms,
            timeout_s=self.wf.step(name).attempt_s,
        )

    def _over_budget(self, name: str) -> bool:
        """Stop the run before an attempt that would take it past its budget."""
        s, sd = self.s, self.wf.step(name)
        if s.budget_usd is None or s.spent_usd + sd.estimated_cost_usd <= s.budget_usd:
            return False
        st = self._mut(name)
        st.status = "cancelled"
        error = (
            f"spent ${s.spent_usd} of a ${s.budget_usd} budget; step {name!r} "
            f"(estimated ${sd.estimated_cost_usd}) would exceed it"
        )
        self.emit(
            "run.over_budget",
            name,
            st.attempt + 1,
            {
                "spent_usd": str(s.spent_usd),
                "budget_usd": str(s.budget_usd),
                "estimated_usd": str(sd.estimated_cost_usd),
            },
        )
        self._quarantine(name, st.attempt, ErrorKind.OVER_BUDGET, error, status="over_budget")
        return True

    def _fail_attempt(
        self, name: str, error_type: str, error: str, retriable: bool, retry_after_ms: int | None = None
    ) -> None:
        s, st = self.s, self._mut(name)
        policy = self.wf.step(name).retry
        compensating = st.status == "compensating"
        st.error_type, st.error = error_type, error
        if retriable and st.attempt - st.retry_base < policy.max_attempts:
            delay = max(backoff_ms(self.wf, s.run_id, name, st.attempt, st.retry_base), retry_after_ms or 0)
            st.due_ms = s.clock_ms + delay
            if not compensating:
                st.status = "retry_wait"
            self.emit(
                "step.retry_scheduled",
                name,
                st.attempt,
                {"due_ms": st.due_ms, "delay_ms": delay, "error_type": error_type},
            )
        elif compensating:
            st.status = "compensation_failed"
            self.emit(
                "step.compensation_failed", name, st.attempt, {"error_type": error_type, "error": error}
            )
            self._next_compensation(done=name)
        elif self._can_escalate(name, "exhausted"):
            self._escalate(name, "exhausted", {"error_type": error_type})
        else:
            st.status = "failed"
            self._quarantine(name, st.attempt, error_type, error)

    def _quarantine(
        self, step: str | None, attempt: int, error_type: str, error: str, status: RunStatus = "quarantined"
    ) -> None:
        s = self.s
        s.status, s.error_type, s.error = status, error_type, error
        self._cancel_active(f"run {status}")
        self.emit(
            "run.quarantined", step, attempt, {"error_type": error_type, "error": error, "status": status}
        )
        self.quarantine = Quarantine(step, attempt, error_type, error)
        self._saga()

    def _cancel_active(self, reason: str) -> None:
        s = self.s
        for name in sorted(s.steps):
            if s.steps[name].status in ("scheduled", "retry_wait", "waiting"):
                st = self._mut(name)
                st.status, st.deadline_ms, st.due_ms = "cancelled", None, None
                self.emit("step.cancelled", name, st.attempt, {"reason": reason})

    def _saga(self) -> None:
        """Compensate the succeeded steps that have a compensation, the last to succeed first."""
        s = self.s
        done = [
            (st.done_seq or 0, n)
            for n, st in s.steps.items()
            if st.status == "succeeded" and self.wf.step(n).compensate
        ]
        s.compensations = [n for _, n in sorted(done, reverse=True)]
        self._next_compensation(done=None)

    def _next_compensation(self, done: str | None) -> None:
        s = self.s
        if done is not None and s.compensations and s.compensations[0] == done:
            s.compensations.pop(0)
        if s.compensations:
            name = s.compensations[0]
            st = self._mut(name)
            st.retry_base = st.attempt
            self._issue(name, "compensate")
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
            self._quarantine(
                None,
                0,
                ErrorKind.STUCK_RUN,
                "no step is active and no outcome was reached (a join waits for a step that did not run?)",
            )
