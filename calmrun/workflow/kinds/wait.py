"""``kind: wait``: the run waits for a named signal (``calmrun signal``, a partner's webhook).

A signal (``SignalReceived``) resumes every step waiting for its name, with the payload as output
(``signal.received``, then ``step.signalled``). A signal that arrives before any step waits for it is kept
in ``RunState.signals`` (as Temporal buffers signals) when a step of the workflow that has not started yet
waits for that name; the next such step to start takes it at once. Else it is ignored. Waiting and timing
out: ``calmrun.workflow.kinds.waiting``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from calmrun.workflow.events import SignalReceived
from calmrun.workflow.kinds.waiting import WaitingStep

if TYPE_CHECKING:
    from calmrun.workflow.transitions import Transitions

MAX_BUFFERED = 10
"""Signals of one name kept for a step that has not started yet; more are ignored (``calmrun.limits``
counts them in the largest run state)."""


class WaitStep(WaitingStep):
    """A step that waits for a signal by name."""

    KIND = "wait"
    kind: Literal["wait"] = "wait"
    signal: str | None = Field(None, description="the name of the signal the step waits for")

    @model_validator(mode="after")
    def _has_signal(self) -> WaitStep:
        if not self.signal:
            raise ValueError(f"step {self.name!r}: a wait step needs `signal` (the name it waits for)")
        return self

    def waiting_data(self) -> dict[str, Any]:
        return {"signal": self.signal}

    def issue(self, t: Transitions, name: str) -> None:
        super().issue(t, name)
        s, signal = t.s, self.signal or ""
        kept = list(s.signals.get(signal) or [])
        if kept:
            payload = kept.pop(0)
            s.signals = {k: v for k, v in s.signals.items() if k != signal}
            if kept:
                s.signals[signal] = kept
            t.emit("step.signalled", name, s.steps[name].attempt, {"name": signal, "buffered": True})
            t.succeed(name, dict(payload))
            t.route(name)


def signalled(t: Transitions, sig: SignalReceived) -> bool:
    """Resume the steps waiting for ``sig``, or keep it for one to come; False (``t.why``) if neither."""
    s = t.s
    if s.status != "running":
        t.why = f"signal {sig.name!r} for a run that is {s.status}"
        return False
    waits = {sd.name: sd for sd in t.wf.steps if isinstance(sd, WaitStep) and sd.signal == sig.name}
    waiting = [n for n, st in sorted(s.steps.items()) if st.status == "waiting" and n in waits]
    later = [n for n in waits if n not in s.steps]
    kept = list(s.signals.get(sig.name) or [])
    if not waiting and not later:
        t.why = f"no step of this run waits for signal {sig.name!r}, now or later"
        return False
    if not waiting and len(kept) >= MAX_BUFFERED:
        t.why = f"{len(kept)} signals {sig.name!r} are kept already, for steps not started"
        return False
    data: dict[str, Any] = {"name": sig.name, "data": sig.data, "by": sig.by, "to": waiting}
    t.emit("signal.received", data=data)
    if not waiting:
        s.signals = {**s.signals, sig.name: [*kept, dict(sig.data)]}  # copy: the input state is shared
    for name in waiting:
        t.emit("step.signalled", name, s.steps[name].attempt, {"name": sig.name, "buffered": False})
        t.succeed(name, dict(sig.data))
        t.route(name)
    return True
