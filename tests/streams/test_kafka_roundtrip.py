"""The stack works: aiokafka talks to the project's own KRaft broker, keys and headers intact."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from calmrun.devkafka import answers_metadata


async def test_produce_consume_round_trip_with_keys_and_headers(broker: str, prefix: str) -> None:
    topic = f"{prefix}.roundtrip"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()

    sent = [
        (f"run-{i}".encode(), f"value-{i}".encode(), [("seq", str(i).encode()), ("h", b"\x00\xff")])
        for i in range(30)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value, headers in sent:
            await producer.send(topic, value, key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int]] = []
    try:
        while len(got) < len(sent):
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, f"no records within 10 s; got {len(got)} of {len(sent)}"
            for records in batch.values():
                got.extend((r.key, r.value, list(r.headers), r.partition) for r in records)
    finally:
        await consumer.stop()

    assert sorted((k, v, h) for k, v, h, _ in got) == sorted(sent)
    by_key: dict[bytes | None, set[int]] = {}
    for key, _, _, partition in got:
        by_key.setdefault(key, set()).add(partition)
    assert all(len(parts) == 1 for parts in by_key.values()), "a key must map to one partition"
    assert len({p for _, _, _, p in got}) > 1, "30 keys should spread over the 3 partitions"


def test_metadata_probe_tells_a_live_broker_from_a_dead_port(broker: str) -> None:
    assert answers_metadata(broker)
    assert not answers_metadata("127.0.0.1:1")
