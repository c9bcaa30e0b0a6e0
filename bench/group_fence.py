"""KIP-447 fencing from calmrun's clients, and what one transaction per worker instead of one per partition
saves: ``python -m bench.group_fence [--bootstrap B] [--broker-pid PID] [--cycles 200] [--rounds 3]``.

First a fence check per client (offsets with a member's generation commit; with the generation a rebalance
made stale they are refused and nothing of that transaction shows), then the cost of a cycle, alternating.
aiokafka 0.14 sends TxnOffsetCommit v0 only: ``GroupProducer`` sends v3; confluent-kafka gets librdkafka's
group metadata built from the aiokafka consumer's member id and generation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any, Literal

import aiokafka.errors as Errors
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import CoordinationType
from aiokafka.producer.sender import Sender, TxnOffsetCommitHandler
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from bench.common import cpu_s, create_topics, loadavg, on_a_broker, pct
from calmrun.kafka.connect import TXN_BUSY_RETRY_MS, TXN_RETRY_BACKOFF_MS, retry_busy_transactions_soon

Client = Literal["aiokafka", "confluent"]
WARMUP = 10  # cycles per round before the measured ones: the first find the coordinators
VALUE = b"x" * 200
FENCE_CODES = {22: "ILLEGAL_GENERATION", 25: "UNKNOWN_MEMBER_ID", 82: "FENCED_INSTANCE_ID"}
_S = CompactString("utf-8")


class TxnOffsetCommitResponse_v3(Response):  # type: ignore[misc]
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", _S),
                (
                    "partitions",
                    CompactArray(("partition_index", Int32), ("error_code", Int16), ("tags", TaggedFields)),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):  # type: ignore[misc]
    """Kafka's TxnOffsetCommitRequest.json, version 3 (the first flexible one: KIP-447's member fields)."""

    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", _S),
        ("group_id", _S),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", _S),
        ("group_instance_id", _S),  # nullable: None is written as length 0
        (
            "topics",
            CompactArray(
                ("name", _S),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("committed_metadata", _S),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitV3(Request[TxnOffsetCommitRequest_v3]):  # type: ignore[misc]
    API_KEY = 28

    def __init__(self, *fields: Any) -> None:
        self._fields = fields

    def build(self, request_struct_class: type[TxnOffsetCommitRequest_v3]) -> TxnOffsetCommitRequest_v3:
        return request_struct_class(*self._fields, {})


@dataclass(frozen=True)
class Member:
    """A consumer's place in its group, as the group coordinator checks it in TxnOffsetCommit v3."""

    generation: int
    member_id: str
    instance_id: str | None = None


def member_of(consumer: AIOKafkaConsumer) -> Member:
    coordinator = consumer._coordinator
    return Member(coordinator.generation, coordinator.member_id, coordinator._group_instance_id)


def confluent_metadata(group_id: str, member: Member) -> bytes:
    """librdkafka's serialised group metadata (``rd_kafka_consumer_group_metadata_write``, rdkafka_cgrp.c):
    what confluent-kafka's ``Consumer.consumer_group_metadata()`` returns and its producer takes."""
    out = (
        b"CGMDv2:"
        + struct.pack("=i", member.generation)
        + group_id.encode()
        + b"\0"
        + member.member_id.encode()
    )
    if member.instance_id is None:
        return out + b"\0\x01"
    return out + b"\0\x00" + member.instance_id.encode() + b"\0"


class GroupOffsetsHandler(TxnOffsetCommitHandler):  # type: ignore[misc]
    """aiokafka's TxnOffsetCommit handler, sending v3 with a member's generation and id."""

    def __init__(
        self, sender: Sender, offsets: dict[TopicPartition, Any], group_id: str, member: Member
    ) -> None:
        super().__init__(sender, offsets, group_id)
        self._member = member

    def create_request(self) -> TxnOffsetCommitV3:
        txn = self._sender._txn_manager
        topics: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = {}
        for tp, offset in sorted(self._offsets.items()):
            topics.setdefault(tp.topic, []).append((tp.partition, offset.offset, -1, offset.metadata, {}))
        m = self._member
        return TxnOffsetCommitV3(
            txn.transactional_id,
            self._group_id,
            txn.producer_id,
            txn.producer_epoch,
            m.generation,
            m.member_id,
            m.instance_id,
            [(topic, parts, {}) for topic, parts in topics.items()],
        )

    def handle_response(self, resp: TxnOffsetCommitResponse_v3) -> float | None:
        errors = [(name, [(p, code) for p, code, _ in parts]) for name, parts, _ in resp.topics]
        fenced = sorted({code for _, parts in errors for _, code in parts if code in FENCE_CODES})
        if not fenced:
            return super().handle_response(SimpleNamespace(errors=errors))  # type: ignore[no-any-return]
        # The Java client's answer: an abortable error (CommitFailedException). Not aiokafka's
        # error_transaction(): it forgets the partitions already added, so the abort that follows ends
        # locally and the broker's transaction, the refused one's records in it, stays open.
        txn = self._sender._txn_manager
        exc = Errors.for_code(fenced[0])(f"TxnOffsetCommit v3 refused: {FENCE_CODES[fenced[0]]}")
        txn._transition_to(TransactionState.ABORTABLE_ERROR)
        for _, _, fut in txn._pending_txn_offsets:
            fut.set_exception(exc)
        txn._pending_txn_offsets.clear()
        txn._transaction_waiter.set_exception(exc)
        return None


class GroupSender(Sender):  # type: ignore[misc]
    """aiokafka's sender, committing the offsets of a group it has a member for with ``GroupOffsetsHandler``
    (the sender makes its handler by name, so the handler alone is not enough)."""

    def __init__(self, sender: Sender) -> None:
        super().__init__(
            sender.client,
            acks=sender._acks,
            txn_manager=sender._txn_manager,
            message_accumulator=sender._message_accumulator,
            retry_backoff_ms=sender._retry_backoff * 1000,
            request_timeout_ms=sender._request_timeout_ms,
        )
        self.members: dict[str, Member] = {}

    async def _do_txn_offset_commit(self, offsets: dict[TopicPartition, Any], group_id: str) -> None:
        member = self.members.get(group_id)
        if member is None or not offsets:
            await super()._do_txn_offset_commit(offsets, group_id)
            return
        try:
            node_id = await self._find_coordinator(CoordinationType.GROUP, group_id)
        except Errors.GroupAuthorizationFailedError as exc:
            self._txn_manager.error_transaction(exc)
            return
        await GroupOffsetsHandler(self, offsets, group_id, member).do(node_id)


class GroupProducer(AIOKafkaProducer):  # type: ignore[misc]
    """A transactional aiokafka producer whose offsets can carry a group member (KIP-447)."""

    _sender: Sender

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._group_sender = GroupSender(self._sender)
        self._sender = self._group_sender

    async def send_member_offsets(
        self, offsets: dict[TopicPartition, int], group_id: str, member: Member
    ) -> None:
        self._group_sender.members[group_id] = member
        await self.send_offsets_to_transaction(offsets, group_id)


def _error(exc: BaseException) -> dict[str, Any]:
    from confluent_kafka import KafkaException

    if isinstance(exc, KafkaException):
        err = exc.args[0]
        return {"code": err.code(), "name": err.name(), "abortable": err.txn_requires_abort()}
    return {"code": getattr(exc, "errno", None), "name": type(exc).__name__}


class _Txn:
    """One transaction of the fence check by either client: a record on ``out``-0, offsets, commit."""

    def __init__(self, client: Client, bootstrap: str, txn_id: str, group_id: str) -> None:
        self.client, self.group_id = client, group_id
        if client == "aiokafka":
            self.aio = GroupProducer(
                bootstrap_servers=bootstrap,
                transactional_id=txn_id,
                linger_ms=0,
                retry_backoff_ms=TXN_RETRY_BACKOFF_MS,
            )
        else:
            from confluent_kafka import Producer

            self.ck = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id, "linger.ms": 0})

    async def start(self) -> None:
        if self.client == "aiokafka":
            await self.aio.start()
        else:
            await asyncio.to_thread(self.ck.init_transactions)

    async def stop(self) -> None:
        if self.client == "aiokafka":
            await self.aio.stop()
        else:
            await asyncio.to_thread(self.ck.flush, 10)

    async def run(
        self, out: str, value: bytes, offsets: dict[TopicPartition, int], member: Member
    ) -> dict[str, Any]:
        """Begin, write, send offsets, commit; on a refusal abort. What each step answered."""
        steps: list[Callable[[], Awaitable[Any]]]
        if self.client == "aiokafka":
            aio = self.aio
            await aio.begin_transaction()
            await aio.send_and_wait(out, value, partition=0)
            steps = [partial(aio.send_member_offsets, offsets, self.group_id, member), aio.commit_transaction]
            abort = aio.abort_transaction
        else:
            from confluent_kafka import TopicPartition as CTopicPartition

            ck = self.ck
            ck.begin_transaction()
            ck.produce(out, value, partition=0)
            positions = [CTopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
            cgmd = confluent_metadata(self.group_id, member)
            steps = [
                partial(asyncio.to_thread, ck.send_offsets_to_transaction, positions, cgmd, 30),
                partial(asyncio.to_thread, ck.commit_transaction, 30),
            ]
            abort = partial(asyncio.to_thread, ck.abort_transaction, 30)
        res: dict[str, Any] = {}
        for step, call in zip(("offsets", "commit"), steps, strict=True):
            try:
                await call()
            except Exception as exc:
                res[step] = _error(exc)
        if res:
            await abort()
            res["aborted"] = True
        return res


async def _consumer(bootstrap: str, topic: str, group_id: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        heartbeat_interval_ms=200,
    )
    await consumer.start()
    return consumer


async def _until(pred: Any, what: str, wait_s: float = 30.0) -> None:
    end = time.monotonic() + wait_s
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {wait_s} s for {what}")
        await asyncio.sleep(0.05)


async def _committed(admin: AIOKafkaAdminClient, group_id: str, tp: TopicPartition) -> int:
    got: dict[TopicPartition, OffsetAndMetadata] = await admin.list_consumer_group_offsets(
        group_id, partitions=[tp]
    )
    return got[tp].offset if tp in got else -1


async def _committed_becomes(admin: AIOKafkaAdminClient, group_id: str, tp: TopicPartition, want: int) -> int:
    """The group's committed offset once it is ``want`` (a commit's markers are written after EndTxn is
    answered), or whatever it is after 10 s."""
    end = time.monotonic() + 10
    while True:
        got = await _committed(admin, group_id, tp)
        if got == want or time.monotonic() > end:
            return got
        await asyncio.sleep(0.05)


async def _read_committed(bootstrap: str, tp: TopicPartition, until: bytes) -> list[bytes]:
    """Values of ``tp`` a read_committed reader sees, from the start up to ``until`` (or 15 s)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await reader.start()
    seen: list[bytes] = []
    try:
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        end = time.monotonic() + 15
        while until not in seen and time.monotonic() < end:
            for records in (await reader.getmany(tp, timeout_ms=200)).values():
                seen += [r.value for r in records]
    finally:
        await reader.stop()
    return seen


async def fence_check(bootstrap: str, client: Client) -> dict[str, Any]:
    """One producer commits with a member's current generation, is refused with the generation a rebalance
    made stale, then commits with the new one. What the broker answered, and what became visible."""
    name = f"bfence{uuid.uuid4().hex[:8]}"
    src, out, group_id = f"{name}in", f"{name}out", f"{name}.group"
    await create_topics(bootstrap, [src, out])
    tp, out0 = TopicPartition(src, 0), TopicPartition(out, 0)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    first = await _consumer(bootstrap, src, group_id)
    second: AIOKafkaConsumer | None = None
    txn = _Txn(client, bootstrap, f"{name}.tx", group_id)
    await txn.start()
    res: dict[str, Any] = {"client": client}
    try:
        await _until(lambda: first.assignment(), "the first consumer's assignment")
        old = member_of(first)
        res["current"] = await txn.run(out, b"current", {tp: 1}, old) or "ok"
        res["committed_after_current"] = await _committed_becomes(admin, group_id, tp, 1)

        second = await _consumer(bootstrap, src, group_id)
        c2 = second
        await _until(
            lambda: (
                first.assignment()
                and c2.assignment()
                and member_of(first).generation == member_of(c2).generation > old.generation
            ),
            "the rebalance",
        )
        new = member_of(first)
        res["generations"] = [old.generation, new.generation]
        res["stale"] = await txn.run(out, b"stale", {tp: 2}, old)
        await asyncio.sleep(0.5)  # had it committed after all, its markers would be written by now
        res["committed_after_stale"] = await _committed(admin, group_id, tp)
        res["new"] = await txn.run(out, b"new", {tp: 3}, new) or "ok"
        res["committed_after_new"] = await _committed_becomes(admin, group_id, tp, 3)
        res["read_committed"] = [v.decode() for v in await _read_committed(bootstrap, out0, b"new")]
    finally:
        await txn.stop()
        for c in (first, second):
            if c is not None:
                await c.stop()
        await admin.close()
    return res


# The cycle cost.


def _stats(variant: str, rnd: int, times: list[float], cpu: float, broker: float | None) -> dict[str, Any]:
    n = len(times)
    return {
        "round": rnd,
        "variant": variant,
        "cycles": n,
        "p50_ms": round(pct(times, 50), 2),
        "p90_ms": round(pct(times, 90), 2),
        "client_cpu_ms": round(cpu * 1000 / n, 3),
        "broker_cpu_ms": None if broker is None else round(broker * 1000 / n, 3),
        "load": loadavg(),
    }


class _Meter:
    """Wall time per cycle; process and broker CPU over the measured cycles (after ``WARMUP``)."""

    def __init__(self, broker_pid: int) -> None:
        self.broker_pid = broker_pid
        self.times: list[float] = []
        self.cpu0 = self.broker0 = 0.0

    def start(self) -> None:
        self.cpu0 = time.process_time()  # every thread of the process: librdkafka's too
        self.broker0 = cpu_s(self.broker_pid) if self.broker_pid else 0.0

    def result(self, variant: str, rnd: int) -> dict[str, Any]:
        cpu = time.process_time() - self.cpu0
        broker = cpu_s(self.broker_pid) - self.broker0 if self.broker_pid else None
        return _stats(variant, rnd, self.times[WARMUP:], cpu, broker)


def _aio_producer(cls: type[AIOKafkaProducer], bootstrap: str, txn_id: str) -> AIOKafkaProducer:
    return cls(
        bootstrap_servers=bootstrap,
        transactional_id=txn_id,
        linger_ms=0,
        retry_backoff_ms=TXN_RETRY_BACKOFF_MS,
    )


async def per_partition(
    bootstrap: str, src: str, out: str, group_id: str, cycles: int, meter: _Meter
) -> None:
    tag = uuid.uuid4().hex[:6]
    producers = [_aio_producer(AIOKafkaProducer, bootstrap, f"{out}.tx.{k}.{tag}") for k in range(4)]
    await asyncio.gather(*(p.start() for p in producers))

    async def one(k: int, p: AIOKafkaProducer, i: int) -> None:
        await p.begin_transaction()
        sent = [await p.send(out, VALUE, partition=k) for _ in range(3)]
        await p.send_offsets_to_transaction({TopicPartition(src, k): i}, group_id)
        await p.commit_transaction()
        for f in sent:
            await f

    try:
        for i in range(cycles):
            if i == WARMUP:
                meter.start()
            t0 = time.perf_counter()
            await asyncio.gather(*(one(k, p, i) for k, p in enumerate(producers)))
            meter.times.append((time.perf_counter() - t0) * 1000)
    finally:
        await asyncio.gather(*(p.stop() for p in producers))


async def per_worker(
    bootstrap: str, src: str, out: str, consumer: AIOKafkaConsumer, cycles: int, meter: _Meter
) -> None:
    group_id = consumer._coordinator.group_id
    p = _aio_producer(GroupProducer, bootstrap, f"{out}.tx.w.{uuid.uuid4().hex[:6]}")
    await p.start()
    try:
        for i in range(cycles):
            if i == WARMUP:
                meter.start()
            t0 = time.perf_counter()
            await p.begin_transaction()
            sent = [await p.send(out, VALUE, partition=k) for k in range(4) for _ in range(3)]
            await p.send_member_offsets(
                {TopicPartition(src, k): i for k in range(4)}, group_id, member_of(consumer)
            )
            await p.commit_transaction()
            for f in sent:
                await f
            meter.times.append((time.perf_counter() - t0) * 1000)
    finally:
        await p.stop()


def per_worker_confluent(
    bootstrap: str, src: str, out: str, consumer: AIOKafkaConsumer, cycles: int, meter: _Meter
) -> None:
    """Blocking calls in a plain loop, on a thread: the aiokafka consumer's heartbeats go on meanwhile (its
    generation and member id are read from here, as plain attributes)."""
    from confluent_kafka import Producer
    from confluent_kafka import TopicPartition as CTopicPartition

    group_id = consumer._coordinator.group_id
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"{out}.tx.c.{uuid.uuid4().hex[:6]}",
            "linger.ms": 0,
            "retry.backoff.ms": max(1, round(TXN_BUSY_RETRY_MS)),  # its busy retry, as aiokafka's below
        }
    )
    p.init_transactions()
    for i in range(cycles):
        if i == WARMUP:
            meter.start()
        t0 = time.perf_counter()
        p.begin_transaction()
        for k in range(4):
            for _ in range(3):
                p.produce(out, VALUE, partition=k)
        offsets = [CTopicPartition(src, k, i) for k in range(4)]
        p.send_offsets_to_transaction(offsets, confluent_metadata(group_id, member_of(consumer)))
        p.commit_transaction()
        meter.times.append((time.perf_counter() - t0) * 1000)


async def cycle_cost(bootstrap: str, cycles: int, rounds: int, broker_pid: int) -> None:
    retry_busy_transactions_soon(TXN_BUSY_RETRY_MS)  # calmrun's busy retry, as the worker sets it
    name = f"bcost{uuid.uuid4().hex[:8]}"
    src, out, group_id = f"{name}in", f"{name}out", f"{name}.group"
    await create_topics(bootstrap, [src, out])
    consumer = await _consumer(bootstrap, src, group_id)
    try:
        await _until(lambda: len(consumer.assignment()) == 4, "the consumer's assignment")
        total = cycles + WARMUP
        for rnd in range(1, rounds + 1):
            for variant in ("per partition", "per worker", "per worker, confluent-kafka"):
                meter = _Meter(broker_pid)
                if variant == "per partition":
                    await per_partition(bootstrap, src, out, group_id, total, meter)
                elif variant == "per worker":
                    await per_worker(bootstrap, src, out, consumer, total, meter)
                else:
                    await asyncio.to_thread(per_worker_confluent, bootstrap, src, out, consumer, total, meter)
                print(json.dumps(meter.result(variant, rnd)), flush=True)
    finally:
        await consumer.stop()


async def run(bootstrap: str, cycles: int, rounds: int, broker_pid: int) -> None:
    print(json.dumps({"start": time.strftime("%H:%M:%S"), "load": loadavg()}), flush=True)
    for client in ("aiokafka", "confluent"):
        print(json.dumps(await fence_check(bootstrap, client)), flush=True)
    await cycle_cost(bootstrap, cycles, rounds, broker_pid)
    print(json.dumps({"end": time.strftime("%H:%M:%S"), "load": loadavg()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.group_fence")
    p.add_argument("--bootstrap", help="a broker; without it one is started for the run")
    p.add_argument("--broker-pid", type=int, default=0, help="the broker's pid: its CPU per cycle too")
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    on_a_broker(args.bootstrap, lambda b: run(b, args.cycles, args.rounds, args.broker_pid), "fence")


if __name__ == "__main__":
    main()
