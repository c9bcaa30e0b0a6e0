"""One writer per worker (``streams.partitions``), against the real broker: the input offsets name the writer
that committed them; a takeover fences the writers they name that have left the group, and no member that
only gave partitions up in a rebalance."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.kafka.topics import Topics
from calmrun.streams.txn import worker_transactional_id
from calmrun.streams.txnstate import FENCED
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, read_raw, ready, running, settings_for, until


async def committed(broker: str, group: str) -> dict[TopicPartition, OffsetAndMetadata]:
    """``group``'s committed input offsets; their metadata names the writer that committed them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        return dict(await admin.list_consumer_group_offsets(group))
    finally:
        await admin.close()


async def names(broker: str, group: str) -> dict[TopicPartition, str]:
    return {tp: om.metadata for tp, om in (await committed(broker, group)).items()}


async def run_all(client: Client, tag: str, n: int = 12) -> None:
    ids = await client.submit_many(
        RunRequest(workflow="lin", input={"n": i}, run_id=f"{tag}{i}") for i in range(n)
    )
    states = await client.wait_terminal(ids, wait_s=120)
    assert {s.status for s in states.values()} == {"completed"}


async def test_offsets_name_their_owner_and_a_rebalance_fences_nobody(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    wf, agents = linear(), AgentRegistry({"add_one": add_one})
    async with running(settings, [wf], agents) as first, Client(settings) as client:
        await ready(first)
        await run_all(client, "a")
        assert set((await names(broker, settings.group_id)).values()) == {first.txn_id}
        async with running(settings, [wf], agents) as second:
            await until(lambda: len(first.parts.owned) == 2 and len(second.parts.owned) == 2, 60, "a split")
            await run_all(client, "b")  # both keep writing: the one that gave partitions up too
            named = await names(broker, settings.group_id)
            for w in (first, second):
                assert {named[tp] for tp in named if tp.partition in w.parts.owned} == {w.txn_id}
                assert w.stats.fenced == 0
        await until(lambda: len(first.parts.owned) == 4, 60, "the first worker to own every partition again")
        await run_all(client, "c")
        assert first.stats.fenced == 0
    assert first.txn_id.startswith(f"{settings.group_id}.tx.w") and first.txn_id != second.txn_id


async def test_a_takeover_fences_a_departed_writer_the_offsets_name(broker: str, prefix: str) -> None:
    """A writer that committed partition 0's offsets and left a transaction open (as a worker killed
    mid-transaction does): the next worker to own partition 0 aborts that transaction and fences the
    writer, so its record never shows and its next commit fails."""
    settings = settings_for(broker, prefix)
    wf, agents = linear(), AgentRegistry({"add_one": add_one})
    async with running(settings, [wf], agents) as first, Client(settings) as client:
        await ready(first)
        await run_all(client, "a")
    group, state = settings.group_id, Topics(settings.kafka.prefix).state
    zero = {tp: om for tp, om in (await committed(broker, group)).items() if tp.partition == 0}
    zombie_id = worker_transactional_id(group)
    zombie = AIOKafkaProducer(
        bootstrap_servers=broker,
        transactional_id=zombie_id,
        enable_idempotence=True,
        transaction_timeout_ms=900_000,  # the broker's most: only a fence ends its transaction in this test
    )
    await zombie.start()
    try:
        async with zombie.transaction():  # it took partition 0 over: the offsets name it
            renamed = {tp: OffsetAndMetadata(om.offset, zombie_id) for tp, om in zero.items()}
            await zombie.send_offsets_to_transaction(renamed, group)
        await zombie.begin_transaction()
        await (await zombie.send(state, b"zombie", key=b"zombie-run", partition=0))  # left open
        async with running(settings, [wf], agents) as second, Client(settings) as client:
            await ready(second)
            await run_all(client, "b")
        with pytest.raises(FENCED):
            await zombie.commit_transaction()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(zombie.stop(), 10)
    assert [r for r in await read_raw(broker, state) if r.key == b"zombie-run"] == []
