"""The workflows of the people-in-the-loop tests (in-process and in ``tests.worker_proc --workflow people``).

``a`` (compensated) -> ``gate`` (approval by alice) -> ``b`` (compensated) -> ``pay`` (waits for the
signal ``paid``) -> ``c`` (adds one to the payment's amount). A rejection ends ``rejected``, an
unanswered gate ``expired``, an unpaid wait ``unpaid``.
"""

from __future__ import annotations

from calmrun.agents import AgentRegistry, StepContext
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from tests.runtime_support import Item, Out, add_one


async def undo(ctx: StepContext, item: Item) -> Out:
    return Out(n=-item.n, label=f"undo {ctx.step}")


def people(name: str = "hitl", gate_s: float = 120.0, pay_s: float = 120.0) -> WorkflowDef:
    return parse_workflow(
        {
            "name": name,
            "outcomes": ["expired", "rejected", "unpaid"],
            "steps": [
                {
                    "name": "a",
                    "agent": "add_one",
                    "compensate": "undo",
                    "input": {"n": "input.n"},
                    "next": "gate",
                },
                {
                    "name": "gate",
                    "kind": "approval",
                    "approvers": ["alice"],
                    "timeout_s": gate_s,
                    "on_timeout": "end:expired",
                    "branches": [{"when": {"field": "approved", "value": False}, "goto": "end:rejected"}],
                    "next": "b",
                },
                {
                    "name": "b",
                    "agent": "add_one",
                    "compensate": "undo",
                    "input": {"n": "steps.a.n"},
                    "next": "pay",
                },
                {
                    "name": "pay",
                    "kind": "wait",
                    "signal": "paid",
                    "timeout_s": pay_s,
                    "on_timeout": "end:unpaid",
                    "next": "c",
                },
                {"name": "c", "agent": "add_one", "input": {"n": "steps.pay.amount"}},
            ],
        }
    )


def people_flows(quick_s: float = 8.0) -> list[WorkflowDef]:
    """``hitl`` (waits of two minutes) and ``hitl_quick`` (its gate times out after ``quick_s``)."""
    return [people(), people("hitl_quick", gate_s=quick_s)]


def people_agents() -> AgentRegistry:
    return AgentRegistry({"add_one": add_one, "undo": undo})
