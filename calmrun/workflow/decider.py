"""The decider: a pure function from (definition, run state, input) to (new state, events, tasks).

No I/O, no clock, no randomness: time arrives on the input (``at_ms``) and only moves the run's clock
forward; backoff jitter is a hash of (run, step, attempt). Re-deciding a run's recorded inputs therefore
rebuilds the same state and the same decisions, and a duplicated or late input is ignored, never applied:
the first result recorded for a step attempt wins.

Each input goes to the room that owns it: a step's result to the agent kind, an answer to the approval
kind, a signal to the wait kind, a timer to the kind of each step it finds due, an operator's command to
``calmrun.workflow.operator``. What they share (route, quarantine, compensate, settle) is
``calmrun.workflow.transitions``.
"""

from __future__ import annotations

from typing import Any

from calmrun.errors import ErrorKind
from calmrun.workflow.definition import WorkflowDef, targets
from calmrun.workflow.events import (
    Answer,
    CancelRequested,
    ChildFinished,
    CommandHeld,
    DeciderInput,
    HeldReleased,
    MigrateRequested,
    RedriveRequested,
    RunEvent,
    RunRequested,
    SignalReceived,
    StepResult,
    StepTask,
    TimerFired,
    attempt_key,
)
from calmrun.workflow.kinds import AgentStep, approval, child, wait
from calmrun.workflow.kinds import agent as agent_kind
from calmrun.workflow.kinds import map as map_kind
from calmrun.workflow.kinds.agent import backoff_ms, choose_rung, resolve_input
from calmrun.workflow.operator import cancel, held, migrate, redrive
from calmrun.workflow.state import RunState
from calmrun.workflow.transitions import Decision, Quarantine, Transitions, awaits

__all__ = [
    "Decision",
    "Quarantine",
    "awaited_tasks",
    "awaits",
    "backoff_ms",
    "choose_rung",
    "decide",
    "expired",
    "resolve_input",
    "task_ignored",
]


def decide(wf: WorkflowDef | None, state: RunState | None, event: DeciderInput) -> Decision:
    """Apply one input to one run.

    Args:
        wf: the run's workflow definition (the one the run is pinned to); None only for holding and
            releasing a command (``CommandHeld``, ``HeldReleased``), which a worker without the run's
            definition decides.
        state: the run's current state, or None when the run is unknown.
        event: what happened: a request, a step result, a timer, an operator's command, a person's
            answer, a signal.
    """
    if isinstance(event, RunRequested):
        assert wf is not None
        if state is not None:
            return _ignored(state, event, "duplicate run request: this run ID already exists")
        return _start(wf, event)
    if state is None:
        return Decision(state=None, ignored=f"no run {event.run_id!r} is known")
    if isinstance(event, CommandHeld | HeldReleased):
        d = held(state, event)
        return d if d.ignored is None else _ignored(state, event, d.ignored)
    assert wf is not None, f"{type(event).__name__} is decided with the run's definition"
    # copy on write: the state's containers are copied here, a step's state only when it changes
    s = state.model_copy()
    s.steps = dict(state.steps)
    s.compensations = list(state.compensations)
    s.clock_ms = max(s.clock_ms, event.at_ms)
    t = Transitions(wf, s)
    if isinstance(event, StepResult):
        done = _result(t, event)
    elif isinstance(event, TimerFired):
        done = _timer(t, event.at_ms)
    elif isinstance(event, RedriveRequested):
        done = redrive(t, event.by)
    elif isinstance(event, MigrateRequested):
        done = migrate(t, event)
    elif isinstance(event, Answer):
        done = approval.answer(t, event)
    elif isinstance(event, SignalReceived):
        done = wait.signalled(t, event)
    elif isinstance(event, ChildFinished):
        done = child.finished(t, event)
    else:
        assert isinstance(event, CancelRequested)
        done = cancel(t, event)
    return t.finish() if done else _ignored(state, event, t.why)


def _start(wf: WorkflowDef, event: RunRequested) -> Decision:
    s = RunState(
        run_id=event.run_id,
        workflow=wf.name,
        version=wf.version,
        digest=wf.digest,
        tenant=event.tenant,
        input=dict(event.input),
        created_ms=event.at_ms,
        clock_ms=event.at_ms,
        budget_usd=event.budget_usd if event.budget_usd is not None else wf.budget_usd,
        parent=dict(event.parent) if event.parent else None,
        history=event.history,
    )
    t = Transitions(wf, s)
    t.emit("run.requested", data={**_request_data(event), "version": wf.version, "digest": wf.digest})
    tb, spent = event.tenant_budget_usd, event.tenant_spent_usd
    if tb is not None and spent is not None and spent >= tb:
        s.status = "refused"
        s.error_type = ErrorKind.TENANT_BUDGET
        window = event.tenant_window or "its window"
        s.error = f"tenant {s.tenant!r} spent ${spent} of its ${tb} budget for {window}"
        window_ = event.tenant_window
        t.emit(
            "run.refused",
            data={"tenant": s.tenant, "spent_usd": str(spent), "budget_usd": str(tb), "window": window_},
        )
        return t.finish()
    _choose_rungs(t, event.model_stats or {})
    t.goto(targets(wf.first))
    return t.finish()


def _choose_rungs(t: Transitions, stats: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Pick each ``choose`` step's starting rung now, from the figures on the request (one event each)."""
    for sd in t.wf.steps:
        if not isinstance(sd, AgentStep) or sd.choose is None:
            continue
        figures = stats.get(sd.name) or {}
        rung, why = choose_rung(sd, figures)
        t.s.start_rungs[sd.name] = rung
        t.emit(
            "step.model_chosen",
            sd.name,
            data={"model": sd.models[rung], "rung": rung, "why": why, "figures": figures},
        )


def _result(t: Transitions, r: StepResult) -> bool:
    st = t.s.steps.get(r.step)
    if st is None or not awaits(t.s, r.step, r.attempt, r.kind, r.element):
        where = f"{st.status} at attempt {st.attempt}" if st else "not started"
        what = r.step if r.element is None else f"{r.step}[{r.element}]"
        t.why = f"late or duplicate {r.kind} result for {what!r} attempt {r.attempt} (step is {where})"
        return False
    if r.element is None:
        agent_kind.result(t, r)
    else:
        map_kind.result(t, r)
    return True


def _timer(t: Transitions, now: int) -> bool:
    # what is due is judged by the timer's own time, not the run clock: a re-delivered old timer
    # finds nothing due and is ignored
    due = sorted(
        (name, st)
        for name, st in t.s.steps.items()
        if any(at is not None and at <= now for at in (st.due_ms, st.deadline_ms))
    )
    if not due:
        t.why = "nothing is due"
        return False
    t.emit("timer.fired", data={"due": [name for name, _ in due], "at_ms": now})
    # expiries first: one may quarantine the run, and then no retry of a sibling may be issued
    for name, _ in sorted(due, key=lambda d: (d[1].due_ms is not None, d[0])):
        t.wf.step(name).due(t, name)
    return True


def _request_data(event: RunRequested) -> dict[str, Any]:
    data: dict[str, Any] = {"input": dict(event.input)}
    for name in ("budget_usd", "tenant_budget_usd", "tenant_spent_usd"):
        value = getattr(event, name)
        if value is not None:
            data[name] = str(value)
    if event.tenant_window is not None:
        data["tenant_window"] = event.tenant_window
    if event.model_stats is not None:
        data["model_stats"] = event.model_stats
    if event.parent is not None:
        data["parent"] = event.parent
    if event.history != 1:  # a history of format 1 says nothing, as before there were formats
        data["history"] = event.history
    return data


def task_ignored(state: RunState | None, task: StepTask, at_ms: int) -> RunEvent | None:
    """Should this task record run? None if its attempt is in flight, else the ``input.ignored`` to log.

    The shell asks this for every task record it reads (a stale copy, a task of a finished run); it
    shares ``awaits`` with the result path, so a task runs exactly when its result would count.
    """
    if state is not None and awaits(state, task.step, task.attempt, task.kind, task.element):
        return None
    st = state.steps.get(task.step) if state else None
    where = f"{st.status} at attempt {st.attempt}" if st else "unknown"
    return RunEvent(
        run_id=task.run_id,
        seq=-1,
        type="input.ignored",
        at_ms=at_ms,
        workflow=task.workflow,
        version=task.version,
        tenant=task.tenant,
        step=task.step,
        attempt=task.attempt,
        data={
            "reason": f"stale task not executed: {task.kind} {task.step!r} #{task.attempt} (step {where})",
            "input": "StepTask",
        },
    )


def awaited_tasks(wf: WorkflowDef, state: RunState) -> tuple[StepTask, ...]:
    """The tasks of every attempt ``state`` awaits (``awaits``), rebuilt as the decisions that last issued
    them made them: same run, step, attempt, idempotency key, input and issue time.

    What a new owner of the run starts when it restores the state, for steps whose tasks are not written
    to a step topic (``streams.deciding``). An attempt waiting for its retry is not in flight (its timer
    issues it), nor is a wait, an approval or a child run; an attempt whose input no longer maps is left
    out (its deadline re-issues it, and the decider then quarantines the run as it would have).
    """
    found: list[StepTask] = []
    for sd in wf.steps:  # a stopped run may still compensate: what it awaits says so, whatever its status
        name = sd.name
        if name not in state.steps:
            continue
        if isinstance(sd, AgentStep):
            task = agent_kind.awaited_task(wf, state, name)
            found += [task] if task is not None else []
        elif isinstance(sd, map_kind.MapStep):
            found += map_kind.awaited_tasks(wf, state, name)
    return tuple(t for t in found if awaits(state, t.step, t.attempt, t.kind, t.element))


def expired(state: RunState, now_ms: int) -> list[str]:
    """Idempotency keys of the attempts whose deadline has passed at ``now_ms`` (what a timer re-issues)."""
    keys = []
    for name, st in sorted(state.steps.items()):
        if st.deadline_ms is None or st.deadline_ms > now_ms:
            continue
        if st.map is not None:  # a map: its elements' attempts
            for e, el in sorted(st.map.running.items(), key=lambda kv: int(kv[0])):
                if el.deadline_ms is not None and el.deadline_ms <= now_ms:
                    keys.append(attempt_key(state.run_id, name, "run", el.attempt, st.iteration, int(e)))
            continue
        kind = "compensate" if st.status == "compensating" else "run"
        keys.append(attempt_key(state.run_id, name, kind, st.attempt, st.iteration))
    return keys


def _ignored(state: RunState, event: DeciderInput, reason: str) -> Decision:
    data: dict[str, Any] = {"reason": reason, "input": type(event).__name__}
    step = attempt = None
    if isinstance(event, StepResult):
        step, attempt = event.step, event.attempt
        data["kind"] = event.kind
        data["ok"] = event.ok
        if event.element is not None:
            data["element"] = event.element
    elif isinstance(event, Answer):
        step = event.step
        data["by"] = event.by
    log = RunEvent(
        run_id=state.run_id,
        seq=-1,
        type="input.ignored",
        at_ms=event.at_ms,
        workflow=state.workflow,
        version=state.version,
        tenant=state.tenant,
        step=step,
        attempt=attempt,
        data=data,
    )
    return Decision(state=state, events=(log,), ignored=reason)
