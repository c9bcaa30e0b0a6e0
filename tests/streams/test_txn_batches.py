"""A writer's records go as one aiokafka batch per topic partition (``streams.txnbatches.Batches``), against
the real broker: the same records, order and headers as one ``send`` each, in the transaction or none."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import TopicPartition

from calmrun.kafka.reader import read_to_end
from calmrun.streams.records import Out
from calmrun.streams.txnbatches import require_batch_sends
from tests.streams.test_runtime_eager import _writer


async def _read(broker: str, topic: str, n: int = 0) -> list[tuple[bytes | None, list[tuple[str, bytes]]]]:
    """``topic``'s committed records (partition 0): value and headers, in order; read again until there
    are ``n`` (a commit returns before the broker has written its markers: until then the last stable
    offset, a ``read_committed`` reader's end, is still before the transaction)."""
    for _ in range(300):  # 30 s at most
        got = await _read_once(broker, topic)
        if len(got) >= n:
            break
        await asyncio.sleep(0.1)
    return got


async def _read_once(broker: str, topic: str) -> list[tuple[bytes | None, list[tuple[str, bytes]]]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        return [(r.value, list(r.headers)) async for r in read_to_end(consumer, [TopicPartition(topic, 0)])]
    finally:
        await consumer.stop()


def test_an_aiokafka_without_batch_sends_is_refused_when_a_writer_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(AIOKafkaProducer, "send_batch")
    with pytest.raises(RuntimeError, match="send_batch"):
        require_batch_sends()


async def test_records_over_several_batches_and_topics_commit_in_order_with_their_headers(
    broker: str, prefix: str
) -> None:
    """60 records of 1 KiB on one topic (several 16 KiB batches) and 3 on another: all of them, in order."""
    big, small = f"{prefix}.big", f"{prefix}.small"
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, big, small)
    try:
        for i in range(60):
            outs = [Out(big, 0, b"k", bytes([i]) * 1024, (("n", str(i).encode()),))]
            if i % 20 == 0:
                outs.append(Out(small, 0, None, f"s{i}".encode()))
            writer.add(0, outs, None, None, inputs=())
        await asyncio.wait_for(writer.flush(), 30)
    finally:
        await writer.close()
    assert failures == []
    assert await _read(broker, big, 60) == [(bytes([i]) * 1024, [("n", str(i).encode())]) for i in range(60)]
    assert await _read(broker, small, 3) == [(f"s{i}".encode(), []) for i in (0, 20, 40)]


async def test_a_record_over_max_request_size_fails_its_transaction_before_any_commit(
    broker: str, prefix: str
) -> None:
    """The record fits its batch (a first record always does) but not the producer's limit: refused as
    ``send`` refuses it, and nothing of its transaction is ever read, not even a full batch of it already
    handed to the producer (transactional, in a transaction that never commits)."""
    topic = f"{prefix}.ev"
    failures: list[BaseException] = []
    writer = await _writer(broker, f"{prefix}.tx", failures, topic, max_request_size=4096)
    try:
        full = [Out(topic, 0, b"k", b"f" * 1024) for _ in range(20)]  # over 16 KiB: one batch goes out
        writer.add(0, [*full, Out(topic, 0, b"k", b"x" * 8192)], None, None, inputs=())
        await asyncio.wait_for(writer.flush(), 30)
    finally:
        await writer.close()
    assert [type(f) for f in failures] == [MessageSizeTooLargeError]
    assert await _read(broker, topic) == []
