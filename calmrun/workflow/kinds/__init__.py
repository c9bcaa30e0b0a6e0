"""The step kinds, one module each, and ``Step``: the union a workflow's steps are parsed into.

A step's ``kind`` (``agent`` when absent, so a definition written before kinds existed loads unchanged)
picks its model. Adding a kind: a module here with its ``StepDef`` subclass (fields, validation, ``issue``,
``due``, and the inputs it answers), one line in ``Step`` below, and its page in ``docs/workflows.md``; a
kind that answers an input of its own adds that input to ``calmrun.workflow.events`` and one line to the
decider's dispatch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Tag

from calmrun.workflow.kinds.agent import AgentStep
from calmrun.workflow.kinds.approval import ApprovalStep
from calmrun.workflow.kinds.child import WorkflowStep
from calmrun.workflow.kinds.loop import LoopStep
from calmrun.workflow.kinds.map import MapStep
from calmrun.workflow.kinds.wait import WaitStep
from calmrun.workflow.kinds.waiting import WaitingStep

StepKind = Literal["agent", "approval", "wait", "loop", "map", "workflow"]


def kind_of(data: Any) -> str:
    """The tag of a step given as data or as a model; ``agent`` when it names none."""
    if isinstance(data, dict):
        return str(data.get("kind", "agent"))
    return str(getattr(data, "kind", "agent"))


Step = Annotated[
    Annotated[AgentStep, Tag("agent")]
    | Annotated[ApprovalStep, Tag("approval")]
    | Annotated[WaitStep, Tag("wait")]
    | Annotated[LoopStep, Tag("loop")]
    | Annotated[MapStep, Tag("map")]
    | Annotated[WorkflowStep, Tag("workflow")],
    Discriminator(
        kind_of,
        custom_error_type="unknown_kind",
        custom_error_message="unknown step kind; kinds are agent, approval, wait, loop, map, workflow",
    ),
]
"""One step of a workflow, of the kind its ``kind`` names."""

__all__ = [
    "AgentStep",
    "ApprovalStep",
    "LoopStep",
    "MapStep",
    "Step",
    "StepKind",
    "WaitStep",
    "WaitingStep",
    "WorkflowStep",
    "kind_of",
]
