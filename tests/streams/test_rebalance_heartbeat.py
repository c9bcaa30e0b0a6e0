"""A member whose assignment callback outlasts its session timeout keeps its membership while
``calmrun.kafka.rebalance.heartbeating`` wraps the callback (the worker's and the pool's ``Listener``).

Without it aiokafka sends no heartbeat until the callback has returned: the broker drops the member and
it joins again. That case is checked too: the day aiokafka heartbeats during the callback itself, it
fails, and the wrapper can go.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from calmrun.kafka.rebalance import heartbeating

SESSION_MS = 6_000  # the broker's group.min.session.timeout.ms
CALLBACK_S = 8.0  # the first assignment's callback: longer than the session timeout


class Slow(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: AIOKafkaConsumer, keep: bool) -> None:
        self.consumer, self.keep, self.members = consumer, keep, []

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.members.append(self.consumer._coordinator.member_id)
        if len(self.members) > 1:
            return
        if self.keep:
            async with heartbeating(self.consumer):
                await asyncio.sleep(CALLBACK_S)
        else:
            await asyncio.sleep(CALLBACK_S)


@pytest.mark.parametrize("keep", [True, False], ids=["heartbeating", "aiokafka-alone"])
async def test_a_slow_assignment_callback_keeps_its_member_only_with_heartbeats(
    broker: str, keep: bool
) -> None:
    topic, group = f"hb-{uuid.uuid4().hex[:8]}", f"hb-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker,
        group_id=group,
        group_instance_id="w1",
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=1_000,
        enable_auto_commit=False,
    )
    listener = Slow(consumer, keep)
    consumer.subscribe([topic], listener=listener)
    await consumer.start()
    try:
        for _ in range(100):  # the callback, then three heartbeats' time (a lost member rejoins meanwhile)
            if listener.members:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(CALLBACK_S + 3.0)
        if keep:  # never dropped: assigned once, under the same member id
            assert len(listener.members) == 1, listener.members
            assert consumer._coordinator.member_id == listener.members[0]
        else:  # dropped after the session timeout: joined again under a new member id
            assert len(listener.members) == 2, listener.members
            assert listener.members[1] != listener.members[0]
    finally:
        await consumer.stop()
