"""A registry that does not answer: a framed request read meanwhile waits in the dead-letter topic with the
cause, and ``redrive`` starts its run once the registry is back (``docs/schema-registry.md``, Errors).

The registry is one of its own (``DevRegistry`` with its storage in a file, so a restart keeps the schema
IDs), stopped before the worker reads the request and started again on the same port.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import fastavro
from aiokafka import AIOKafkaProducer

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.devregistry import DevRegistry
from calmrun.kafka.topics import INVALID, Topics, ensure_topics
from tests.runtime_support import add_one, linear, ready, running
from tests.wire.test_confluent import open_wire, rest, settings_with, shipped


async def test_a_request_read_while_the_registry_is_down_is_parked_then_redriven(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    registry = DevRegistry(tmp_path / "registry", storage=tmp_path / "registry-db")
    registry.start()
    try:
        settings = settings_with(broker, prefix, open_wire(registry.url))
        topics = Topics(prefix)
        wf = linear("lin", steps=1)
        await ensure_topics(settings.kafka, [wf])
        schema = shipped("run_request.avsc")
        path = f"/subjects/{topics.requests}-value/versions"
        schema_id = rest(registry.url, "POST", path, {"schema": json.dumps(schema)})["id"]
        body = io.BytesIO()
        request = {"workflow": "lin", "input": json.dumps({"n": 1}), "run_id": "down-1", "tenant": "acme"}
        fastavro.schemaless_writer(body, fastavro.parse_schema(schema), request)
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            value = b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()
            await producer.send_and_wait(topics.requests, value, key=b"down-1")
        finally:
            await producer.stop()
        registry.stop()

        async with running(settings, [wf], AgentRegistry({"add_one": add_one})) as w, Client(settings) as c:
            await ready(w)

            deadline = asyncio.get_running_loop().time() + 60
            while not (parked := await c.read_dlq(INVALID)):
                assert asyncio.get_running_loop().time() < deadline, "the request was not parked in 60 s"
                await asyncio.sleep(0.2)
            [rec] = parked
            assert (rec.reason, rec.error_type, rec.value) == ("poison", "RegistryError", value)
            assert registry.url in rec.error and rec.key == b"down-1"

            registry.start()  # the same port and storage: the schema ID means what it meant
            assert await c.redrive(INVALID) == (0, 1)
            state = (await c.wait_terminal(["down-1"], wait_s=60))["down-1"]
        assert (state.status, state.tenant, state.steps["s1"].output) == (
            "completed",
            "acme",
            {"n": 2, "label": "s1:1"},
        )
    finally:
        registry.stop()
