"""The worker's Kafka clients, configured in one place: the group consumer, the restorer, the writers.

Every one reads ``read_committed`` or writes transactionally, and carries the connection's security
settings (``calmrun.kafka.connect``).
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from calmrun.kafka.connect import TXN_RETRY_BACKOFF_MS, client_kwargs, retry_busy_transactions_soon
from calmrun.settings import Settings
from calmrun.streams.txn import on_lane, transactional_id


def group_consumer(
    settings: Settings,
    assignor: type[AbstractPartitionAssignor] | None = None,
    group_id: str | None = None,
) -> AIOKafkaConsumer:
    """The consumer of the worker's inputs: one group (``settings.group_id``, or a pool's ``group_id``),
    co-partitioned (``assignor``, which keeps the range assignor's co-partitioning and moves partitions to
    the versions their runs need; the range assignor when none is given), no auto commit (offsets commit
    in the writers' transactions), heartbeats every second."""
    k, w = settings.kafka, settings.worker
    session_ms = round(w.session_timeout_s * 1000)
    return AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap,
        group_id=group_id or settings.group_id,
        group_instance_id=w.instance_id,
        client_id=k.client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        # one assignor only: aiokafka 0.14 sends one JoinGroup per assignor, each with different protocol
        # metadata, and under load every second one restarts the rebalance, forever (see the README)
        partition_assignment_strategy=(assignor or RangePartitionAssignor,),
        max_poll_interval_ms=600_000,
        rebalance_timeout_ms=max(session_ms, 30_000),
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=min(1000, session_ms // 3),
        **client_kwargs(k),
    )


def restorer(settings: Settings) -> AIOKafkaConsumer:
    """Reads state partitions to their end on assignment.

    "earliest": with the default "latest", the reset that assign() starts in the background can land
    after the explicit seek and silently skip the whole state partition.
    """
    k = settings.kafka
    return AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        client_id=f"{k.client_id}-restore",
        **client_kwargs(k),
    )


def transactional_producer(
    settings: Settings, p: int, group_id: str | None = None, lane: int = 0
) -> AIOKafkaProducer:
    """The producer of partition ``p``'s writer on ``lane`` (a pool executor's, ``streams.txn``; not
    started: starting it fences the previous owner's)."""
    tid = transactional_id(group_id or settings.group_id, p, lane)
    return txn_producer(settings, tid, f"{p}" + ("b" if lane else ""))


def worker_producer(settings: Settings, txn_id: str, lane: int = 0) -> AIOKafkaProducer:
    """The producer of a deciding worker's writer on ``lane``, its transactional id ``txn_id`` (``.b`` added
    on the second lane: ``streams.txn.on_lane``); not started."""
    return txn_producer(settings, on_lane(txn_id, lane), "w" + ("b" if lane else ""))


def txn_producer(settings: Settings, tid: str, name: str) -> AIOKafkaProducer:
    """A transactional producer of transactional id ``tid`` (not started: starting it initialises the id,
    which fences its previous user); its client id ends in ``-tx-<name>``."""
    k = settings.kafka
    retry_busy_transactions_soon(k.txn_busy_retry_ms)  # the next transaction starts while the last one ends
    return AIOKafkaProducer(
        bootstrap_servers=k.bootstrap,
        client_id=f"{k.client_id}-tx-{name}",
        transactional_id=tid,
        enable_idempotence=True,
        acks="all",
        linger_ms=k.linger_ms,
        max_batch_size=256 * 1024,
        retry_backoff_ms=TXN_RETRY_BACKOFF_MS,
        max_request_size=k.max_request_size,
        **client_kwargs(k),
    )


def spare_producer(settings: Settings, p: int, group_id: str | None = None) -> AIOKafkaProducer | None:
    """The second lane's producer of partition ``p``'s writer, if ``kafka.txn_lanes`` is 2."""
    return transactional_producer(settings, p, group_id, 1) if settings.kafka.txn_lanes == 2 else None
