"""``kind: approval``: the run waits for a person's answer (``calmrun approve``/``reject``).

An answer (``Answer``) of a waiting approval step, by one of its ``approvers`` (any one when the list is
empty), records ``step.approved``/``step.rejected`` with who and the comment. The step's output is
``{"approved": bool, "by": ..., "comment": ...}``; a rejection goes to ``on_reject`` when the step has one,
else the run routes on the output (``branches``, ``next``) as after any step. An answer from someone else,
for a step that is not waiting, or a second answer is ignored (``input.ignored`` says why). Waiting and
timing out: ``calmrun.workflow.kinds.waiting``. An answer to an agent step whose tool call waits goes to
``calmrun.workflow.kinds.agent.answer_tool``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from calmrun.workflow.events import Answer
from calmrun.workflow.kinds.agent import AgentStep, answer_tool
from calmrun.workflow.kinds.waiting import WaitingStep
from calmrun.workflow.steps import Target, targets

if TYPE_CHECKING:
    from calmrun.workflow.transitions import Transitions


class ApprovalStep(WaitingStep):
    """A step a person approves or rejects."""

    KIND = "approval"
    kind: Literal["approval"] = "approval"
    approvers: list[str] = Field(default_factory=list, description="who may answer (empty: anyone)")
    on_reject: Target | None = Field(None, description="where a rejection goes (before branches and next)")

    def exits(self) -> list[tuple[str, Target]]:
        return [*super().exits(), *([] if self.on_reject is None else [("on_reject", self.on_reject)])]

    def waiting_data(self) -> dict[str, Any]:
        return {"approvers": list(self.approvers)}


def answer(t: Transitions, a: Answer) -> bool:
    """Apply a person's answer; False (with ``t.why``) when it is not one this run takes."""
    sd = t.wf.steps_by_name.get(a.step)
    held = t.s.steps[a.step].tool_approval if a.step in t.s.steps else None
    if isinstance(sd, AgentStep) and held is not None:  # a tool call of its agent waits (or waited)
        return answer_tool(t, a)
    if not isinstance(sd, ApprovalStep):
        t.why = f"{a.step!r} is not an approval step of workflow {t.wf.name!r}"
        return False
    st = t.s.steps.get(a.step)
    if st is not None and st.status == "succeeded" and st.output is not None:
        was = "approved" if st.output.get("approved") else "rejected"
        t.why = f"a second answer: {a.step!r} was already {was} by {st.output.get('by')!r}"
        return False
    if st is None or st.status != "waiting":
        t.why = f"step {a.step!r} is not waiting for an answer (it is {st.status if st else 'not started'})"
        return False
    if sd.approvers and a.by not in sd.approvers:
        t.why = f"{a.by!r} may not answer {a.step!r}: its approvers are {sd.approvers}"
        return False
    verb: Literal["step.approved", "step.rejected"] = "step.approved" if a.approved else "step.rejected"
    t.emit(verb, a.step, st.attempt, {"by": a.by, "comment": a.comment})
    t.succeed(a.step, {"approved": a.approved, "by": a.by, "comment": a.comment})
    if not a.approved and sd.on_reject is not None:
        to = targets(sd.on_reject)
        t.emit("run.routed", a.step, data={"to": to, "by": "on_reject"})
        t.goto(to)
    else:
        t.route(a.step)
    return True
