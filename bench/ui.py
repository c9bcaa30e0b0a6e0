"""Workload ``ui``: the operator page's index with many finished runs (``calmrun ui``).

N finished runs of a three-step workflow (100,000; quick: 300) are written straight to a prefix's state and
events topics: one run is decided by the real decider and its records are encoded once, then copied under
other run IDs of the same length (the Avro bytes stay valid: strings are length-prefixed), with creation
times spread over a day and a tenth of the runs quarantined. Then, per round, a fresh page process
(``UiServer``, in this process) rebuilds its index from the topics (measured: start -> caught up), and
the runs list (newest 100; filtered by status; a run-ID search) and run pages (random runs) are asked over
HTTP, 200 times each: p50 and p95 milliseconds, as the browser would see them minus rendering.
"""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal
from typing import Any

from aiohttp import ClientSession
from aiokafka import AIOKafkaProducer

from bench.common import PARTITIONS, Ctx, create_topics, pct, prefix, summary
from calmrun.kafka.topics import Topics, partition_for
from calmrun.settings import load_settings
from calmrun.ui import Access, UiServer
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.decider import decide
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import DeciderInput, RunRequested, StepCost, StepResult
from calmrun.workflow.state import RunState
from tests.runtime_support import linear

ID_WIDTH = 12
QUERIES = 200


def _template(wf: WorkflowDef, run_id: str, fail: bool) -> tuple[RunState, list[Any]]:
    """One run decided to its end by the decider: its final state and its events."""
    state: RunState | None = None
    events: list[Any] = []
    pending: list[DeciderInput] = [RunRequested(run_id, wf.name, {"n": 1}, 1_000, "acme")]
    clock = 1_000
    while pending:
        d = decide(wf, state, pending.pop(0))
        state = d.state
        events.extend(d.events)
        for t in d.tasks:
            clock += 7
            cost = StepCost(latency_ms=5.0, queue_wait_ms=2.0, tokens_in=120, tokens_out=30, requests=1)
            cost = cost.model_copy(update={"model": "fast", "cost_usd": Decimal("0.000123")})
            if fail and t.step == "s2":
                result = StepResult(run_id, t.step, t.attempt, clock, error_type="E", error="boom", cost=cost)
            else:
                result = StepResult(
                    run_id, t.step, t.attempt, clock, output={"n": 2, "label": "x" * 150}, cost=cost
                )
            pending.append(result)
    assert state is not None and state.is_terminal()
    return state, events


async def _write_runs(bootstrap: str, pfx: str, n: int) -> None:
    wf = linear("bench", 3, agent="bench_step", retry={"max_attempts": 1})
    topics = Topics(pfx)
    await create_topics(bootstrap, [topics.state, topics.events], PARTITIONS)
    codec = RecordCodec(wire_models())
    tid = "r" + "0" * (ID_WIDTH - 1)
    templates = []
    for fail in (False, True):
        state, events = _template(wf, tid, fail)
        templates.append((state, [codec.encode(e) for e in events]))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024, acks=1)
    await producer.start()
    try:
        # the last day: older record timestamps would fall out of the topics' 7-day retention at once
        t0 = time.time_ns() // 1_000_000 - n * 864
        pending = []
        tb = tid.encode()
        for i in range(n):
            rid = f"r{i:0{ID_WIDTH - 1}d}"
            state, event_bs = templates[1 if i % 10 == 0 else 0]
            key = rid.encode()
            p = partition_for(rid, PARTITIONS)
            ts = t0 + i * 864  # a day's worth of runs
            for ev in event_bs:
                value = ev.replace(tb, key)
                pending.append(
                    await producer.send(topics.events, value, key=key, partition=p, timestamp_ms=ts)
                )
            st = state.model_copy(update={"run_id": rid, "created_ms": ts, "clock_ms": ts + 60})
            pending.append(
                await producer.send(topics.state, codec.encode(st), key=key, partition=p, timestamp_ms=ts)
            )
            if len(pending) > 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _timed(session: ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with session.get(url) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    return (time.perf_counter() - t0) * 1000


async def _round(ctx: Ctx, pfx: str, n: int) -> dict[str, float]:
    settings = load_settings(
        kafka={"bootstrap": ctx.bootstrap, "prefix": pfx, "partitions": PARTITIONS}, ui={"port": 0}
    )
    server = UiServer(settings, Access(settings.ui))
    t0 = time.perf_counter()
    url = await server.start()
    try:
        await server.tail.caught_up(wait_s=1800)
        rebuild = time.perf_counter() - t0
        sizes = server.index.sizes()
        if sizes["runs"] != n:
            raise RuntimeError(f"the index holds {sizes['runs']} of {n} runs")
        rng = random.Random(7)
        out: dict[str, float] = {"rebuild s": rebuild, "index bytes per run": sizes["bytes"] / n}
        out["events per run"] = sizes["events"] / n
        async with ClientSession() as s:
            for name, make in {
                "runs list (newest 100)": lambda: f"{url}api/runs",
                "runs list (status filter)": lambda: f"{url}api/runs?status=quarantined",
                "runs list (run ID search)": lambda: f"{url}api/runs?q=r{rng.randrange(n):0{ID_WIDTH - 1}d}",
                "run page": lambda: f"{url}api/runs/r{rng.randrange(n):0{ID_WIDTH - 1}d}",
            }.items():
                await _timed(s, make())  # warm-up
                times = [await _timed(s, make()) for _ in range(QUERIES)]
                out[f"{name} p50 ms"] = pct(times, 50)
                out[f"{name} p95 ms"] = pct(times, 95)
        return out
    finally:
        await server.stop()


async def run(ctx: Ctx) -> dict[str, Any]:
    n = ctx.n(100_000, 300)
    pfx = prefix("ui")
    t0 = time.perf_counter()
    await _write_runs(ctx.bootstrap, pfx, n)
    written_s = time.perf_counter() - t0
    rounds = [await _round(ctx, pfx, n) for _ in range(ctx.rounds)]
    metrics = {k: summary([r[k] for r in rounds]) for k in rounds[0]}
    return {
        "params": {"runs": n, "queries per metric": QUERIES, "write s": round(written_s, 1)},
        "metrics": {
            f"index rebuild s ({n:,} runs)" if k == "rebuild s" else k: v for k, v in metrics.items()
        },
    }
