"""The benchmark workflow as a Restate service (peers' venv): ``Lin/<run id>/run``, three journaled steps.

Served by hypercorn (``bench.peers.compare`` starts it): each ``ctx.run_typed`` is one step whose result
Restate records in its journal before the next starts, as calmrun commits each step before the next.
"""

from __future__ import annotations

from typing import Any

import restate

from bench.peers.loadgen import step

lin = restate.Workflow("Lin")


async def _step(n: int, label: str) -> dict[str, Any]:
    return step(n, label)


@lin.main()
async def run(ctx: restate.WorkflowContext, item: dict[str, Any]) -> dict[str, Any]:
    out = item
    for name in ("s1", "s2", "s3"):
        out = await ctx.run_typed(name, _step, restate.RunOptions(), n=int(out["n"]), label=f"{name}:1")
    return out


app = restate.app(services=[lin])
