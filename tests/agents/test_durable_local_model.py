"""A real model's requests journaled and replayed: SmolLM2-135M behind llama.cpp, the project's broker.

A step runs an agent twice on the local model (two model requests); the journal holds both, with the model's
name and tokens; ``replay_agents`` then runs the step again from the journal with every model refused: it
converges on the recorded output and asks no model.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import uuid4

from pydantic_ai import Agent

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.devmodel import DevModel
from calmrun.replay.agents import replay_agents
from calmrun.settings import load_settings
from calmrun.streams.journal import KafkaJournal
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.agents.test_local_model import local_model  # noqa: F401 - the session's llama.cpp server
from tests.runtime_support import ready, running

writer = Agent(name="writer", instructions="Answer in one short sentence.")


async def two_turns(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    """Two model requests: a first answer, then a shorter one."""
    first = await ctx.run(writer, json.dumps(inp))
    second = await ctx.run(writer, f"Say this in five words: {first.output}")
    return {"first": first.output, "second": second.output}


async def test_a_local_models_requests_are_journaled_and_replay_asks_no_model(
    broker: str,
    prefix: str,
    local_model: DevModel,  # noqa: F811 - the fixture imported above
) -> None:
    settings = load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1, "max_in_flight": 1},
        models={
            "local": {
                "model": "llamacpp:smollm2",
                "base_url": local_model.base_url,
                "temperature": 0,
                "max_tokens": 40,
                "timeout_s": 240,
            }
        },
    )
    wf = parse_workflow(
        {
            "name": "write",
            "steps": [
                {
                    "name": "write",
                    "agent": "two_turns",
                    "model": "local",
                    "input": {"q": "input.q"},
                    "timeout_s": 300,  # two requests of a 135M model on a loaded machine
                    "retry": {"max_attempts": 1},
                }
            ],
        }
    )
    agents = AgentRegistry({"two_turns": two_turns})
    run_id = f"write-{uuid4().hex[:8]}"
    async with (
        running(settings, [wf], agents, ModelRegistry(settings.models)) as worker,
        Client(settings) as c,
    ):
        await ready(worker)
        await c.submit(RunRequest(workflow="write", run_id=run_id, input={"q": "What is Kafka?"}))
        states = await c.wait_terminal([run_id], wait_s=240)
        events = await c.events(run_id)
    assert states[run_id].status == "completed", states[run_id]

    journal = KafkaJournal(settings)
    try:
        records = await journal.records(run_id)
    finally:
        await journal.close()
    models = [r for r in records if r.type == "entry" and r.call.op == "model"]
    assert len(models) == 2
    assert all(m.model and "smollm2" in m.model and m.usage.input_tokens > 0 for m in models)

    (replayed,) = await replay_agents(records, events, agents, settings.models)
    assert replayed.verdict == "converged", replayed
    assert replayed.model_requests == 0 and replayed.answered == replayed.units == 2
