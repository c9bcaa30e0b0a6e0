"""Limits per model alias and step in a worker on the real broker: scripted models, a real HTTP provider.

The scripted models (pydantic-ai ``FunctionModel``) record how many requests of their alias are inside
at once and when each arrived; the provider answering 429 is ``FakeOpenAI`` (an OpenAI-compatible HTTP
server on 127.0.0.1) reached through pydantic-ai's OpenAI model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.settings import ModelAlias, load_settings
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunRequest
from tests.agents.test_model_faults import fake_openai
from tests.runtime_support import ready

talk = Agent(output_type=str, name="talk")


class Said(BaseModel):
    text: str


async def speak(ctx: StepContext, inp: dict[str, Any]) -> Said:
    result = await ctx.run(talk, "hello")
    return Said(text=result.output)


class Scripted:
    """A FunctionModel per alias that records concurrent entries and arrival times; each call takes 0.1 s."""

    def __init__(self) -> None:
        self.inside: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.arrived: dict[str, list[float]] = {}

    def model(self, alias: str) -> FunctionModel:
        async def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            self.arrived.setdefault(alias, []).append(time.monotonic())
            self.inside[alias] = self.inside.get(alias, 0) + 1
            self.peak[alias] = max(self.peak.get(alias, 0), self.inside[alias])
            try:
                await asyncio.sleep(0.1)
            finally:
                self.inside[alias] -= 1
            return ModelResponse(parts=[TextPart("hi")])

        return FunctionModel(answer)


def two_steps(name: str, alias: str, agent: str = "speak") -> WorkflowDef:
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {"name": "a", "agent": agent, "model": alias, "next": "b", "timeout_s": 60},
                {"name": "b", "agent": agent, "model": alias, "timeout_s": 60},
            ],
        }
    )


def settings(broker: str, prefix: str, **throttle: Any) -> Any:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        throttle=throttle,
    )


async def test_concurrency_and_rate_per_alias_hold_across_steps_and_spare_other_aliases(
    broker: str, prefix: str
) -> None:
    script = Scripted()
    aliases = ("lim", "free", "paced")
    models = ModelRegistry({}, overrides={a: script.model(a) for a in aliases})
    wfs = [two_steps(f"w_{a}", a) for a in aliases]
    s = settings(
        broker,
        prefix,
        models={"lim": {"max_concurrency": 2}, "paced": {"requests_per_minute": 600}},
        steps={"w_free/b": {"max_concurrency": 3}},
    )
    requests = [RunRequest(workflow=f"w_{a}", input={}, run_id=f"{a}{i}") for a in aliases for i in range(12)]
    async with Worker(s, wfs, AgentRegistry({"speak": speak}), models) as worker, Client(s) as client:
        await ready(worker)
        ids = await client.submit_many(requests)
        states = await client.wait_terminal(ids, wait_s=90)
        events = await client.events()
    assert {st.status for st in states.values()} == {"completed"}
    assert script.peak["lim"] == 2  # both steps of w_lim share the alias's two permits
    assert script.peak["free"] > 3  # its step a is not limited, and not held up behind lim
    paced = sorted(script.arrived["paced"])
    # starts 0.1 s apart, 2.3 s first to last (unlimited, all 24 would arrive within a few hundred ms); a
    # request arrives after its agent's set-up, which varies by up to ~0.1 s on a busy machine (2.22 s seen
    # under CI): at most 12 in any second
    assert len(paced) == 24 and paced[-1] - paced[0] >= 2.0
    assert max(sum(1 for t in paced if t0 <= t < t0 + 1.0) for t0 in paced) <= 12, paced
    counts = worker.throttle.counts
    assert counts.waits[("model", "lim")] > 0 and counts.waits[("rate", "paced")] > 0
    assert counts.waits.get(("step", "w_free/b"), 0) > 0
    # the wait is in the attempt's queue wait: 24 attempts 0.1 s apart, the last waited over 2 s
    waits = [
        e.cost.queue_wait_ms
        for e in events
        if e.type == "step.succeeded" and e.cost is not None and e.cost.model == "paced"
    ]
    assert len(waits) == 24 and max(waits) > 2_000


async def test_a_429_pauses_its_alias_for_other_steps_and_workflows_on_the_worker(
    broker: str, prefix: str
) -> None:
    async with fake_openai() as fake:
        remote = ModelAlias(model="openai:once429-1", base_url=fake.base_url, output_mode="prompted")
        models = ModelRegistry({"remote": remote})
        ask = "tests.agents.test_model_faults:ask"
        first = parse_workflow(
            {
                "name": "first",
                "steps": [{"name": "ask", "agent": ask, "model": "remote", "input": {"question": "input.q"}}],
            }
        )
        other = parse_workflow(
            {
                "name": "other",
                "steps": [
                    {"name": "check", "agent": ask, "model": "remote", "input": {"question": "input.q"}}
                ],
            }
        )
        s = settings(broker, prefix, retry_after_default_s=30)
        metrics = WorkerMetrics(CollectorRegistry())
        async with (
            Worker(s, [first, other], AgentRegistry(), models, metrics=metrics) as worker,
            Client(s) as client,
        ):
            await ready(worker)
            (x,) = await client.submit_many([RunRequest(workflow="first", input={"q": "6*7?"}, run_id="x")])
            end = time.monotonic() + 30
            while "remote" not in worker.throttle.paused():  # the 429 is in
                assert time.monotonic() < end, "the provider's 429 never paused the alias"
                await asyncio.sleep(0.02)
            left = metrics.registry.get_sample_value("calmrun_model_paused_seconds", {"alias": "remote"})
            assert left is not None and 0 < left <= 2
            (y,) = await client.submit_many([RunRequest(workflow="other", input={"q": "1+1?"}, run_id="y")])
            states = await client.wait_terminal([x, y], wait_s=60)
            events = await client.events()
    assert {st.status for st in states.values()} == {"completed"}
    chats = [r for r in fake.requests if r["path"].endswith("/chat/completions")]
    assert len(chats) == 3  # x's 429, x's retry, y
    refused_at = chats[0]["t"]
    assert all(r["t"] - refused_at >= 1.95 for r in chats[1:]), [r["t"] - refused_at for r in chats]
    assert worker.throttle.counts.pauses == {"remote": 1}
    assert worker.throttle.counts.waits[("paused", "remote")] >= 1
    assert metrics.registry.get_sample_value("calmrun_model_pauses_total", {"alias": "remote"}) == 1
    (done,) = [e for e in events if e.run_id == "y" and e.type == "step.succeeded"]
    assert done.cost is not None and done.cost.queue_wait_ms > 1_000  # y waited out the pause
