"""A writer whose producer stops sending is replaced, and nothing is lost or decided twice.

aiokafka's producer runs a background sender; when it ends (seen in a broker-loss fault run: a connection
closed by the dying broker while the sender looked up a coordinator, which aiokafka 0.14 takes for a fatal
error), no transaction of that producer can finish again, and an operation waiting on it may never return.
The worker takes its partitions over again with a new producer under the same transactional id (as an
assignment does). The fault is injected where it happens, in the real client: the sender task is ended
while runs are in flight against a real broker.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from calmrun.agents import AgentRegistry, StepContext
from calmrun.check import check_history
from calmrun.client import Client
from calmrun.streams.worker import Worker
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, linear, ready, running, settings_for, until

N = 200


async def slow_add_one(ctx: StepContext, item: Item) -> Out:
    await asyncio.sleep(0.02)  # keeps runs in flight while the sender is ended
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


def end_sender(worker: Worker) -> None:
    """End the writer's producer's sender routine, as aiokafka's own fatal error does."""
    assert worker.parts.writer is not None
    producer = worker.parts.writer._lanes[0]  # the first lane: the one the commits of offsets use
    producer._sender.sender_task.cancel()


async def test_a_writer_whose_sender_ended_is_replaced_and_every_run_completes_once(
    broker: str, prefix: str
) -> None:
    settings = settings_for(broker, prefix)
    wf = linear(agent="slow")
    async with running(settings, [wf], AgentRegistry({"slow": slow_add_one})) as w:
        await ready(w)
        async with Client(settings) as client:
            ids = await client.submit_many(
                RunRequest(workflow="lin", input={"n": i}, run_id=f"b{i}") for i in range(N)
            )
            await until(lambda: w.stats.completed >= N // 4, 60, "a quarter of the runs")
            end_sender(w)
            await until(
                lambda: w.stats.retaken >= 1 and len(w.parts.owned) == 4,
                60,
                "the partitions taken over again",
            )
            end_sender(w)
            await until(
                lambda: w.stats.retaken >= 2 and len(w.parts.owned) == 4,
                60,
                "the partitions taken over again",
            )
            states = await client.wait_terminal(ids, wait_s=120)
            events = await client.events()
        stats = w.stats
        owned = set(w.parts.owned)
    assert owned == {0, 1, 2, 3}  # the worker kept going, with every partition
    assert stats.retaken == 2 and stats.fenced == 0
    assert {s.status for s in states.values()} == {"completed"}
    assert all(states[f"b{i}"].steps["s3"].output["n"] == i + 3 for i in range(N))
    recorded = Counter((e.run_id, e.step, e.attempt) for e in events if e.type == "step.succeeded")
    assert [k for k, n in recorded.items() if n > 1] == []  # no attempt's result recorded twice
    report = await check_history(settings.kafka, [wf])
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations[:10])
    assert report.runs == N
