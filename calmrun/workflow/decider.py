"""The decider: a pure function from (definition, run state, input) to (new state, events, tasks).

No I/O, no clock, no randomness: time arrives on the input (``at_ms``) and only moves the run's clock
forward; backoff jitter is a hash of (run, step, attempt). Re-deciding a run's recorded inputs therefore
rebuilds the same state and the same decisions, and a duplicated or late input is ignored, never applied:
the first result recorded for a step attempt wins.
"""

from __future__ import annotations

from typing import Any, Literal

from calmrun.errors import ErrorKind
from calmrun.workflow.definition import StepDef, WorkflowDef, targets
from calmrun.workflow.events import (
    Answer,
    DeciderInput,
    MigrateRequested,
    RedriveRequested,
    RunEvent,
    RunRequested,
    StepResult,
    StepTask,
    TimerFired,
)
from calmrun.workflow.people import People
from calmrun.workflow.schedule import (
    Decision,
    Quarantine,
    awaits,
    backoff_ms,
    resolve_input,
)
from calmrun.workflow.state import RunState

__all__ = [
    "Decision",
    "Quarantine",
    "awaits",
    "backoff_ms",
    "choose_rung",
    "decide",
    "expired",
    "resolve_input",
    "task_ignored",
]


def decide(wf: WorkflowDef, state: RunState | None, event: DeciderInput) -> Decision:
    """Apply one input to one run.

    Args:
        wf: the run's workflow definition (the same version the run started with).
        state: the run's current state, or None when the run is unknown.
        event: what happened: a request, a step result, a timer, an operator's redrive, a person's
            answer, a signal, a cancel (``calmrun.workflow.people``).
    """
    if isinstance(event, RunRequested):
        if state is not None:
            return _ignored(state, event, "duplicate run request: this run ID already exists")
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
        )
        b = _Builder(wf, s)
        b.emit("run.requested", data={**_request_data(event), "version": wf.version, "digest": wf.digest})
        tb, spent = event.tenant_budget_usd, event.tenant_spent_usd
        if tb is not None and spent is not None and spent >= tb:
            s.status = "refused"
            s.error_type = ErrorKind.TENANT_BUDGET
            window = event.tenant_window or "its window"
            s.error = f"tenant {s.tenant!r} spent ${spent} of its ${tb} budget for {window}"
            b.emit(
                "run.refused",
                data={
                    "tenant": s.tenant,
                    "spent_usd": str(spent),
                    "budget_usd": str(tb),
                    "window": event.tenant_window,
                },
            )
            return b.finish()
        b.choose_rungs(event.model_stats or {})
        b.goto(targets(wf.first))
        return b.finish()
    if state is None:
        return Decision(state=None, ignored=f"no run {event.run_id!r} is known")
    # copy on write: the state's containers are copied here, a step's state only when it changes
    s = state.model_copy()
    s.steps = dict(state.steps)
    s.compensations = list(state.compensations)
    s.clock_ms = max(s.clock_ms, event.at_ms)
    b = _Builder(wf, s)
    if isinstance(event, StepResult):
        return b.on_result(event) or _ignored(state, event, b.why)
    if isinstance(event, TimerFired):
        return b.on_timer(event.at_ms) or _ignored(state, event, "nothing is due")
    if isinstance(event, RedriveRequested):
        return b.on_redrive(event.by) or _ignored(state, event, b.why)
    if isinstance(event, MigrateRequested):
        return b.on_migrate(event) or _ignored(state, event, b.why)
    return b.on_person(event) or _ignored(state, event, b.why)


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
    return data


def choose_rung(sd: StepDef, figures: dict[str, dict[str, Any]]) -> tuple[int, str]:
    """The starting rung of a step with ``choose`` from the figures stamped on the request, and why."""
    assert sd.choose is not None
    rule = sd.choose.cheapest_meeting
    for i, alias in enumerate(sd.models):
        f = figures.get(alias) or {}
        attempts, accepted = int(f.get("attempts", 0)), int(f.get("accepted", 0))
        if attempts < rule.min_attempts:
            return i, f"{alias}: {attempts} attempts in the window, fewer than {rule.min_attempts}"
        rate = accepted / attempts
        if rate >= rule.success_rate:
            return i, f"{alias}: success rate {rate:.3f} over {attempts} attempts meets {rule.success_rate}"
    return 0, f"no alias meets success rate {rule.success_rate}: the ladder from its first rung"


def task_ignored(state: RunState | None, task: StepTask, at_ms: int) -> RunEvent | None:
    """Should this task record run? None if its attempt is in flight, else the ``input.ignored`` to log.

    The shell asks this for every task record it reads (a stale copy, a task of a finished run); it
    shares ``awaits`` with the result path, so a task runs exactly when its result would count.
    """
    if state is not None and awaits(state, task.step, task.attempt, task.kind):
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


def expired(state: RunState, now_ms: int) -> list[str]:
    """Idempotency keys of the attempts whose deadline has passed at ``now_ms`` (what a timer re-issues)."""
    return [
        f"{state.run_id}/{name}/{'compensate' if st.status == 'compensating' else 'run'}/{st.attempt}"
        for name, st in sorted(state.steps.items())
        if st.deadline_ms is not None and st.deadline_ms <= now_ms
    ]


def _ignored(state: RunState, event: DeciderInput, reason: str) -> Decision:
    data: dict[str, Any] = {"reason": reason, "input": type(event).__name__}
    step = attempt = None
    if isinstance(event, StepResult):
        step, attempt = event.step, event.attempt
        data["kind"] = event.kind
        data["ok"] = event.ok
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


class _Builder(People):
    """What each kind of input does to a run (the transitions themselves are in ``Schedule``)."""

    def on_result(self, r: StepResult) -> Decision | None:
        st = self.s.steps.get(r.step)
        if st is None or not awaits(self.s, r.step, r.attempt, r.kind):
            where = f"{st.status} at attempt {st.attempt}" if st else "not started"
            self.why = (
                f"late or duplicate {r.kind} result for {r.step!r} attempt {r.attempt} (step is {where})"
            )
            return None
        st = self._mut(r.step)
        if r.ok:
            self.emit("step.succeeded", r.step, r.attempt, {"kind": r.kind, "output": r.output}, r.cost)
        else:
            data: dict[str, Any] = {
                "kind": r.kind,
                "error_type": r.error_type,
                "error": r.error,
                "retriable": r.retriable,
            }
            if r.retry_after_ms is not None:
                data["retry_after_ms"] = r.retry_after_ms
            self.emit("step.failed", r.step, r.attempt, data, r.cost)
        self.s.spent_usd += r.cost.cost_usd
        st.deadline_ms = None
        st.finished_ms = self.s.clock_ms
        if r.kind == "compensate":
            if r.ok:
                st.status = "compensated"
                self.emit("step.compensated", r.step, r.attempt)
                self._next_compensation(done=r.step)
            else:
                self._fail_attempt(
                    r.step, r.error_type or "Error", r.error or "", r.retriable, r.retry_after_ms
                )
        elif r.ok:
            low = self._low_confidence(r.step, r.output or {})
            if low is not None and self._can_escalate(r.step, "low_confidence"):
                self._escalate(r.step, "low_confidence", {"confidence": low})
            else:
                st.status, st.output = "succeeded", dict(r.output or {})
                st.error_type = st.error = None
                st.done_seq = self.s.seq
                self._route(r.step)
        elif r.error_type == ErrorKind.INVALID_OUTPUT and self._can_escalate(r.step, "invalid_output"):
            st.error_type, st.error = r.error_type, r.error
            self._escalate(r.step, "invalid_output", {"error": (r.error or "")[:500]})
        else:
            self._fail_attempt(r.step, r.error_type or "Error", r.error or "", r.retriable, r.retry_after_ms)
        return self.finish()

    def on_timer(self, now: int) -> Decision | None:
        # what is due is judged by the timer's own time, not the run clock: a re-delivered old timer
        # finds nothing due and is ignored
        due = sorted(
            (name, st)
            for name, st in self.s.steps.items()
            if (st.due_ms is not None and st.due_ms <= now)
            or (st.deadline_ms is not None and st.deadline_ms <= now)
        )
        if not due:
            return None
        self.emit("timer.fired", data={"due": [name for name, _ in due], "at_ms": now})
        # expiries first: one may quarantine the run, and then no retry of a sibling may be issued
        for name, _ in sorted(due, key=lambda d: (d[1].due_ms is not None, d[0])):
            st = self._mut(name)  # an earlier iteration may have changed it (a quarantine cancels)
            kind: Literal["run", "compensate"] = "compensate" if st.status == "compensating" else "run"
            if st.due_ms is not None:
                if st.status == "waiting":
                    self.on_wait_due(name)
                elif kind == "compensate" or st.status == "retry_wait":
                    self._issue(name, kind)
            elif st.deadline_ms is not None:
                # no result by the deadline: the task was lost (or waits behind a backlog), it did not
                # fail. Issue the same attempt again under the same idempotency key; a new attempt is
                # only ever made for a failure or timeout that the attempt itself reported.
                self._reissue(name, kind)
        return self.finish()

    def on_redrive(self, by: str | None = None) -> Decision | None:
        s = self.s
        if s.status not in ("quarantined", "over_budget") or s.compensations:
            self.why = f"redrive needs a quarantined run; this one is {s.status}"
            return None
        undone = sorted(n for n, st in s.steps.items() if st.status in ("compensated", "compensation_failed"))
        if undone:
            self.why = f"redrive refused: steps {undone} were compensated, so the run cannot continue"
            return None
        self.emit("run.redrive_requested", data={"previous_error": s.error, **({"by": by} if by else {})})
        s.status, s.error_type, s.error = "running", None, None
        for name in sorted(s.steps):
            if s.steps[name].status in ("failed", "cancelled"):
                st = self._mut(name)
                st.retry_base = st.attempt
                self._issue(name, "run")
        return self.finish()

    def on_migrate(self, m: MigrateRequested) -> Decision | None:
        """Pin the run to another definition (``wf`` is that one; ``calmrun deploy check`` vouched for it)."""
        s = self.s
        if s.status != "running":
            self.why = f"migrate needs a running run; this one is {s.status}"
            return None
        if m.checked_seq is not None and s.seq != m.checked_seq:
            self.why = f"the run moved on since it was checked (seq {s.seq}, checked at {m.checked_seq})"
            return None
        if (s.version, s.digest) == (m.version, m.digest):
            self.why = f"the run is on version {m.version} ({m.digest}) already"
            return None
        names = {sd.name for sd in self.wf.steps}
        missing = sorted(n for n in s.steps if n not in names)
        if missing:
            self.why = f"migrate refused: version {m.version} has no steps {missing}, which this run has"
            return None
        before = {"version": s.version, "digest": s.digest}
        s.version, s.digest = m.version, m.digest
        to = {"version": m.version, "digest": m.digest}
        data: dict[str, Any] = {"from": before, "to": to, "checked_seq": m.checked_seq}
        self.emit("run.migrated", data={**data, **({"by": m.by} if m.by else {})})
        return self.finish()

    # -- decisions ----------------------------------------------------------------------------------

    def choose_rungs(self, stats: dict[str, dict[str, dict[str, Any]]]) -> None:
        """Pick each ``choose`` step's starting rung now, from the figures on the request (one event each)."""
        for sd in self.wf.steps:
            if sd.choose is None:
                continue
            figures = stats.get(sd.name) or {}
            rung, why = choose_rung(sd, figures)
            self.s.start_rungs[sd.name] = rung
            self.emit(
                "step.model_chosen",
                sd.name,
                data={"model": sd.models[rung], "rung": rung, "why": why, "figures": figures},
            )
