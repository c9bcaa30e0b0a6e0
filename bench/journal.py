"""Workload ``journal``: the agent journal's overhead per model request (bytes, milliseconds).

One pydantic-ai agent (a scripted FunctionModel, in process: no provider latency hides the journal) makes
``REQUESTS`` model requests with a tool call between each two, ``AGENTS`` times per round, once with no
journal and once journaled on the broker (``streams.journal.KafkaJournal``: each entry acknowledged by
``acks=all`` before the agent continues). Reported per model request: the added wall time (journaled minus
plain, over the model requests), the journal bytes (all records: the model entry and the tool entry that
follows it; the first entry of an attempt carries its claim and task) and the bytes of the model entry
alone; and the time to read an attempt's chain back on resume.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from bench.common import Ctx, create_topics, prefix, summary
from calmrun.agents import ModelRegistry, StepContext
from calmrun.agents.journal import AttemptJournal, since_ms
from calmrun.kafka.topics import Topics
from calmrun.settings import load_settings
from calmrun.streams.journal import KafkaJournal
from calmrun.workflow.events import StepTask

REQUESTS = 10


def _script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    turns = sum(1 for m in messages if isinstance(m, ModelResponse))
    if turns < REQUESTS - 1:
        return ModelResponse(parts=[ToolCallPart("lookup", {"order": turns})])
    return ModelResponse(parts=[TextPart("looked up every order")])


agent: Agent[None, str] = Agent(name="bench_journal", instructions="Look every order up, then say so.")


@agent.tool_plain
def lookup(order: int) -> str:
    return f"order {order}: shipped, 2 items, tracking 1Z{order:08d}"


def _task(run: str) -> StepTask:
    return StepTask(
        run_id=run, workflow="bench", version="1", step="look", attempt=1, agent="bench_journal", model="m",
        issued_ms=time.time_ns() // 1_000_000, timeout_s=60,
    )  # fmt: skip


async def _agents(
    models: ModelRegistry, runs: list[str], journal: KafkaJournal | None
) -> tuple[float, int, float]:
    """Run the agent once per run ID; (seconds, journal bytes written, ms spent waiting for writes)."""
    written, write_ms = 0, 0.0
    t0 = time.perf_counter()
    for run in runs:
        task = _task(run)
        ctx = StepContext.for_task(task, models)
        if journal is not None:
            ctx.journal = AttemptJournal(
                journal, run, "look", 1, task.idempotency_key, since_ms=task.issued_ms
            )
        await ctx.run(agent, "orders 0-9")
        if ctx.journal is not None:
            written += ctx.journal.written_bytes
            write_ms += ctx.journal.write_ms
    return time.perf_counter() - t0, written, write_ms


async def run(ctx: Ctx) -> dict[str, Any]:
    agents = 5 if ctx.quick else 40
    pre = prefix("journal")
    settings = load_settings(kafka={"bootstrap": ctx.bootstrap, "prefix": pre, "partitions": 4})
    await create_topics(ctx.bootstrap, [Topics(pre).journal])
    models = ModelRegistry({}, overrides={"m": FunctionModel(_script)})
    journal = KafkaJournal(settings)
    added_ms: list[float] = []
    waited_ms: list[float] = []
    bytes_per_request: list[float] = []
    model_entry_bytes: list[float] = []
    load_ms: list[float] = []
    try:
        await _agents(models, [f"warm-{i}" for i in range(2)], journal)  # clients started, topic warm
        for r in range(ctx.rounds):
            started_ms = time.time_ns() // 1_000_000
            runs = [f"r{r}-{i:04d}" for i in range(agents)]
            plain_s, _, _ = await _agents(models, runs, None)
            journaled_s, written, write_ms = await _agents(models, runs, journal)
            requests = agents * REQUESTS
            added_ms.append((journaled_s - plain_s) * 1000 / requests)
            waited_ms.append(write_ms / requests)
            bytes_per_request.append(written / requests)
            t0 = time.perf_counter()
            chain = await journal.load(runs[0], _task(runs[0]).idempotency_key, since_ms(started_ms, 60))
            load_ms.append((time.perf_counter() - t0) * 1000)
            models_only = [len(e.model_dump_json()) for e in chain if e.call.op == "model"]
            model_entry_bytes.append(sum(models_only) / len(models_only))
    finally:
        await journal.close()
    return {
        "params": {"agents_per_round": agents, "model_requests_per_agent": REQUESTS},
        "metrics": {
            "added ms per model request": summary(added_ms),
            "of which waiting for acks=all writes": summary(waited_ms),
            "journal bytes per model request": summary(bytes_per_request),
            "model entry bytes": summary(model_entry_bytes),
            "resume read ms (one attempt's chain)": summary(load_ms),
        },
        "notes": [
            "journal bytes per model request: every record (the model entry and the tool entry after it)",
            "an in-process FunctionModel: no provider latency in the plain time the overhead is taken from",
        ],
    }
