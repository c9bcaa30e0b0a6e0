"""Drive the benchmark workflow: start a worker process, run closed loops of requests, read the timings.

A closed loop keeps ``concurrency`` runs in flight: it submits that many, and one more each time a run
completes (seen as a committed ``run.completed`` record on the events topic, read ``read_committed`` as
any client must, recognised by its ``type`` header without decoding), until ``n`` runs are done.
Latencies come from the recorded event timestamps afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from bench.common import PARTITIONS, ROOT, Ctx, Proc, cpu_s, end_offsets, pct, prefix
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, RunRequest

WORKFLOW, STEPS = "lin", ("s1", "s2", "s3")


def worker_args(ctx: Ctx, pfx: str, **opts: Any) -> list[str]:
    args = ["--bootstrap", ctx.bootstrap, "--prefix", pfx]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False and v is not None:
            args += [flag, str(v)]
    return args


async def start_worker(ctx: Ctx, name: str, *, root: Path = ROOT, **opts: Any) -> tuple[Proc, str]:
    """A ``bench.worker`` process (of the tree at ``root``) on a fresh prefix, returned once it owns every
    partition."""
    pfx = prefix(name)
    worker = Proc("bench.worker", worker_args(ctx, pfx, **opts), ctx.out / f".{pfx}.json", root)
    try:
        await worker.wait_for(lambda s: len(s.get("owned", [])) == PARTITIONS, 120, "the worker to own all")
    except BaseException:
        worker.kill()
        raise
    return worker, pfx


@dataclass(frozen=True)
class Workload:
    """The workflow a closed loop drives: its name, steps and the input of run ``i``."""

    workflow: str = WORKFLOW
    steps: Sequence[str] = STEPS
    make_input: Callable[[int], dict[str, Any]] = lambda _i: {"n": 0}


LIN = Workload()


def topics_of(pfx: str, wl: Workload = LIN) -> tuple[list[str], list[str], list[str]]:
    """(consumed-only, consumed and produced, produced-only) topics of the worker under ``pfx``."""
    t = Topics(pfx)
    steps = [t.step(wl.workflow, s) for s in wl.steps]
    return [t.requests], steps, [t.state, t.events, t.dlq(wl.workflow), t.dlq("_invalid")]


async def moved(bootstrap: str, pfx: str, wl: Workload = LIN) -> tuple[int, int]:
    """(records consumed, records produced) by the workers so far, from topic end offsets (transaction
    markers included: each takes an offset)."""
    cons, both, prod = topics_of(pfx, wl)
    ends = await end_offsets(bootstrap, [*cons, *both, *prod])
    consumed = sum(ends[t] for t in [*cons, *both])
    produced = sum(ends[t] for t in [*both, *prod])
    return consumed, produced


@dataclass
class Loop:
    n: int
    concurrency: int
    elapsed_s: float
    run_ids: list[str]
    consumed: int = 0
    produced: int = 0
    worker_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    driver_cpu_s: float = 0.0
    timings: dict[str, Any] = field(default_factory=dict)
    client_ms: list[float] = field(default_factory=list)
    worker_cpu_each: list[float] = field(default_factory=list)  # one per worker process
    not_completed: int = 0  # runs that ended otherwise (quarantined, refused)
    ended_at: float = 0.0  # unix time at the loop's end: its window is the elapsed seconds before it

    @property
    def runs_per_s(self) -> float:
        return self.n / self.elapsed_s

    @property
    def hops_per_s(self) -> float:
        return self.n * len(STEPS) / self.elapsed_s

    @property
    def cpu_us_per_run(self) -> float:
        return self.worker_cpu_s / self.n * 1e6

    @property
    def cores(self) -> dict[str, float]:
        """CPU cores busy on average during the loop: the worker, the broker and this driver."""
        return {
            "worker": self.worker_cpu_s / self.elapsed_s,
            "broker": self.broker_cpu_s / self.elapsed_s,
            "driver": self.driver_cpu_s / self.elapsed_s,
        }

    @property
    def moved_per_s(self) -> float:
        return (self.consumed + self.produced) / self.elapsed_s


TERMINAL = {b"run.completed", b"run.quarantined", b"run.refused"}


@contextlib.asynccontextmanager
async def run_client(ctx: Ctx, topics: Topics) -> AsyncIterator[tuple[AIOKafkaProducer, AIOKafkaConsumer]]:
    """A client as a user runs one: a producer of requests, and a reader of the events from their end,
    read_committed as any client of calmrun reads (a run is over for it when its end is committed)."""
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks="all", enable_idempotence=True)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ctx.bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        isolation_level="read_committed",
    )
    await producer.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topics.events, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        yield producer, consumer
    finally:
        await consumer.stop()
        await producer.stop()


async def closed_loop(
    ctx: Ctx,
    pfx: str,
    tag: str,
    n: int,
    concurrency: int,
    pid: int = 0,
    *,
    wl: Workload = LIN,
    pids: Sequence[int] = (),
) -> Loop:
    """Run ``n`` runs keeping ``concurrency`` in flight; counts the records the workers moved meanwhile.

    The CPU counted is that of ``pid`` or of every process in ``pids`` (one figure each).
    """
    pids = list(pids) or ([pid] if pid else [])
    codec = RecordCodec(wire_models())
    topics = Topics(pfx)
    async with run_client(ctx, topics) as (producer, consumer):
        c0, p0 = await moved(ctx.bootstrap, pfx, wl)
        ids = [f"{tag}-{i:07d}" for i in range(n)]
        pending = set(ids)
        sent_at: dict[str, float] = {}
        client_ms: list[float] = []
        submitted = 0
        other = 0

        async def submit(k: int) -> None:
            nonlocal submitted
            for i, rid in enumerate(ids[submitted : submitted + k], start=submitted):
                req = RunRequest(workflow=wl.workflow, run_id=rid, input=wl.make_input(i))
                sent_at[rid] = time.perf_counter()
                await producer.send(topics.requests, codec.encode(req), key=rid.encode())
            submitted = min(n, submitted + k)

        cpu0 = [cpu_s(p) for p in pids]
        broker0 = cpu_s(ctx.broker_pid) if ctx.broker_pid else 0.0
        driver0 = time.process_time()
        t0 = time.perf_counter()
        await submit(concurrency)
        while pending:
            batch = await consumer.getmany(timeout_ms=1000)
            done = 0
            for records in batch.values():
                for rec in records:
                    kind = dict(rec.headers).get("type")
                    if kind in TERMINAL:
                        rid = (rec.key or b"").decode()
                        if rid in pending:
                            pending.discard(rid)
                            other += kind != b"run.completed"
                            client_ms.append((time.perf_counter() - sent_at[rid]) * 1000)
                            done += 1
            if done:
                await submit(done)
        elapsed, ended_at = time.perf_counter() - t0, time.time()
        cpu = [cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True)]
        broker = cpu_s(ctx.broker_pid) - broker0 if ctx.broker_pid else 0.0
        driver = time.process_time() - driver0
        await producer.flush()
        c1, p1 = await moved(ctx.bootstrap, pfx, wl)
        return Loop(
            n,
            concurrency,
            elapsed,
            ids,
            c1 - c0,
            p1 - p0,
            sum(cpu),
            broker,
            driver,
            client_ms=client_ms,
            worker_cpu_each=cpu,
            not_completed=other,
            ended_at=ended_at,
        )


WANTED = {b"run.requested", b"step.succeeded", b"run.completed"}


async def timings(ctx: Ctx, pfx: str, run_ids: Sequence[str]) -> dict[str, list[float]]:
    """Per run: request -> completion; per hop: previous step's result (or the request) -> this step's.

    All from the recorded events' ``at_ms`` (the request's is its record timestamp; a step result's is
    when the worker finished the attempt).
    """
    codec = RecordCodec(wire_models())
    topic = Topics(pfx).events
    wanted = set(run_ids)
    at: dict[str, dict[str, int]] = {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ctx.bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        async for rec in read_to_end(consumer, tps):
            kind = dict(rec.headers).get("type")
            if kind not in WANTED or (rec.key or b"").decode() not in wanted or rec.value is None:
                continue
            ev = codec.decode_as(rec.value, RunEvent)
            if ev.seq < 0:
                continue
            name = ev.step if ev.type == "step.succeeded" else ev.type
            at.setdefault(ev.run_id, {}).setdefault(str(name), ev.at_ms)
    finally:
        await consumer.stop()
    runs: list[float] = []
    hops: list[float] = []
    for rid in run_ids:
        t = at.get(rid, {})
        if "run.requested" not in t or "run.completed" not in t:
            continue
        runs.append(t["run.completed"] - t["run.requested"])
        prev = t["run.requested"]
        for s in STEPS:
            if s in t:
                hops.append(t[s] - prev)
                prev = t[s]
    return {"run_ms": runs, "hop_ms": hops}


def latency_summary(t: dict[str, list[float]], client_ms: list[float]) -> dict[str, float]:
    """Event-timestamp latencies, and the client's: send of the request -> ``run.completed`` seen."""
    return {
        "client p50 ms": pct(client_ms, 50),
        "client p99 ms": pct(client_ms, 99),
        "run p50 ms": pct(t["run_ms"], 50),
        "run p99 ms": pct(t["run_ms"], 99),
        "hop p50 ms": pct(t["hop_ms"], 50),
        "hop p99 ms": pct(t["hop_ms"], 99),
        "runs timed": float(len(t["run_ms"])),
    }


async def measure(
    ctx: Ctx, name: str, *, n: int, concurrency: int, warmup: int, with_timings: bool = True, **worker: Any
) -> tuple[list[Loop], dict[str, Any]]:
    """One worker: a warm-up loop, then ``ctx.rounds`` measured loops; returns them and its last status.

    Its status file is written once a second, not ten times: nothing reads it during the loops, and the
    writes are the bench's CPU, not the worker's (``bench.worker``)."""
    proc, pfx = await start_worker(ctx, name, **{"status_every": 1.0} | worker)
    try:
        if ctx.broker_warmup:  # the session's first loop: the broker's JIT first (bench.common.WARMUP)
            await closed_loop(ctx, pfx, "broker", ctx.broker_warmup, 100)
            ctx.notes.append(f"the broker was warmed by {ctx.broker_warmup:,} runs before the first loop")
            ctx.broker_warmup = 0
        await closed_loop(ctx, pfx, "warm", warmup, min(concurrency, warmup))
        loops = []
        for r in range(ctx.rounds):
            loop = await closed_loop(ctx, pfx, f"r{r}", n, concurrency, proc.pid)
            if with_timings:
                loop.timings = latency_summary(await timings(ctx, pfx, loop.run_ids), loop.client_ms)
            loops.append(loop)
        return loops, await proc.stop()
    finally:
        proc.kill()


def status_path(ctx: Ctx, pfx: str) -> Path:
    return ctx.out / f".{pfx}.json"
