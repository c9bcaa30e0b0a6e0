"""Offset and time replay against the real broker: shadow namespaces, exact ranges, bad arguments."""

from __future__ import annotations

import asyncio
from typing import Any

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from typer.testing import CliRunner

from calmrun.agents import AgentRegistry
from calmrun.cli.replay import replay_app
from calmrun.client import Client
from calmrun.replay import REPLAYED_FROM, replay_offsets
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.replay.test_replay_recorded import branching
from tests.runtime_support import add_one, read_raw, ready, running, settings_for


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(replay_app, name="replay")
    app.command("noop")(lambda: None)  # a second command keeps `replay` a group
    return app


async def end_offsets(broker: str, prefix: str) -> dict[tuple[str, int], int]:
    """End offset of every partition of every topic under ``prefix``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await consumer.start()
    try:
        topics = [t for t in await consumer.topics() if t.startswith(f"{prefix}.")]
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        return {(tp.topic, tp.partition): off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def topics_of(broker: str, prefix: str) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await consumer.start()
    try:
        return {t for t in await consumer.topics() if t.startswith(f"{prefix}.")}
    finally:
        await consumer.stop()


async def test_shadow_replay_reproduces_outcomes_and_leaves_production_alone(
    broker: str, prefix: str
) -> None:
    prod = settings_for(broker, prefix)
    wf = parse_workflow(branching())
    agents = AgentRegistry({"add_one": add_one})
    async with running(prod, [wf], agents) as w, Client(prod) as c:
        await ready(w)
        ids = await c.submit_many(
            RunRequest(workflow="rp", input={"n": i * 7}, run_id=f"o-{i}") for i in range(30)
        )
        # one request from another client, with a header of its own
        await c.producer.send_and_wait(
            c.topics.requests,
            b'{"workflow": "rp", "input": {"n": 120}}',
            key=b"o-hdr",
            headers=[("trace-id", b"abc-123")],
        )
        original = await c.wait_terminal([*ids, "o-hdr"], wait_s=60)
    before = await end_offsets(broker, prefix)

    shadow = f"{prefix}-sh"
    report = await replay_offsets(prod, "runs.requests", from_time_ms=0, into=f"shadow:{shadow}")
    assert report.source == f"{prefix}.runs.requests" and report.target == f"{shadow}.runs.requests"
    assert report.replayed == report.selected >= 31

    async with running(settings_for(broker, shadow), [wf], agents), Client(settings_for(broker, shadow)) as c:
        replayed = await c.wait_terminal([*ids, "o-hdr"], wait_s=60)
    for rid, st in original.items():
        assert (replayed[rid].status, replayed[rid].outcome) == (st.status, st.outcome)
        assert replayed[rid].outputs() == st.outputs()
    assert await end_offsets(broker, prefix) == before  # production was never written

    raw = await read_raw(broker, f"{shadow}.runs.requests")
    src = {r.key: r for r in await read_raw(broker, f"{prefix}.runs.requests")}
    for r in raw:
        headers = dict(r.headers)
        topic, _, rest = headers[REPLAYED_FROM].decode().partition("[")
        part, _, off = rest.partition("]@")
        original_rec = src[r.key]
        assert (topic, int(part), int(off)) == (
            f"{prefix}.runs.requests",
            original_rec.partition,
            original_rec.offset,
        )
        assert r.partition == original_rec.partition and r.value == original_rec.value
        assert {k: v for k, v in headers.items() if k != REPLAYED_FROM} == dict(original_rec.headers)
    assert dict(next(r for r in raw if r.key == b"o-hdr").headers)["trace-id"] == b"abc-123"


async def _timed_topic(broker: str, topic: str, t0: int) -> None:
    """20 records on partition 1 of ``topic``, record i stamped t0 + i seconds; 3 on partition 2.

    The stamps are years old, so the topic keeps records forever: with the default 7-day retention the
    broker's retention check (every 10 s in the dev broker) deletes them while the test runs.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=4, replication_factor=1, topic_configs={"retention.ms": "-1"})]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait(
                topic, f"v{i}".encode(), key=f"k{i % 3}".encode(), partition=1, timestamp_ms=t0 + i * 1000
            )
        for i in range(3):
            await producer.send_and_wait(
                topic, f"w{i}".encode(), key=b"w", partition=2, timestamp_ms=t0 + i * 9000
            )
    finally:
        await producer.stop()


async def test_time_range_selects_exactly_the_records_in_range(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    t0 = 1_700_000_000_000
    await _timed_topic(broker, f"{prefix}.events.misc", t0)
    # [t0+5s, t0+12s): v5..v11 on partition 1, w1 (t0+9s) on partition 2
    r = await replay_offsets(
        settings, "events.misc", from_time_ms=t0 + 5000, to_time_ms=t0 + 12000, into=f"shadow:{prefix}-x"
    )
    assert (r.selected, r.replayed) == (8, 8)
    got = await read_raw(broker, f"{prefix}-x.events.misc")
    assert sorted((x.partition, x.value) for x in got) == sorted(
        [(1, f"v{i}".encode()) for i in range(5, 12)] + [(2, b"w1")]
    )
    # offsets, inclusive, one partition, filtered by key
    r = await replay_offsets(
        settings,
        "events.misc",
        from_offset=3,
        to_offset=8,
        partitions=[1],
        run_ids=["k0"],
        into=f"shadow:{prefix}-y",
    )
    assert (r.selected, r.replayed, r.filtered) == (6, 2, 4)  # offsets 3..8; keys k0 at 3 and 6
    assert sorted(x.value for x in await read_raw(broker, f"{prefix}-y.events.misc")) == [b"v3", b"v6"]


async def test_bad_arguments_write_nothing(broker: str, prefix: str) -> None:
    settings_for(broker, prefix)
    t0 = 1_700_000_000_000
    await _timed_topic(broker, f"{prefix}.events.misc", t0)
    before = await end_offsets(broker, prefix)
    runner = CliRunner()
    base = ["replay", "offsets", "-b", broker, "--prefix", prefix]
    cases: list[tuple[list[str], str]] = [
        (["--topic", "nope", "--from-offset", "0", "--into", "shadow:zz"], "unknown topic 'nope'"),
        (["--topic", "events.misc", "--from-offset", "25", "-p", "1", "--into", "shadow:zz"], "out of range"),
        (
            [
                "--topic",
                "events.misc",
                "--from-offset",
                "0",
                "-p",
                "1",
                "--to-offset",
                "20",
                "--into",
                "shadow:zz",
            ],
            "out of range",
        ),
        (["--topic", "events.misc", "--from-offset", "5", "-p", "0", "--into", "shadow:zz"], "out of range"),
        (
            ["--topic", "events.misc", "--from-time", "2999-01-01T00:00:00Z", "--into", "shadow:zz"],
            "no record",
        ),
        (
            ["--topic", "events.misc", "--from-offset", "0", "-p", "7", "--into", "shadow:zz"],
            "no partition 7",
        ),
        (["--topic", "events.misc", "--from-offset", "0", "-p", "1", "--into", "live"], "--yes-live"),
        (["--topic", "events.misc", "--from-offset", "0", "-p", "1", "--into", "elsewhere"], "shadow:NAME"),
        (
            ["--topic", "events.misc", "--from-offset", "0", "-p", "1", "--into", f"shadow:{prefix}"],
            "production",
        ),
        (["--topic", "events.misc", "--into", "shadow:zz"], "exactly one of"),
        (["--topic", "events.misc", "--from-time", "yesterday", "--into", "shadow:zz"], "not an ISO time"),
        (
            [
                "--topic",
                "events.misc",
                "--from-offset",
                "0",
                "-p",
                "1",
                "--run-id",
                "none",
                "--into",
                "shadow:zz",
            ],
            "nothing was written",
        ),
    ]
    for args, message in cases:
        res = await asyncio.to_thread(runner.invoke, cli(), [*base, *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)
    assert await end_offsets(broker, prefix) == before
    assert await topics_of(broker, "zz") == set()


async def test_live_replay_needs_confirmation_and_marks_records(broker: str, prefix: str) -> None:
    await _timed_topic(broker, f"{prefix}.events.misc", 1_700_000_000_000)
    runner = CliRunner()
    res = await asyncio.to_thread(
        runner.invoke,
        cli(),
        [
            "replay",
            "offsets",
            "-b",
            broker,
            "--prefix",
            prefix,
            "--topic",
            f"{prefix}.events.misc",
            "--from-offset",
            "18",
            "-p",
            "1",
            "--into",
            "live",
            "--yes-live",
            "--rate",
            "1000",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "replayed 2 of 2 records" in " ".join(res.output.split())
    recs: list[Any] = [r for r in await read_raw(broker, f"{prefix}.events.misc") if r.partition == 1]
    assert [r.value for r in recs[-2:]] == [b"v18", b"v19"] and len(recs) == 22
    assert dict(recs[-1].headers)[REPLAYED_FROM] == f"{prefix}.events.misc[1]@19".encode()
