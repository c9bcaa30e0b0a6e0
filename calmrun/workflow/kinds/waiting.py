"""What the kinds that wait for people share (approval, wait): they rest, then resume or time out.

Starting such a step records ``step.waiting`` and sets it ``waiting``, with ``due_ms`` = now +
``timeout_s`` when the step has one: the run then rests in its state, and the timer of
``RunState.next_due_ms`` (restored with the state after any restart) is the only thing that wakes it. No
task, no thread, no polling. A timeout records ``step.timed_out`` and routes to ``on_timeout``; without
one the step fails with ``WaitTimeout`` and the run is quarantined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from calmrun.errors import ErrorKind
from calmrun.workflow.steps import StepDef, Target, targets

if TYPE_CHECKING:
    from calmrun.workflow.transitions import Transitions


class WaitingStep(StepDef):
    """A step that runs no agent: the run waits durably for an answer, at most ``timeout_s``."""

    on_timeout: Target | None = Field(
        None,
        description="where the run goes when timeout_s passes unanswered "
        "(none: the step fails and the run is quarantined)",
    )

    @property
    def wait_ms(self) -> int | None:
        """How long the step waits (None: until answered)."""
        return None if self.timeout_s is None else round(self.timeout_s * 1000)

    def exits(self) -> list[tuple[str, Target]]:
        return [] if self.on_timeout is None else [("on_timeout", self.on_timeout)]

    def waiting_data(self) -> dict[str, Any]:
        """What ``step.waiting`` says besides the kind and when it times out."""
        return {}

    def issue(self, t: Transitions, name: str) -> None:
        s, st = t.s, t.mut(name)
        st.attempt += 1
        st.status, st.scheduled_ms, st.deadline_ms = "waiting", s.clock_ms, None
        wait = self.wait_ms
        st.due_ms = None if wait is None else s.clock_ms + wait
        data = {"kind": self.kind, "due_ms": st.due_ms, **self.waiting_data(), **t.iteration_of(name)}
        t.emit("step.waiting", name, st.attempt, data)

    def due(self, t: Transitions, name: str) -> None:
        """The step's ``due_ms`` passed with no answer: take ``on_timeout``, or fail the step."""
        st = t.mut(name)
        if st.status != "waiting" or st.due_ms is None:
            return
        st.due_ms, st.finished_ms = None, t.s.clock_ms
        to = targets(self.on_timeout) if self.on_timeout is not None else None
        t.emit("step.timed_out", name, st.attempt, {"kind": self.kind, "to": to})
        if to is None:
            st.status = "failed"
            st.error_type = ErrorKind.WAIT_TIMEOUT
            st.error = f"{self.kind} step {name!r} got no answer in {self.timeout_s}s and has no on_timeout"
            t.quarantine_run(name, st.attempt, st.error_type, st.error)
            return
        st.status = "timed_out"
        t.emit("run.routed", name, data={"to": to, "by": "on_timeout"})
        t.goto(to)
