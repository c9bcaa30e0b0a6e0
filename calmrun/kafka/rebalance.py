"""Heartbeats while a group consumer's assignment callback runs, which aiokafka 0.14 does not send.

aiokafka stops its heartbeat task before it rejoins and starts it again only after
``on_partitions_assigned`` has returned (and then waits one interval before the first). The broker
expects a heartbeat within the session timeout of the SyncGroup, so a callback that takes longer than
the session timeout less one heartbeat interval loses the member: its next heartbeat is answered
``UNKNOWN_MEMBER_ID`` and it rejoins, a second rebalance for the whole group. A worker's callback
restores the runs of the partitions it takes and starts their transactional writers; on a new cluster
the first writer waits for Kafka to create ``__transaction_state``. Measured in the fault scenario of
``tests/faults/test_partition.py`` (three brokers, 2 cores, load average 3-6): 3.1-4.3 s from the
SyncGroup to the first heartbeat, against a session timeout of 6 s; on a busier machine both workers
were dropped this way right after their first assignment (docs/performance.md#recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

log = logging.getLogger("calmrun.rebalance")


@contextlib.asynccontextmanager
async def heartbeating(consumer: AIOKafkaConsumer) -> AsyncIterator[None]:
    """Heartbeat for ``consumer``'s member every heartbeat interval while the block runs (an assignment
    callback). Answers are handled as aiokafka's own heartbeats handle them: a rebalance begun meanwhile
    or a member the broker no longer knows makes the consumer rejoin once the callback returns."""
    coordinator = getattr(consumer, "_coordinator", None)  # aiokafka: no public heartbeat
    if coordinator is None:
        yield
        return
    interval_s = coordinator._heartbeat_interval_ms / 1000
    member = coordinator.member_id

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval_s)
            if coordinator.member_id != member:  # reset by an answer: the consumer rejoins after the callback
                return
            try:
                await coordinator._do_heartbeat()
            except KafkaError as exc:  # the heartbeat task after the callback meets it again
                log.warning("heartbeat during the assignment callback failed: %r", exc)
                return

    task = asyncio.create_task(beat(), name="calmrun-rebalance-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
