"""Three versions of one workflow for the pinning tests, and agents that hold a run in flight.

``V1``: a -> b -> c. ``V2`` renames ``b`` to ``b2`` (a run of v1 decided with it would break).
``V3`` changes only ``c`` (another agent), a step the runs held at ``b`` have not reached.
``gate`` blocks until ``OPEN`` is set, so runs stay in flight at ``b`` for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import yaml

from calmrun.agents import AgentRegistry, StepContext
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from tests.runtime_support import Item, Out, add_one

OPEN = asyncio.Event()  # a test makes a fresh one (an event belongs to the loop that first waits on it)


async def gate(ctx: StepContext, item: Item) -> Out:
    await OPEN.wait()
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


async def add_ten(ctx: StepContext, item: Item) -> Out:
    return Out(n=item.n + 10, label=f"{ctx.step}:{ctx.attempt}")


AGENTS = AgentRegistry({"add_one": add_one, "gate": gate, "add_ten": add_ten})


def pinned(version: str, middle: str = "b", last_agent: str = "add_one") -> WorkflowDef:
    data: dict[str, Any] = {
        "name": "pin",
        "version": version,
        "steps": [
            {"name": "a", "agent": "add_one", "input": {"n": "input.n"}, "next": middle},
            {"name": middle, "agent": "gate", "input": {"n": "steps.a.n"}, "next": "c", "timeout_s": 300},
            {"name": "c", "agent": last_agent, "input": {"n": f"steps.{middle}.n"}},
        ],
    }
    return parse_workflow(data)


V1 = pinned("1")
V2 = pinned("2", middle="b2")
V3 = pinned("3", last_agent="add_ten")


def write_yaml(wf: WorkflowDef, path: Path) -> Path:
    path.write_text(yaml.safe_dump(wf.model_dump(mode="json", exclude_defaults=True)))
    return path


async def slow_add_one(ctx: StepContext, item: Item) -> Out:
    """``add_one`` after a quarter second: runs are in flight when a worker process is killed."""
    await asyncio.sleep(0.25)
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


async def file_gate(ctx: StepContext, item: Item) -> Out:
    """``gate`` across processes: waits until the file named by ``CALMRUN_TEST_GATE`` exists."""
    path = Path(os.environ["CALMRUN_TEST_GATE"])
    while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110 - another process makes the file
        await asyncio.sleep(0.05)
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


def by_reference(wf: WorkflowDef) -> WorkflowDef:
    """``wf`` with every agent as a ``module:attr`` reference (what ``calmrun worker`` resolves).

    The ``gate`` step waits on a file (``file_gate``), so a test decides when runs may pass it.
    """
    data = wf.model_dump(mode="json")
    for step in data["steps"]:
        name = "file_gate" if step["agent"] == "gate" else "slow_add_one"
        step["agent"] = f"tests.versions.support:{name}"
    return parse_workflow(data)
