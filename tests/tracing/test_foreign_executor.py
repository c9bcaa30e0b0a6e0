"""An executor that is not calmrun joins a run's trace by the rule of docs/traces.md: the task's
``traceparent`` is its span's parent, and its span's ``traceparent`` goes on the result.

The executor here is plain aiokafka and OpenTelemetry's own SDK and propagator (what an executor in any
language has); the step contract's decoding comes from ``examples/triage/notify_executor.py``, which
imports nothing of calmrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import fastavro
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.client import Client
from calmrun.devjaeger import DevJaeger
from calmrun.tracing import run_ids
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from examples.triage.notify_executor import SCHEMAS, read_task
from tests.runtime_support import ready, running, until
from tests.tracing.test_traces import parent, traced


async def foreign_executor(broker: str, prefix: str, endpoint: str, stop: asyncio.Event) -> None:
    """Serve the pooled step ``ship`` of workflow ``ext`` until ``stop``; one span per attempt."""
    provider = TracerProvider(resource=Resource.create({"service.name": "foreign-executor"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    tracer, propagator = provider.get_tracer("foreign"), TraceContextTextMapPropagator()
    schema = fastavro.parse_schema(json.loads((SCHEMAS / "step_task.avsc").read_text()))
    consumer = AIOKafkaConsumer(
        f"{prefix}.step.ext.ship",
        bootstrap_servers=broker,
        group_id=f"{prefix}.pool.ext",
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    task = read_task(rec.value or b"", schema)
                    carrier = {k: v.decode() for k, v in rec.headers}  # 1. the task's traceparent
                    with tracer.start_as_current_span(  # 2. the attempt's span, its child
                        "ship (foreign executor)", context=propagator.extract(carrier)
                    ):
                        result = {k: task[k] for k in ("run_id", "workflow", "step", "attempt", "kind")}
                        result["output"] = {"n": 1, "label": "shipped elsewhere"}
                        out: dict[str, str] = {}
                        propagator.inject(out)  # 3. its own traceparent on the result
                    headers = [(k, v.encode()) for k, v in out.items()]
                    await producer.send_and_wait(
                        f"{prefix}.runs.results", json.dumps(result).encode(), key=rec.key, headers=headers
                    )
    finally:
        await consumer.stop()
        await producer.stop()
        provider.shutdown()


@contextlib.asynccontextmanager
async def serving(broker: str, prefix: str, endpoint: str) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(foreign_executor(broker, prefix, endpoint, stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def test_an_executor_in_another_stack_joins_the_runs_trace(
    broker: str, prefix: str, jaeger: DevJaeger
) -> None:
    settings = traced(broker, prefix, jaeger.otlp_endpoint)
    wf = parse_workflow({"name": "ext", "steps": [{"name": "ship", "agent": "unused", "pool": "ext"}]})
    async with (
        running(settings, [wf], AgentRegistry({}), ModelRegistry({})) as worker,
        serving(broker, prefix, jaeger.otlp_endpoint),
    ):
        await ready(worker)
        async with Client(settings) as client:
            run_id = await client.submit(RunRequest(workflow="ext", input={}))
            state = (await client.wait_terminal([run_id], wait_s=90))[run_id]
    assert state.status == "completed", state

    trace_id, root_id = run_ids(prefix, run_id)
    spans: dict[str, Any] = {}

    def arrived() -> bool:
        got = jaeger.trace(trace_id)
        spans.update({s["operationName"]: s for s in got["spans"]} if got else {})
        return {"run ext", "ship (foreign executor)", "decide result ship#1"} <= set(spans)

    await until(arrived, 60, "the run's spans and the foreign executor's in Jaeger")
    foreign, decided = spans["ship (foreign executor)"], spans["decide result ship#1"]
    assert parent(foreign) == f"{root_id:016x}"  # 2: a child of the task's traceparent, the run's root
    links = [r["spanID"] for r in decided["references"] if r["refType"] == "FOLLOWS_FROM"]
    assert links == [foreign["spanID"]]  # 3: the decision on its result links to it
