"""Concurrency against the real broker: many agents at once in one worker, and 1,000 runs in flight."""

from __future__ import annotations

import asyncio

from calmrun.agents import AgentRegistry, StepContext
from calmrun.client import Client
from calmrun.kafka.topics import partition_for
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, add_one, linear, ready, running, settings_for


async def test_slow_agents_run_concurrently_up_to_max_in_flight(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix, max_in_flight=100)

    async def slow(ctx: StepContext, item: Item) -> Out:
        await asyncio.sleep(1.0)  # an agent waiting on a model: the worker must not wait with it
        return Out(n=item.n + 1)

    async with running(settings, [linear("slow", steps=1, agent="slow")], AgentRegistry({"slow": slow})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="slow", input={"n": i}, run_id=f"s{i}") for i in range(200)
            )
            states = await client.wait_terminal(ids, wait_s=120)
    assert {s.status for s in states.values()} == {"completed"}
    assert w.stats.tasks_started == 200
    assert 50 <= w.stats.peak_running <= 100, w.stats
    assert w.stats.running == 0


async def test_a_thousand_concurrent_runs_across_partitions_all_complete(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    n = settings.kafka.partitions
    async with running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"k{i}") for i in range(1000)
            )
            states = await client.wait_terminal(ids, wait_s=240)
    per_partition = {p: sum(partition_for(rid, n) == p for rid in ids) for p in range(n)}
    assert all(count > 100 for count in per_partition.values()), per_partition
    assert {s.status for s in states.values()} == {"completed"}
    for i, rid in enumerate(ids):
        assert states[rid].steps["s3"].output == {"n": i + 3, "label": "s3:1"}
    assert w.stats.tasks_started == 3000
    assert w.stats.completed == 1000
    assert w.failure is None
