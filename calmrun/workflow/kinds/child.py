"""``kind: workflow``: a child run. The step starts another workflow as a run of its own and the parent
waits for it durably, as for an approval (no task, no thread).

```yaml
- name: fraud_review
  kind: workflow
  workflow: fraud                     # the child's workflow (served by the same worker group)
  input: {invoice_id: input.invoice_id, lines: steps.reconcile.disputed}
  timeout_s: 86400                    # optional: then on_timeout (or quarantine), and the child is cancelled
  on_failure: end:disputed            # the child ended other than completed (none: quarantine)
  branches:
    - when: {field: outcome, value: cleared}
      goto: pay
  next: end:disputed
```

Starting the step records ``step.child_started`` and writes the child's ``RunRequest`` to the requests
topic in the same transaction. The child's run ID is derived from the parent's: ``<run>.<step>``, with
``#i`` in iteration i of a loop and ``.<attempt>`` from a redrive's second attempt on; the child keeps its
own history and version pinning. When the child's run ends (completed, quarantined, cancelled, refused),
its decision sends its parent a ``child_done`` command (``step.child_finished`` in the parent's history):
the step's output is ``{"run_id", "status", "outcome", "outputs"}`` and the parent routes on it
(``branches``, ``next``) when the child completed, else takes ``on_failure``. The child's spend is added to
the parent's (``spent_usd``). A second or late ``child_done`` is ignored; cancelling or quarantining the
parent cancels the child.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from calmrun.errors import ErrorKind, InputMappingError
from calmrun.workflow.events import ChildFinished, RunCommand, RunRequest
from calmrun.workflow.kinds.waiting import WaitingStep
from calmrun.workflow.steps import NAME, Target, targets

if TYPE_CHECKING:
    from calmrun.workflow.transitions import Transitions


class WorkflowStep(WaitingStep):
    """Start a run of ``workflow`` and wait for it to end."""

    KIND = "workflow"
    kind: Literal["workflow"] = "workflow"
    workflow: str = Field(pattern=NAME, description="the child's workflow")
    version: str | None = Field(None, description="the child's version (default: the newest served)")
    input: dict[str, str] | None = Field(None, description="the child's run input, as an agent step's input")
    on_failure: Target | None = Field(
        None, description="where the run goes when the child ends other than completed (none: quarantine)"
    )

    def exits(self) -> list[tuple[str, Target]]:
        return [*super().exits(), *([] if self.on_failure is None else [("on_failure", self.on_failure)])]

    def waiting_data(self) -> dict[str, Any]:
        return {"workflow": self.workflow}

    def issue(self, t: Transitions, name: str) -> None:
        from calmrun.workflow.kinds.agent import resolve_input  # the same input mapping as an agent's

        s = t.s
        try:
            child_input = resolve_input(t.wf, s, name)
        except InputMappingError as exc:
            st = t.mut(name)
            st.status = "failed"
            t.quarantine_run(name, st.attempt, ErrorKind.INPUT_MAPPING, str(exc))
            return
        super().issue(t, name)
        st = s.steps[name]
        child = child_run_id(s.run_id, name, st.iteration, st.attempt)
        t.emit("step.child_started", name, st.attempt, {"child_run_id": child, "workflow": self.workflow})
        t.requests.append(
            RunRequest(
                workflow=self.workflow,
                run_id=child,
                input=child_input,
                tenant=s.tenant,
                version=self.version,
                parent={"run_id": s.run_id, "workflow": s.workflow, "step": name},
            )
        )

    def due(self, t: Transitions, name: str) -> None:
        st = t.s.steps[name]
        child = child_run_id(t.s.run_id, name, st.iteration, st.attempt)
        super().due(t, name)
        if t.s.steps[name].status != "waiting":
            self._cancel(t, child, f"its parent's step {name!r} timed out")

    def stopped(self, t: Transitions, name: str, reason: str) -> None:
        st = t.s.steps[name]
        self._cancel(t, child_run_id(t.s.run_id, name, st.iteration, st.attempt), f"its parent: {reason}")

    def _cancel(self, t: Transitions, child: str, reason: str) -> None:
        t.requests.append(
            RunCommand(command="cancel", run_id=child, workflow=self.workflow, reason=reason, by=t.s.run_id)
        )


def child_run_id(run_id: str, step: str, iteration: int, attempt: int) -> str:
    """The child's run ID, derived from its parent's (see the module docstring)."""
    out = f"{run_id}.{step}" + (f"#{iteration}" if iteration else "")
    return out + (f".{attempt}" if attempt > 1 else "")


def finished(t: Transitions, c: ChildFinished) -> bool:
    """A child's end: route the parent on it; False (``t.why``) when it is not the child awaited."""
    sd = t.wf.steps_by_name.get(c.step)
    st = t.s.steps.get(c.step)
    if not isinstance(sd, WorkflowStep) or st is None:
        t.why = f"{c.step!r} is not a started workflow step of this run"
        return False
    expected = child_run_id(t.s.run_id, c.step, st.iteration, st.attempt)
    if st.status != "waiting" or c.child_run_id != expected:
        t.why = f"child {c.child_run_id} ended but step {c.step!r} is {st.status} (awaits {expected})"
        return False
    t.emit("step.child_finished", c.step, st.attempt, c.data())
    t.s.spent_usd += c.spent_usd  # the child's cost rolls up into its parent's
    output = {"run_id": c.child_run_id, "status": c.status, "outcome": c.outcome, "outputs": c.outputs}
    if c.status == "completed":
        t.succeed(c.step, output)
        t.route(c.step)
    elif sd.on_failure is not None:
        t.succeed(c.step, output)
        to = targets(sd.on_failure)
        t.emit("run.routed", c.step, data={"to": to, "by": "on_failure", **t.iteration_of(c.step)})
        t.goto(to)
    else:
        st = t.mut(c.step)
        st.status, st.output, st.due_ms = "failed", output, None
        st.error_type = ErrorKind.CHILD_FAILED
        st.error = f"child run {c.child_run_id} ended {c.status}: {c.error}"
        t.quarantine_run(c.step, st.attempt, st.error_type, st.error)
    return True
