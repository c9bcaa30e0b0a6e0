"""Step pools on the real broker: a pooled step runs in its pool's executor, its result comes back on the
results topic, and the run keeps one history (the checker), with cost, retries and quarantine as before."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator

import pytest

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.check import check_history
from calmrun.client import Client
from calmrun.errors import WorkerError
from calmrun.localproc import free_port
from calmrun.streams.pool import PoolExecutor
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, add_one, linear, ready, settings_for, until


async def where(ctx: StepContext, item: Item) -> Out:
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


async def broken(ctx: StepContext, item: Item) -> Out:
    raise RuntimeError(f"partner API down for {ctx.run_id}")


def pooled(wf: WorkflowDef, **pools: str) -> WorkflowDef:
    data = wf.model_dump(mode="json")
    for step in data["steps"]:
        step["pool"] = pools.get(step["name"], "default")
    return parse_workflow(data)


@pytest.fixture
async def started() -> AsyncIterator[list[Worker | PoolExecutor]]:
    items: list[Worker | PoolExecutor] = []
    try:
        yield items
    finally:
        for it in reversed(items):
            await it.stop()


async def test_a_pooled_step_runs_in_its_executor_and_the_run_completes(
    broker: str, prefix: str, started: list[Worker | PoolExecutor]
) -> None:
    settings = settings_for(broker, prefix)
    wf = pooled(linear(agent="where"), s2="gpu")
    agents = AgentRegistry({"where": where})
    worker = Worker(settings, [wf], agents, ModelRegistry({}))
    assert f"{prefix}.step.lin.s2" not in worker.input_topics  # deciders never read a pool's tasks
    assert f"{prefix}.runs.results" in worker.input_topics
    await worker.start()
    started.append(worker)
    await ready(worker)
    executor = PoolExecutor(settings, [wf], "gpu", AgentRegistry({"where": where}), ModelRegistry({}))
    assert executor.inputs == [f"{prefix}.step.lin.s2"]
    await executor.start()
    started.append(executor)
    async with Client(settings) as client:
        ids = await client.submit_many(
            [RunRequest(workflow="lin", input={"n": i}, run_id=f"p{i}") for i in range(50)]
        )
        states = await client.wait_terminal(ids, wait_s=60)
        events = await client.events(ids[0])
    assert {s.status for s in states.values()} == {"completed"}
    assert states["p0"].steps["s3"].output == {"n": 3, "label": "s3:1"}
    assert worker.stats.results == 50 and executor.counts.results == 50
    assert executor.tasks.counts.started == 50 and worker.stats.tasks_started == 100  # s1 and s3 only
    scheduled = {e.step: e.data.get("pool") for e in events if e.type == "step.scheduled"}
    assert scheduled == {"s1": None, "s2": "gpu", "s3": None}  # who runs it, on the event for people
    succeeded = [e for e in events if e.type == "step.succeeded" and e.step == "s2"]
    assert succeeded[0].cost is not None and succeeded[0].cost.agent == "where"  # cost per attempt
    report = await check_history(settings.kafka, [wf])
    assert report.ok and report.runs == 50, report.summary()


async def test_a_failing_pooled_step_is_retried_then_quarantined_with_its_cause(
    broker: str, prefix: str, started: list[Worker | PoolExecutor]
) -> None:
    settings = settings_for(broker, prefix)
    wf = pooled(linear(agent="add_one", retry={"max_attempts": 2, "initial_backoff_s": 0.05}), s2="partner")
    data = wf.model_dump(mode="json")
    data["steps"][1]["agent"] = "broken"
    wf = parse_workflow(data)
    agents = AgentRegistry({"add_one": add_one, "broken": broken})
    worker = Worker(settings, [wf], agents, ModelRegistry({}))
    await worker.start()
    started.append(worker)
    await ready(worker)
    executor = PoolExecutor(settings, [wf], "partner", agents, ModelRegistry({}))
    await executor.start()
    started.append(executor)
    async with Client(settings) as client:
        [rid] = await client.submit_many([RunRequest(workflow="lin", input={"n": 1}, run_id="q1")])
        state = (await client.wait_terminal([rid], wait_s=60))[rid]
        dead = await client.read_dlq("lin")
    assert state.status == "quarantined" and state.steps["s2"].attempt == 2
    assert state.error_type == "RuntimeError" and "partner API down for q1" in (state.error or "")
    assert [(d.run_id, d.step, d.attempt) for d in dead] == [("q1", "s2", 2)]
    assert dead[0].source_topic == f"{prefix}.runs.results"  # the result record that quarantined it
    assert "partner API down" in (dead[0].traceback or "")
    report = await check_history(settings.kafka, [wf])
    assert report.ok, report.summary()


async def test_a_deciding_only_group_with_an_executor_of_the_default_pool(
    broker: str, prefix: str, started: list[Worker | PoolExecutor]
) -> None:
    settings = settings_for(broker, prefix)
    wf = linear()
    agents = AgentRegistry({"add_one": add_one})
    worker = Worker(settings, [wf], AgentRegistry({}), ModelRegistry({}), pool=None)  # no agents at all
    assert worker.input_topics == [f"{prefix}.runs.requests", f"{prefix}.runs.results"]
    await worker.start()
    started.append(worker)
    await ready(worker)
    executor = PoolExecutor(settings, [wf], "default", agents, ModelRegistry({}))
    await executor.start()
    started.append(executor)
    async with Client(settings) as client:
        ids = await client.submit_many(
            [RunRequest(workflow="lin", input={"n": i}, run_id=f"d{i}") for i in range(20)]
        )
        states = await client.wait_terminal(ids, wait_s=60)
    assert {s.status for s in states.values()} == {"completed"}
    assert worker.stats.tasks_started == 0 and executor.counts.results == 60


async def test_an_executor_of_a_pool_no_step_names_refuses_to_start(broker: str, prefix: str) -> None:
    with pytest.raises(WorkerError, match="names pool 'gpu'"):
        PoolExecutor(settings_for(broker, prefix), [linear()], "gpu", AgentRegistry({}), ModelRegistry({}))


async def test_tasks_wait_for_an_executor_and_run_when_one_starts(
    broker: str, prefix: str, started: list[Worker | PoolExecutor]
) -> None:
    settings = settings_for(broker, prefix)
    wf = pooled(linear(), s1="late")
    agents = AgentRegistry({"add_one": add_one})
    worker = Worker(settings, [wf], agents, ModelRegistry({}))
    await worker.start()
    started.append(worker)
    await ready(worker)
    async with Client(settings) as client:
        ids = await client.submit_many([RunRequest(workflow="lin", input={"n": 0}, run_id="w1")])
        await until(lambda: worker.stats.decisions >= 1, 30, "the request decided")
        state = worker.parts.state(
            next(iter(p for p in worker.parts.owned if "w1" in worker.parts.runs[p])), "w1"
        )
        assert state is not None and state.steps["s1"].status == "scheduled"
        executor = PoolExecutor(settings, [wf], "late", agents, ModelRegistry({}))
        await executor.start()
        started.append(executor)
        states = await client.wait_terminal(ids, wait_s=60)
    assert states["w1"].status == "completed"


async def test_an_executor_serves_its_metrics(
    broker: str, prefix: str, started: list[Worker | PoolExecutor]
) -> None:

    from calmrun.settings import load_settings

    port = free_port()
    base = settings_for(broker, prefix)
    settings = load_settings(
        kafka=base.kafka.model_dump(), worker=base.worker.model_dump(), metrics={"port": port}
    )
    wf = pooled(linear(), s2="gpu")
    agents = AgentRegistry({"add_one": add_one})
    worker = Worker(base, [wf], agents, ModelRegistry({}))
    await worker.start()
    started.append(worker)
    await ready(worker)
    executor = PoolExecutor(settings, [wf], "gpu", agents, ModelRegistry({}))
    await executor.start()
    started.append(executor)
    async with Client(base) as client:
        ids = await client.submit_many([RunRequest(workflow="lin", input={"n": i}) for i in range(5)])
        await client.wait_terminal(ids, wait_s=60)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    await until(lambda: 'calmrun_pool_results_total{pool="gpu"} 5.0' in scrape(), 10, "5 results counted")
    text = scrape()
    assert 'calmrun_pool_partitions_owned{pool="gpu"} 4.0' in text
    assert 'calmrun_pool_tasks_running{pool="gpu"} 0.0' in text
