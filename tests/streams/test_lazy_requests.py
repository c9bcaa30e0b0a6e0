"""An accepted run request's offset may follow its decision in a later transaction (``TxnWriter.add``'s
``lazy``); a refused one's commits with its decision. A crash in between re-reads the accepted request,
which finds its run and is ignored as a duplicate: the run is neither started again nor changed.
"""

from __future__ import annotations

import json

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from calmrun.client import Client
from calmrun.kafka.topics import Topics, partition_for
from tests.runtime_support import WorkerProcs, settings_for, until

PARTITIONS = 4


async def _committed(broker: str, group: str, tp: TopicPartition) -> int:
    """The group's committed offset of ``tp`` (-1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group, partitions=[tp])
    finally:
        await admin.close()
    got = found.get(tp)
    return -1 if got is None else got.offset


async def _send(broker: str, tp: TopicPartition, run_id: str, body: dict[str, object]) -> int:
    """Produce one plain-JSON request for ``run_id`` to ``tp``; its offset."""
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            tp.topic, json.dumps(body).encode(), key=run_id.encode(), partition=tp.partition
        )
    finally:
        await producer.stop()
    return int(meta.offset)


def _same_partition(run_id: str, prefix: str) -> str:
    """A run ID of ``prefix`` on ``run_id``'s partition."""
    p = partition_for(run_id, PARTITIONS)
    return next(f"{prefix}{i}" for i in range(1000) if partition_for(f"{prefix}{i}", PARTITIONS) == p)


@pytest.mark.fault
async def test_an_accepted_request_commits_later_a_refused_one_at_once_and_a_crash_between_is_a_duplicate(
    broker: str, prefix: str, procs: WorkerProcs, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(broker, prefix)
    group = settings.group_id
    # no kick of the commit loop during the test: only a transaction with a strict input commits offsets
    args = ["--commit-interval", "600"]
    # and no transaction begun ahead: one that no decision came for (kafka.txn_ahead_ms, 250 ms after the
    # run's last commit) wakes its writer, which then commits the lazy offsets alone, before the crash
    monkeypatch.setenv("CALMRUN_KAFKA__TXN_AHEAD_MS", "0")
    accepted = "lazy-a"
    refused = _same_partition(accepted, "lazy-q")
    tp = TopicPartition(Topics(prefix).requests, partition_for(accepted, PARTITIONS))
    procs.start("w1", *args)
    await until(lambda: procs.status("w1").get("owned") == [0, 1, 2, 3], 60, "w1 ready", procs.watch("w1"))
    async with Client(settings) as client:
        a_off = await _send(broker, tp, accepted, {"workflow": "lin", "input": {"n": 1}})
        states = await client.wait_terminal([accepted], wait_s=60)
        assert states[accepted].status == "completed"
        # the run's three transactions are committed, and none of them carried the request's offset
        assert await _committed(broker, group, tp) <= a_off
        procs.kill9("w1")  # a crash before any transaction commits it

        procs.start("w2", *args)
        await until(
            lambda: procs.status("w2").get("stats", {}).get("requests", 0) >= 1,
            90,
            "w2 to read the request again",
            procs.watch("w2"),
        )
        q_off = await _send(broker, tp, refused, {"workflow": "no-such-flow", "input": {}})
        rejected = await client.wait_terminal([refused], wait_s=60)
        assert rejected[refused].status == "rejected"
        # the refusal (a dead letter: a re-read would write another) commits its offset with its decision,
        # and with it the accepted request's, read again before it
        assert await _committed(broker, group, tp) == q_off + 1
        events = await client.events(accepted)
    assert [e.type for e in events].count("run.requested") == 1
    assert [e.type for e in events].count("run.completed") == 1
    ignored = [e for e in events if e.type == "input.ignored" and e.data.get("input") == "RunRequested"]
    assert len(ignored) == 1 and "duplicate run request" in ignored[0].data["reason"]
    assert procs.status("w2")["stats"]["tasks_started"] == 0  # no step of the run ran again
    assert procs.terminate("w2") == 0
