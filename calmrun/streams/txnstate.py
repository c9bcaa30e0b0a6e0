"""What a writer reads from aiokafka 0.14's transaction manager, a private attribute of its producer: the
error that ended a transaction, and adding partitions to one before writing to them. In one place, so that
a later aiokafka that changes it breaks here, loudly (``can_add_ahead`` is checked as a writer is made)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced, TransactionCoordinatorFenced
from aiokafka.structs import TopicPartition

FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionCoordinatorFenced)
"""Errors that mean another worker now owns the partitions: this one must let them go, not fail."""


def can_add_ahead(producer: AIOKafkaProducer) -> bool:
    """Can a writer add partitions to a transaction before it writes to them (``TxnWriter``'s
    ``ahead_s``)? It calls aiokafka 0.14's transaction manager, ``maybe_add_partition_to_txn``, which is what
    ``send`` calls for a partition new to the transaction; without it, nothing is begun ahead."""
    manager = getattr(producer, "_txn_manager", None)
    return callable(getattr(manager, "maybe_add_partition_to_txn", None))


def add_ahead(producer: AIOKafkaProducer, partitions: Iterable[TopicPartition]) -> None:
    """Add ``partitions`` to ``producer``'s begun transaction now (``can_add_ahead`` said it can)."""
    manager = producer._txn_manager
    for tp in partitions:
        manager.maybe_add_partition_to_txn(tp)


def transaction_error(producer: Any) -> BaseException | None:
    """The error that ended ``producer``'s transaction (aiokafka keeps it on its transaction manager)."""
    manager = getattr(producer, "_txn_manager", None)
    waiter = manager.wait_for_transaction_end() if manager is not None else None
    if waiter is not None and waiter.done() and not waiter.cancelled():
        exc: BaseException | None = waiter.exception()
        return exc
    return None


def fenced_meanwhile(producers: Iterable[AIOKafkaProducer]) -> BaseException | None:
    """The fence behind a failure, if a producer was fenced while a transaction was being written.

    aiokafka's sender learns of the fence in the background and marks the transaction failed; our next
    ``send`` then raises ``IllegalOperation`` ("not in transaction"), not ``ProducerFenced``. The fence
    is kept as the transaction's fatal error.
    """
    for p in producers:
        txn = getattr(p, "_txn_manager", None)
        if txn is None or not txn.is_fatal_error():
            continue
        cause = transaction_error(p)
        if isinstance(cause, FENCED):
            fence: BaseException = cause
            return fence
    return None
