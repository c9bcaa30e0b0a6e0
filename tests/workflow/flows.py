"""The workflows of the kill -9 tests of loops, maps and children (in ``tests.worker_proc --workflow kinds``).

``kmap``: a 200-element map (``echo``, 8 at a time, each sleeping ``--sleep``) and then a child run of
``kchild`` (one ``echo`` step), ending ``completed`` with the child's outcome.
"""

from __future__ import annotations

import asyncio
from typing import Any

from calmrun.agents import AgentRegistry, StepContext
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from tests import runtime_support


async def echo(ctx: StepContext, data: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(runtime_support.SLEEP_S)
    return {"of": data.get("item"), "index": data.get("index"), "key": ctx.idempotency_key}


def kinds_flows() -> list[WorkflowDef]:
    parent = parse_workflow(
        {
            "name": "kmap",
            "steps": [
                {
                    "name": "fan",
                    "kind": "map",
                    "for_each": "input.items",
                    "agent": "echo",
                    "max_concurrency": 8,
                    "max_elements": 500,
                    "max_element_bytes": 256,
                    "next": "child",
                },
                {"name": "child", "kind": "workflow", "workflow": "kchild", "input": {"n": "input.n"}},
            ],
        }
    )
    child = parse_workflow({"name": "kchild", "steps": [{"name": "slow", "agent": "echo"}]})
    return [parent, child]


def kinds_agents() -> AgentRegistry:
    return AgentRegistry({"echo": echo})
