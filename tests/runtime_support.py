"""Helpers for runtime tests: settings per test prefix, workers in-process, scripted agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import BaseModel

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.settings import Settings, load_settings
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, parse_workflow


def settings_for(broker: str, prefix: str, **worker: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1, **worker},
    )


class Item(BaseModel):
    n: int = 0
    text: str = ""


class Out(BaseModel):
    n: int
    label: str = ""


async def add_one(ctx: StepContext, item: Item) -> Out:
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


def linear(name: str = "lin", steps: int = 3, agent: str = "add_one", **step: Any) -> WorkflowDef:
    names = [f"s{i}" for i in range(1, steps + 1)]
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {
                    "name": n,
                    "agent": agent,
                    "next": names[i + 1] if i + 1 < len(names) else None,
                    "input": {"n": "input.n"} if i == 0 else {"n": f"steps.{names[i - 1]}.n"},
                    **step,
                }
                for i, n in enumerate(names)
            ],
        }
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    workflows: Sequence[WorkflowDef],
    agents: AgentRegistry,
    models: ModelRegistry | None = None,
) -> AsyncIterator[Worker]:
    worker = Worker(settings, workflows, agents, models or ModelRegistry({}))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def until(pred: Any, wait_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``pred()`` to a deadline (no fixed sleeps as synchronisation)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out after {wait_s}s waiting for {what}")
        await asyncio.sleep(0.05)
