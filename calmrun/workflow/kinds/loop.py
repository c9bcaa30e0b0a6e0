"""``kind: loop``: a bounded back edge. The run goes back to an earlier step, at most ``max_iterations``
times in all, until a condition on the run's outputs holds.

```yaml
- name: draft
  agent: drafter
  input: {feedback: steps.critique.feedback}   # the last iteration's critique (absent the first time)
  next: critique
- name: critique
  agent: critic
  next: enough
- name: enough
  kind: loop
  goto: draft                                   # the first step of the body
  until: {field: steps.critique.score, op: ge, value: 0.8}
  max_iterations: 3
  next: publish                                 # until held
  on_exhausted: end:needs_review                # 3 iterations and it never held (none: quarantine)
```

The body is every step on a path from ``goto`` to the loop step. Reaching the loop step decides at once
(no task): when ``until`` holds, the step succeeds with ``{"iterations": n, "until": true}`` and the run
routes on (``next``, ``branches``). Otherwise, below the bound, ``step.looped`` records iteration i + 1:
each step of the body (and the loop step) becomes ``looped``, keeping its last output for the next
iteration's inputs, and ``goto`` starts again. Each visit of a body step is a new execution with its
``iteration`` in its state, on its events (``step.scheduled``, ``run.routed``, ...) and in its task's
idempotency key (``run/step#i/run/attempt``); attempt numbers go on across iterations, so a late result of
an earlier iteration is ignored as any stale result is. At the bound, ``step.loop_exhausted``, then
``on_exhausted``, or the run is quarantined with ``LoopExhausted``. Without ``until`` the loop is counted:
the body runs ``max_iterations`` times, then the run goes ``next``.

Loops do not nest (a loop's body holds no other loop step), and a step of the body is compensated once,
for its last iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from calmrun.errors import ErrorKind
from calmrun.workflow.state import ACTIVE
from calmrun.workflow.steps import Condition, StepDef, Target, targets

if TYPE_CHECKING:
    from calmrun.workflow.definition import WorkflowDef
    from calmrun.workflow.transitions import Transitions

MAX_ITERATIONS = 1000


class LoopStep(StepDef):
    """Go back to ``goto`` until ``until`` holds, at most ``max_iterations`` iterations of the body."""

    KIND = "loop"
    kind: Literal["loop"] = "loop"
    goto: str = Field(description="the earlier step the body starts at")
    max_iterations: int = Field(
        ge=1, le=MAX_ITERATIONS, description="iterations of the body, the first included"
    )
    until: Condition | None = Field(
        None,
        description="a test on the run ('steps.<step>.<field>', 'input.<field>'): when it holds the run goes "
        "next; none: a counted loop",
    )
    on_exhausted: Target | None = Field(
        None,
        description="where the run goes when max_iterations passed and until never held (none: quarantine)",
    )

    def exits(self) -> list[tuple[str, Target]]:
        return [] if self.on_exhausted is None else [("on_exhausted", self.on_exhausted)]

    def back_edges(self) -> list[str]:
        return [self.goto]

    def validate_in(self, steps: set[str]) -> None:
        if self.goto not in steps:
            raise ValueError(f"step {self.name!r} goto: unknown step {self.goto!r}")

    def body(self, wf: WorkflowDef) -> list[str]:
        """The steps on a path from ``goto`` to this loop step (this step excluded), in definition order."""
        return wf.between(self.goto, self.name)

    # -- transitions --------------------------------------------------------------------------------

    def issue(self, t: Transitions, name: str) -> None:
        s, st = t.s, t.mut(name)
        st.attempt += 1
        st.scheduled_ms = st.finished_ms = s.clock_ms
        done = st.iteration + 1  # iterations of the body so far
        scope = {"input": s.input, "steps": s.outputs(), "run": {"run_id": s.run_id, "tenant": s.tenant}}
        if self.until is not None and self.until.holds(scope):
            t.succeed(name, {"iterations": done, "until": True})
            t.route(name)
        elif done < self.max_iterations:
            self._again(t, name, done)
        elif self.until is None:  # a counted loop: its iterations are done
            t.succeed(name, {"iterations": done, "until": False})
            t.route(name)
        else:
            to = targets(self.on_exhausted) if self.on_exhausted is not None else None
            t.emit("step.loop_exhausted", name, st.attempt, {"iterations": done, "to": to})
            if to is None:
                st.status = "failed"
                st.error_type = ErrorKind.LOOP_EXHAUSTED
                st.error = f"loop {name!r}: {done} iterations and its until never held"
                t.quarantine_run(name, st.attempt, st.error_type, st.error)
                return
            t.succeed(name, {"iterations": done, "until": False})
            t.emit("run.routed", name, data={"to": to, "by": "on_exhausted", **t.iteration_of(name)})
            t.goto(to)

    def _again(self, t: Transitions, name: str, iteration: int) -> None:
        body = self.body(t.wf)
        t.emit(
            "step.looped",
            name,
            t.s.steps[name].attempt,
            {"iteration": iteration, "to": self.goto, "body": body},
        )
        for b in [*body, name]:
            if b not in t.s.steps:
                continue
            st = t.mut(b)
            if st.status in ACTIVE:  # a branch of the body still going: this iteration is over for it
                t.emit("step.cancelled", b, st.attempt, {"reason": f"loop {name!r} went back"})
            st.status, st.iteration = "looped", iteration
            st.deadline_ms = st.due_ms = None
        t.start(self.goto)

    def due(self, t: Transitions, name: str) -> None:
        return  # decided when reached: never due
