"""The workflow runtime against the real broker: happy path, history, duplicates."""

from __future__ import annotations

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, running, settings_for


async def test_linear_runs_complete_with_history(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    wf = linear()
    agents = AgentRegistry({"add_one": add_one})
    async with running(settings, [wf], agents) as worker, Client(settings) as client:
        ids = await client.submit_many(
            RunRequest(workflow="lin", input={"n": i}, run_id=f"r{i}") for i in range(20)
        )
        states = await client.wait_terminal(ids, wait_s=60)
    stats = worker.stats  # after the stop too, when the writers are gone (the bench reads it then)
    # the writers' transactions are counted (bench.ab prints decisions per commit from them): a run's first
    # step commits with its request, so 20 runs of four decisions take fewer than 80
    assert 1 <= stats.commits <= stats.decisions
    assert {s.status for s in states.values()} == {"completed"}
    assert states["r5"].steps["s3"].output == {"n": 8, "label": "s3:1"}
    async with Client(settings) as client:
        events = await client.events("r5")
    assert [e.type for e in events if e.step == "s1" or e.step is None][:3] == [
        "run.requested",
        "step.scheduled",
        "step.succeeded",
    ]
    applied = [e.seq for e in events if e.seq > 0]
    assert applied == list(range(1, len(applied) + 1))
