"""Confluent's wire format through a Schema Registry: framing, subjects, schema IDs cached, clear errors.

A client that is not calmrun (plain aiokafka, fastavro and the registry's REST API, framing as Java's
``KafkaAvroSerializer`` does; and Confluent's own Python serializer) starts a run; a registry-aware reader
decodes calmrun's events; a schema ID the registry lacks and an incompatible subject each say what is wrong.

The registry is a real one (``registry_url``: Apicurio Registry's Confluent API, see ``conftest.py``),
except where a test needs what it cannot give: counting the calls a registry receives (the cache), and
basic auth (Apicurio authenticates through an OpenID Connect server, which does not run here). Those use
``registry_stub``, Confluent's API as its documentation states it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fastavro
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from typer.testing import CliRunner

from calmrun.agents import AgentRegistry
from calmrun.cli import app
from calmrun.cli.costs import batch_costs
from calmrun.client import Client
from calmrun.costs.app import Aggregator
from calmrun.costs.fold import ALL
from calmrun.devkafka.certs import make_certs
from calmrun.devregistry import DevRegistry
from calmrun.errors import DecodeError, RegistryAuthError, RegistryError
from calmrun.kafka.topics import Topics, ensure_topics
from calmrun.settings import Settings, load_settings
from calmrun.ui.index import RunIndex, event_row
from calmrun.wire.codec import RecordCodec, wire_codec, wire_models
from calmrun.wire.confluent import subject
from calmrun.workflow.events import RunCommand, RunEvent, RunRequest
from tests.runtime_support import add_one, linear, read_raw, ready, running
from tests.wire.registry_stub import RegistryStub, serving

USERS = {"calmrun": "s3cret", "java-svc": "j4va"}


@pytest.fixture
def stub() -> Iterator[tuple[RegistryStub, str]]:
    reg = RegistryStub(users=USERS)
    with serving(reg) as url:
        yield reg, url


def wire(url: str, *, fmt: str = "confluent", password: str = "s3cret", **registry: Any) -> dict[str, Any]:
    """The wire settings for the stub (with basic auth)."""
    return {"format": fmt, "registry": {"url": url, "username": "calmrun", "password": password, **registry}}


def open_wire(url: str, *, fmt: str = "confluent", **registry: Any) -> dict[str, Any]:
    """The wire settings for the real registry (no authentication)."""
    return {"format": fmt, "registry": {"url": url, **registry}}


def settings_with(broker: str, prefix: str, wire_cfg: dict[str, Any], **worker: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1, **worker},
        wire=wire_cfg,
    )


def rest(url: str, method: str, path: str, body: Any = None, user: str | None = None) -> Any:
    """The registry's REST API as any client calls it (as ``user`` of the stub: basic auth)."""
    req = urllib.request.Request(
        url + path, method=method, data=None if body is None else json.dumps(body).encode()
    )
    req.add_header("Content-Type", "application/vnd.schemaregistry.v1+json")
    if user is not None:
        token = base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def subjects(url: str) -> set[str]:
    return set(rest(url, "GET", "/subjects"))


def shipped(name: str) -> dict[str, Any]:
    """A schema as calmrun ships it (``calmrun/schemas``): what another team generates its classes from."""
    return json.loads(resources.files("calmrun").joinpath("schemas", name).read_text())


# -- the codec ------------------------------------------------------------------------------------------


def test_subject_naming_strategies() -> None:
    assert subject("TopicName", "p.runs.events", "io.calmrun.RunEvent") == "p.runs.events-value"
    assert subject("RecordName", "p.runs.events", "io.calmrun.RunEvent") == "io.calmrun.RunEvent"
    assert (
        subject("TopicRecordName", "p.runs.events", "io.calmrun.RunEvent")
        == "p.runs.events-io.calmrun.RunEvent"
    )


@pytest.mark.parametrize("strategy", ["TopicName", "RecordName", "TopicRecordName"])
def test_round_trip_registers_under_the_strategy(registry_url: str, prefix: str, strategy: str) -> None:
    codec = wire_codec(Settings(wire=open_wire(registry_url, subject_strategy=strategy)).wire)
    topic = f"{prefix}.runs.events"
    ev = RunEvent(run_id="r-1", seq=3, type="run.requested", at_ms=5, workflow="lin", data={"a": [1, 2]})
    data = codec.encode(ev, topic)
    want = {"TopicName": f"{topic}-value", "RecordName": "io.calmrun.RunEvent"}.get(
        strategy, f"{topic}-io.calmrun.RunEvent"
    )
    latest = rest(registry_url, "GET", f"/subjects/{quote(want, safe='')}/versions/latest")
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == latest["id"]
    assert json.loads(latest["schema"])["name"] == "RunEvent"
    assert codec.decode(data) == ev
    fresh = wire_codec(Settings(wire=open_wire(registry_url)).wire)  # another process: fetches the ID
    assert fresh.decode(data) == ev


def test_schema_ids_are_cached(stub: tuple[RegistryStub, str]) -> None:
    """On the stub, which counts the calls it answers."""
    reg, url = stub
    codec = wire_codec(Settings(wire=wire(url)).wire)
    ev = RunEvent(run_id="r-1", seq=3, type="run.requested", at_ms=5, workflow="lin", data={"a": [1, 2]})
    data = codec.encode(ev, "p.runs.events")
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == 1
    assert list(reg.subjects) == ["p.runs.events-value"]
    for _ in range(50):  # cached: no registry call after the first of each
        assert codec.decode(codec.encode(ev, "p.runs.events")) == ev
    assert len(reg.calls) == 1  # one registration; the schema it registered is known for reading too
    fresh = wire_codec(Settings(wire=wire(url)).wire)  # another process: one lookup of the ID, then none
    for _ in range(10):
        assert fresh.decode(data) == ev
    assert [c[:2] for c in reg.calls[1:]] == [("GET", "/schemas/ids/1")]


def test_state_and_records_without_topic_stay_single_object(registry_url: str, prefix: str) -> None:
    codec = wire_codec(Settings(wire=open_wire(registry_url)).wire)
    ev = RunEvent(run_id="r", seq=1, type="run.requested", at_ms=1, workflow="w")
    assert codec.encode(ev)[:2] == b"\xc3\x01"  # no topic: internal (state, snapshots)
    single = wire_codec(Settings(wire=open_wire(registry_url, fmt="single-object")).wire)
    topic = f"{prefix}.runs.events"
    assert single.encode(ev, topic)[:2] == b"\xc3\x01"
    assert single.decode(codec.encode(ev, topic)) == ev  # reading detects either


def test_decode_errors_say_what_is_wrong(registry_url: str, prefix: str) -> None:
    plain = RecordCodec(wire_models())
    with pytest.raises(DecodeError, match=r"Confluent-framed record \(schema ID 7\) and no Schema Registry"):
        plain.decode(b"\x00\x00\x00\x00\x07\x02")
    codec = wire_codec(Settings(wire=open_wire(registry_url)).wire)
    missing = 0x7FFFFFF0
    with pytest.raises(DecodeError, match=f"schema ID {missing} is not in the registry"):
        codec.decode(b"\x00" + missing.to_bytes(4, "big") + b"\x02")
    other = rest(
        registry_url,
        "POST",
        f"/subjects/{prefix}.other-value/versions",
        {"schema": json.dumps({"type": "string"})},
    )["id"]
    with pytest.raises(DecodeError, match="not a calmrun record"):
        codec.decode(b"\x00" + int(other).to_bytes(4, "big") + b"\x02a")
    ev = RunEvent(run_id="r", seq=1, type="run.requested", at_ms=1, workflow="w", data={"k": "v" * 20})
    good = codec.encode(ev, f"{prefix}.runs.events")
    with pytest.raises(DecodeError, match="corrupt or truncated"):
        codec.decode(good[:-3])


def test_a_wrong_password_is_a_clear_error(stub: tuple[RegistryStub, str]) -> None:
    _, url = stub
    codec = wire_codec(Settings(wire=wire(url, password="wrong")).wire)
    ev = RunEvent(run_id="r", seq=1, type="run.requested", at_ms=1, workflow="w")
    with pytest.raises(RegistryAuthError) as info:
        codec.encode(ev, "p.runs.events")
    assert info.value.status == 401 and info.value.user == "calmrun" and not info.value.retriable
    assert f"Schema Registry {url}: HTTP 401: refused the credentials of user 'calmrun'" in str(info.value)
    assert "wrong" not in str(info.value)
    anonymous = wire_codec(Settings(wire={"format": "confluent", "registry": {"url": url}}).wire)
    with pytest.raises(RegistryAuthError, match=r"no credentials \(wire.registry.username/password unset\)"):
        anonymous.encode(ev, "p.runs.events")


def test_password_from_the_environment(
    stub: tuple[RegistryStub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = stub
    monkeypatch.setenv("REG_PW", "s3cret")
    codec = wire_codec(Settings(wire=wire(url, password="env:REG_PW")).wire)
    ev = RunEvent(run_id="r", seq=1, type="run.requested", at_ms=1, workflow="w")
    assert codec.decode(codec.encode(ev, "p.runs.events")) == ev


def test_tls_to_the_registry(tmp_path: Path) -> None:
    """A registry of its own, serving only HTTPS, with a certificate of a test CA."""
    certs = make_certs(tmp_path / "certs", [])
    ev = RunEvent(run_id="r", seq=1, type="run.requested", at_ms=1, workflow="w")
    with DevRegistry(tmp_path / "registry", tls=(certs.broker.cert, certs.broker.key)) as registry:
        url = registry.url
        assert url.startswith("https://")
        trusted = open_wire(url, tls={"ca_file": str(certs.ca)})
        codec = wire_codec(Settings(wire=trusted).wire)
        assert codec.decode(codec.encode(ev, "p.runs.events")) == ev
        stranger = wire_codec(Settings(wire=open_wire(url)).wire)  # the system store does not know the CA
        with pytest.raises(RegistryError, match="CERTIFICATE_VERIFY_FAILED") as info:
            stranger.encode(ev, "p.runs.events")
        assert info.value.status is None and info.value.retriable


def test_the_pages_index_reads_framed_events(registry_url: str, prefix: str, tmp_path: Path) -> None:
    codec = wire_codec(Settings(wire=open_wire(registry_url)).wire)
    index = RunIndex(tmp_path / "ui.sqlite", codec)
    waiting = RunEvent(
        run_id="r-1",
        seq=2,
        type="step.waiting",
        at_ms=2,
        workflow="hitl",
        step="gate",
        attempt=1,
        data={"kind": "approval", "due_ms": None, "approvers": ["alice"]},
    )
    first = RunEvent(run_id="r-1", seq=1, type="run.requested", at_ms=1, workflow="hitl")
    topic = f"{prefix}.runs.events"
    index.apply([], [event_row(codec, codec.encode(e, topic)) for e in (first, waiting)], [])
    assert index.events("r-1") == [first, waiting]
    index.close()


def test_confluent_needs_a_registry_url() -> None:
    from calmrun.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("wire.format confluent needs wire.registry.url")):
        load_settings(wire={"format": "confluent"})


# -- against the broker -------------------------------------------------------------------------------


async def test_a_java_style_producer_starts_a_run_and_a_registry_reader_reads_the_events(
    broker: str, prefix: str, registry_url: str
) -> None:
    url = registry_url
    settings = settings_with(broker, prefix, open_wire(url), task_records=True)  # the tasks are framed too
    topics = Topics(prefix)
    wf = linear("lin", steps=2)
    await ensure_topics(settings.kafka, [wf])

    # the other team: the shipped .avsc, registered under TopicName, framed as KafkaAvroSerializer does
    schema = shipped("run_request.avsc")
    schema_id = rest(
        url, "POST", f"/subjects/{topics.requests}-value/versions", {"schema": json.dumps(schema)}
    )["id"]
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body,
        fastavro.parse_schema(schema),
        {
            "workflow": "lin",
            "input": json.dumps({"n": 41}),
            "run_id": "java-1",
            "tenant": "acme",
            "budget_usd": None,
            "version": None,
        },
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        value = b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()
        await producer.send_and_wait(topics.requests, value, key=b"java-1")
    finally:
        await producer.stop()

    async with running(settings, [wf], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as c:
            states = await c.wait_terminal(["java-1"], wait_s=60)
            assert states["java-1"].status == "completed" and states["java-1"].tenant == "acme"
            assert states["java-1"].steps["s2"].output == {"n": 43, "label": "s2:1"}
            cmd_run = await c.submit(RunRequest(workflow="lin", input={"n": 1}, run_id="cal-1"))
            await c.wait_terminal([cmd_run], wait_s=60)

    # a registry-aware consumer of the events (no calmrun code): every record is framed, IDs resolve
    records = [r for r in await read_raw(broker, topics.events) if r.key == b"java-1"]
    assert records and all(r.value[0] == 0 for r in records)
    types = []
    for r in records:
        writer = json.loads(rest(url, "GET", f"/schemas/ids/{int.from_bytes(r.value[1:5], 'big')}")["schema"])
        ev = fastavro.schemaless_reader(io.BytesIO(r.value[5:]), fastavro.parse_schema(writer), None)
        assert ev["run_id"] == "java-1"
        types.append(ev["type"])
    assert types[0] == "run.requested" and types[-1] == "run.completed"
    assert {f"{topics.events}-value", f"{topics.step('lin', 's1')}-value"} <= subjects(url)
    requests = await read_raw(broker, topics.requests)
    assert {r.value[0] for r in requests} == {0}  # calmrun's own request is framed the same way
    tasks = await read_raw(broker, topics.step("lin", "s1"))
    assert tasks and all(r.value[0] == 0 for r in tasks)

    # the cost aggregator reads the framed events too: two runs of two attempts each
    stopping = asyncio.Event()
    aggregator = asyncio.create_task(Aggregator(settings).run(stopping))
    try:
        table = await batch_costs(settings, wait_s=120)
    finally:
        stopping.set()
        await aggregator
    [row] = table.rows("workflow", ALL)
    assert (row.value, row.attempts, row.succeeded) == ("lin", 4, 4)


async def test_confluents_own_serializer_starts_a_run_and_its_deserializer_reads_the_events(
    broker: str, prefix: str, registry_url: str
) -> None:
    """Confluent's Python client (``confluent-kafka``: AvroSerializer, AvroDeserializer, its registry
    client) on both ends: its bytes start a run, it reads calmrun's events."""
    url = registry_url
    settings = settings_with(broker, prefix, open_wire(url), task_records=True)  # the tasks are framed too
    topics = Topics(prefix)
    wf = linear("lin", steps=2)
    await ensure_topics(settings.kafka, [wf])
    client = SchemaRegistryClient({"url": url})
    serialize = AvroSerializer(client, json.dumps(shipped("run_request.avsc")))
    value = serialize(
        {"workflow": "lin", "input": json.dumps({"n": 1}), "run_id": "ck-1", "tenant": "default"},
        SerializationContext(topics.requests, MessageField.VALUE),
    )
    assert value is not None and value[0] == 0
    assert f"{topics.requests}-value" in subjects(url)  # registered by Confluent's serializer itself
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        await producer.send_and_wait(topics.requests, value, key=b"ck-1")
    finally:
        await producer.stop()
    async with running(settings, [wf], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        async with Client(settings) as c:
            state = (await c.wait_terminal(["ck-1"], wait_s=60))["ck-1"]
    assert state.status == "completed" and state.steps["s2"].output == {"n": 3, "label": "s2:1"}
    deserialize = AvroDeserializer(client)
    ctx = SerializationContext(topics.events, MessageField.VALUE)
    events = [deserialize(r.value, ctx) for r in await read_raw(broker, topics.events) if r.key == b"ck-1"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run.requested" and events[-1]["type"] == "run.completed"
    assert json.loads(events[0]["data"])["input"] == {"n": 1}


def test_topics_create_checks_each_subject(
    broker: str, prefix: str, registry_url: str, tmp_path: Path
) -> None:
    url = registry_url
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "lin", "steps": [{"name": "s1", "agent": "add_one"}]}))
    topics = Topics(prefix)
    config = tmp_path / "calmrun.yaml"

    def create(**registry: Any) -> Any:
        cfg = {
            "kafka": {"bootstrap": broker, "prefix": prefix, "partitions": 4},
            "wire": open_wire(url, **registry),
        }
        config.write_text(yaml.safe_dump(cfg))
        return CliRunner().invoke(app, ["topics", "create", "-w", str(wf), "-c", str(config)])

    # an earlier, incompatible RunEvent (a required field calmrun's lacks) under FORWARD; the requests
    # subject holds RunRequest (registered by another producer) under BACKWARD. Each rule is set on its
    # subject: a registry's default differs (Confluent: BACKWARD, Apicurio: none)
    old = shipped("run_event.avsc")
    old["fields"] = [*old["fields"], {"name": "legacy_id", "type": "string"}]
    rest(url, "POST", f"/subjects/{topics.events}-value/versions", {"schema": json.dumps(old)})
    rest(url, "PUT", f"/config/{topics.events}-value", {"compatibility": "FORWARD"})
    request = json.dumps(shipped("run_request.avsc"))
    rest(url, "POST", f"/subjects/{topics.requests}-value/versions", {"schema": request})
    rest(url, "PUT", f"/config/{topics.requests}-value", {"compatibility": "BACKWARD"})
    res = create(subject_strategy="TopicRecordName")  # a subject per record type: nothing shared
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    for subj, record in [
        (f"{topics.events}-io.calmrun.RunEvent", "RunEvent"),
        (f"{topics.step('lin', 's1')}-io.calmrun.StepTask", "StepTask"),
        (f"{topics.requests}-io.calmrun.RunCommand", "RunCommand"),
    ]:
        assert re.search(rf"subject {re.escape(subj)} \({record}, [A-Z_]+\): compatible, schema ID \d+", out)
        assert subj in subjects(url)

    # TopicName (the default): the events subject's old schema refuses calmrun's under FORWARD, and the
    # requests subject would hold two record types under BACKWARD: both refused, each with the
    # registry's reasons
    res = create()
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert f"subject {topics.events}-value (RunEvent, FORWARD): incompatible:" in out and "legacy_id" in out
    assert f"subject {topics.requests}-value (RunCommand, BACKWARD): incompatible:" in out
    assert "RunRequest" in out.split(f"{topics.requests}-value (RunCommand, BACKWARD)")[1]
    assert "TopicRecordName" in out and "is_compatible: false" not in out

    rest(url, "PUT", f"/config/{topics.requests}-value", {"compatibility": "NONE"})
    rest(url, "PUT", f"/config/{topics.events}-value", {"compatibility": "NONE"})
    res = create()
    assert res.exit_code == 0, res.output
    versions = rest(url, "GET", f"/subjects/{topics.requests}-value/versions")
    assert len(versions) == 2  # RunRequest, then RunCommand


async def test_commands_go_framed_and_a_refused_registry_stops_the_client(
    broker: str, prefix: str, stub: tuple[RegistryStub, str]
) -> None:
    _, url = stub
    settings = settings_with(broker, prefix, wire(url, password="nope"))
    await ensure_topics(settings.kafka, [linear("lin", steps=1)])
    async with Client(settings) as c:
        with pytest.raises(RegistryAuthError, match="refused the credentials of user 'calmrun'"):
            await c.command(RunCommand(command="cancel", run_id="r", workflow="lin", reason="x"))
