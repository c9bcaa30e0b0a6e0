"""People in the loop: approval and wait steps, answers, signals, cancel (transitions of the decider).

An approval or wait step runs no agent. Starting it records ``step.waiting`` and sets the step
``waiting``, with ``due_ms`` = now + ``timeout_s`` when the step has one: the run then rests in its state,
and the timer of ``RunState.next_due_ms`` (restored with the state after any restart) is the only thing
that wakes it. No task, no thread, no polling.

- An answer (``Answer``: approve or reject) of a waiting approval step, by one of its ``approvers`` (any
  one when the list is empty), records ``step.approved``/``step.rejected`` with who and the comment. The
  step's output is ``{"approved": bool, "by": ..., "comment": ...}``; a rejection goes to ``on_reject``
  when the step has one, else the run routes on the output (``branches``, ``next``) as after any step.
  An answer from someone else, for a step that is not waiting, or a second answer is ignored
  (``input.ignored`` says why).
- A signal (``SignalReceived``) resumes every step waiting for its name, with the payload as output
  (``signal.received``, then ``step.signalled``). A signal that arrives before any step waits for it is
  kept in ``RunState.signals`` (as Temporal buffers signals) when a step of the workflow that has not
  started yet waits for that name; the next such step to start takes it at once. Else it is ignored.
- A timeout (``timer.fired`` at ``due_ms``) records ``step.timed_out`` and routes to ``on_timeout``;
  without one the step fails with ``WaitTimeout`` and the run is quarantined.
- Cancel (``CancelRequested``) of a running run records ``run.cancel_requested``, cancels its active
  steps and compensates its succeeded steps in reverse order (the quarantine's saga, with no dead
  letter): the run ends ``cancelled`` with ``run.cancelled`` once the last compensation is done. A
  quarantined run (its saga ran at the quarantine) is closed for good the same way: no redrive after.

Pure, as the decider is: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any, Literal

from calmrun.errors import ErrorKind
from calmrun.workflow.definition import StepDef, targets
from calmrun.workflow.events import Answer, CancelRequested, PersonInput, SignalReceived
from calmrun.workflow.schedule import Decision, Schedule

CANCELLABLE = ("running", "quarantined", "over_budget")
MAX_BUFFERED = 10
"""Signals of one name kept for a step that has not started yet; more are ignored (``calmrun.limits``
counts them in the largest run state)."""


class People(Schedule):
    """The transitions of approval and wait steps, signals and cancel (see the module docstring)."""

    def on_person(self, event: PersonInput) -> Decision | None:
        if isinstance(event, Answer):
            return self.on_answer(event)
        if isinstance(event, SignalReceived):
            return self.on_signal(event)
        return self.on_cancel(event)

    def on_answer(self, a: Answer) -> Decision | None:
        sd = self._def(a.step)
        if sd is None or sd.kind != "approval":
            self.why = f"{a.step!r} is not an approval step of workflow {self.wf.name!r}"
            return None
        st = self.s.steps.get(a.step)
        if st is not None and st.status == "succeeded" and st.output is not None:
            was = "approved" if st.output.get("approved") else "rejected"
            self.why = f"a second answer: {a.step!r} was already {was} by {st.output.get('by')!r}"
            return None
        if st is None or st.status != "waiting":
            self.why = (
                f"step {a.step!r} is not waiting for an answer (it is {st.status if st else 'not started'})"
            )
            return None
        if sd.approvers and a.by not in sd.approvers:
            self.why = f"{a.by!r} may not answer {a.step!r}: its approvers are {sd.approvers}"
            return None
        verb: Literal["step.approved", "step.rejected"] = "step.approved" if a.approved else "step.rejected"
        self.emit(verb, a.step, st.attempt, {"by": a.by, "comment": a.comment})
        output = {"approved": a.approved, "by": a.by, "comment": a.comment}
        self._resume(a.step, output, rejected=not a.approved)
        return self.finish()

    def on_signal(self, sig: SignalReceived) -> Decision | None:
        s = self.s
        if s.status != "running":
            self.why = f"signal {sig.name!r} for a run that is {s.status}"
            return None
        waiting = [
            n
            for n, st in sorted(s.steps.items())
            if st.status == "waiting" and self.wf.step(n).signal == sig.name
        ]
        later = [d.name for d in self.wf.steps if d.signal == sig.name and d.name not in s.steps]
        kept = list(s.signals.get(sig.name) or [])
        if not waiting and not later:
            self.why = f"no step of this run waits for signal {sig.name!r}, now or later"
            return None
        if not waiting and len(kept) >= MAX_BUFFERED:
            self.why = f"{len(kept)} signals {sig.name!r} are kept already, for steps not started"
            return None
        data: dict[str, Any] = {"name": sig.name, "data": sig.data, "by": sig.by, "to": waiting}
        self.emit("signal.received", data=data)
        if not waiting:
            s.signals = {**s.signals, sig.name: [*kept, dict(sig.data)]}  # copy: the input state is shared
        for name in waiting:
            self.emit("step.signalled", name, s.steps[name].attempt, {"name": sig.name, "buffered": False})
            self._resume(name, dict(sig.data))
        return self.finish()

    def on_cancel(self, c: CancelRequested) -> Decision | None:
        s = self.s
        was = s.status
        if was not in CANCELLABLE:
            self.why = f"cancel needs a running or quarantined run; this one is {was}"
            return None
        self.emit("run.cancel_requested", data={"reason": c.reason, "by": c.by, "status": was})
        why = f"cancelled{f' by {c.by}' if c.by else ''}: {c.reason or 'no reason given'}"
        if was != "running":  # its saga ran (or runs) at the quarantine: the run is closed for good
            why += f" (it was {was}: {s.error_type}: {s.error})"
        s.status, s.error_type, s.error = "cancelled", None, why
        if was == "running":
            self._cancel_active("run cancelled")
            self._saga()  # emits run.cancelled when the last compensation is done (or at once: none)
        elif not s.compensations:
            self._next_compensation(done=None)  # nothing left to undo: run.cancelled now
        return self.finish()

    def on_wait_due(self, name: str) -> None:
        """The step's ``due_ms`` passed with no answer: take ``on_timeout``, or fail the step."""
        sd, st = self.wf.step(name), self._mut(name)
        st.due_ms, st.finished_ms = None, self.s.clock_ms
        to = targets(sd.on_timeout) if sd.on_timeout is not None else None
        self.emit("step.timed_out", name, st.attempt, {"kind": sd.kind, "to": to})
        if to is None:
            st.status = "failed"
            st.error_type = ErrorKind.WAIT_TIMEOUT
            st.error = f"{sd.kind} step {name!r} got no answer in {sd.timeout_s}s and has no on_timeout"
            self._quarantine(name, st.attempt, st.error_type, st.error)
            return
        st.status = "timed_out"
        self.emit("run.routed", name, data={"to": to, "by": "on_timeout"})
        self.goto(to)

    # -- transitions ----------------------------------------------------------------------------------

    def _issue(self, name: str, kind: Literal["run", "compensate"]) -> None:
        if self.wf.step(name).kind == "agent":
            super()._issue(name, kind)
        else:
            self._wait(name)

    def _wait(self, name: str) -> None:
        s, sd, st = self.s, self.wf.step(name), self._mut(name)
        st.attempt += 1
        st.status, st.scheduled_ms, st.deadline_ms = "waiting", s.clock_ms, None
        wait = sd.wait_ms
        st.due_ms = None if wait is None else s.clock_ms + wait
        data: dict[str, Any] = {"kind": sd.kind, "due_ms": st.due_ms}
        if sd.kind == "approval":
            data["approvers"] = list(sd.approvers)
        else:
            data["signal"] = sd.signal
        self.emit("step.waiting", name, st.attempt, data)
        kept = list(s.signals.get(sd.signal or "") or [])
        if sd.kind == "wait" and kept:
            assert sd.signal is not None
            payload = kept.pop(0)
            s.signals = {k: v for k, v in s.signals.items() if k != sd.signal}
            if kept:
                s.signals[sd.signal] = kept
            self.emit("step.signalled", name, st.attempt, {"name": sd.signal, "buffered": True})
            self._resume(name, dict(payload))

    def _resume(self, name: str, output: dict[str, Any], *, rejected: bool = False) -> None:
        s, sd, st = self.s, self.wf.step(name), self._mut(name)
        st.status, st.output, st.due_ms, st.finished_ms = "succeeded", output, None, s.clock_ms
        st.done_seq = s.seq
        if rejected and sd.on_reject is not None:
            to = targets(sd.on_reject)
            self.emit("run.routed", name, data={"to": to, "by": "on_reject"})
            self.goto(to)
        else:
            self._route(name)

    def _def(self, name: str) -> StepDef | None:
        try:
            return self.wf.step(name)
        except KeyError:
            return None
