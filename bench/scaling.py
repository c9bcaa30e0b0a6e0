"""Workloads ``processes`` and ``triage``: one, then two worker processes in one group on this machine.

* ``processes``: the three-step no-op workflow of ``throughput`` (100 runs in flight) served by one
  ``bench.worker`` process, then by two started on one prefix (one consumer group: 2 of the 4 partitions
  each): runs/s, the scaling ratio, and cores busy per worker process, for the broker and the driver.
* ``triage``: the triage example (``examples/triage``: classify, extract and sentiment, decide, then
  refund and notify, escalate or approve; pydantic-ai agents on its scripted ``FunctionModel``s), the
  tickets of ``tickets.jsonl`` in turn, with one and two processes: runs/s, step attempts per run and
  worker CPU per step.

The broker needs CPU too on a 2-core machine: its cores busy are given beside the workers'.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from bench.common import PARTITIONS, ROOT, Ctx, Proc, pct, prefix, summary
from bench.driver import Loop, Workload, closed_loop, worker_args
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics

COUNTS = (1, 2)


def _label(count: int) -> str:
    return f"{count} process" + ("es" if count > 1 else "")


async def start_group(ctx: Ctx, name: str, count: int, **opts: Any) -> tuple[list[Proc], str]:
    """``count`` worker processes on one fresh prefix, returned once they share the partitions steadily."""
    pfx = prefix(name)
    procs: list[Proc] = []
    try:
        for i in range(count):
            procs.append(Proc("bench.worker", worker_args(ctx, pfx, **opts), ctx.out / f".{pfx}-{i}.json"))
        await _settled(procs)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs, pfx


async def _settled(procs: Sequence[Proc], wait_s: float = 120.0, steady_s: float = 1.0) -> None:
    """Each process owns some partitions, together all of them once each, unchanged for ``steady_s``."""
    end = time.monotonic() + wait_s
    since: float | None = None
    while True:
        owned = [set(p.status().get("owned", [])) for p in procs]
        split = all(owned) and sum(map(len, owned)) == PARTITIONS == len(set().union(*owned))
        now = time.monotonic()
        since = (since or now) if split else None
        if since is not None and now - since >= steady_s:
            return
        for p in procs:
            p.check()
        if now > end:
            raise TimeoutError(f"the workers did not share the partitions within {wait_s}s: {owned}")
        await asyncio.sleep(0.05)


ISSUED = {b"step.scheduled", b"step.retry_scheduled", b"step.reissued"}


async def steps_issued(ctx: Ctx, pfx: str, run_ids: Sequence[str]) -> int:
    """Step attempts the decisions of these runs issued (scheduled, retried, re-issued), from the events."""
    wanted = {rid.encode() for rid in run_ids}
    topic = Topics(pfx).events
    consumer = AIOKafkaConsumer(bootstrap_servers=ctx.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return sum(
            [
                1
                async for rec in read_to_end(consumer, tps)
                if rec.key in wanted and dict(rec.headers).get("type") in ISSUED
            ]
        )
    finally:
        await consumer.stop()


def _counted(procs: Sequence[Proc], stat: str) -> int:
    return sum(int(p.status().get("stats", {}).get(stat, 0)) for p in procs)


async def measure_group(
    ctx: Ctx, name: str, count: int, wl: Workload, *, n: int, concurrency: int, warmup: int, **opts: Any
) -> list[tuple[Loop, int, dict[str, int]]]:
    """A warm-up loop, then ``ctx.rounds`` measured loops against ``count`` workers in one group, each
    with the step attempts its runs issued and the workers' transactions and partitions restored."""
    procs, pfx = await start_group(ctx, name, count, **opts)
    try:
        await closed_loop(ctx, pfx, "warm", warmup, min(concurrency, warmup), wl=wl)
        out = []
        for r in range(ctx.rounds):
            pids = [p.pid for p in procs]
            before = {k: _counted(procs, k) for k in ("transactions", "restored_partitions")}
            loop = await closed_loop(ctx, pfx, f"r{r}", n, concurrency, wl=wl, pids=pids)
            await asyncio.sleep(0.2)  # the status files follow within 0.1 s
            counts = {k: _counted(procs, k) - v for k, v in before.items()}
            out.append((loop, await steps_issued(ctx, pfx, loop.run_ids), counts))
        return out
    finally:
        await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
        for p in procs:
            p.kill()


def _group(rounds: list[tuple[Loop, int, dict[str, int]]], label: str) -> dict[str, Any]:
    """Transactions per run and partitions restored while measuring (a rebalance in the middle shows)."""
    return {
        f"transactions per run ({label})": summary([c["transactions"] / lp.n for lp, _, c in rounds]),
        f"partitions restored while measuring ({label})": summary(
            [c["restored_partitions"] for _, _, c in rounds]
        ),
    }


def _cores(loops: list[Loop], label: str) -> dict[str, Any]:
    count = len(loops[0].worker_cpu_each)
    out = {f"cores busy: workers, total ({label})": summary([lp.cores["worker"] for lp in loops])}
    if count > 1:
        for i in range(count):
            out[f"cores busy: worker {i + 1} ({label})"] = summary(
                [lp.worker_cpu_each[i] / lp.elapsed_s for lp in loops]
            )
    if loops[0].broker_cpu_s:
        out[f"cores busy: broker ({label})"] = summary([lp.cores["broker"] for lp in loops])
    out[f"cores busy: driver ({label})"] = summary([lp.cores["driver"] for lp in loops])
    return out


async def processes(ctx: Ctx) -> dict[str, Any]:
    n, warm = ctx.n(5_000, 60), ctx.n(500, 10)
    metrics: dict[str, Any] = {}
    for count in COUNTS:
        label = _label(count)
        rounds = await measure_group(ctx, "procs", count, Workload(), n=n, concurrency=100, warmup=warm)
        loops = [lp for lp, _, _ in rounds]
        metrics[f"runs/s ({label})"] = summary([lp.runs_per_s for lp in loops])
        metrics[f"worker CPU us/run ({label})"] = summary([lp.cpu_us_per_run for lp in loops])
        metrics |= _cores(loops, label)
        metrics[f"client p50 ms ({label})"] = summary([pct(lp.client_ms, 50) for lp in loops])
        metrics |= _group(rounds, label)
    return {
        "params": {"runs": n, "warmup_runs": warm, "runs_in_flight": 100, "processes": list(COUNTS)},
        "metrics": metrics,
    }


TRIAGE = ROOT / "examples" / "triage"


def _tickets() -> list[dict[str, Any]]:
    lines = (TRIAGE / "tickets.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


async def triage(ctx: Ctx) -> dict[str, Any]:
    tickets = _tickets()

    def ticket(i: int) -> dict[str, Any]:
        t = tickets[i % len(tickets)]
        return {**t, "ticket_id": f"{t['ticket_id']}-{i}"}

    steps = ("classify", "extract", "sentiment", "decide", "refund", "notify", "escalate", "approve")
    wl = Workload("triage", steps, ticket)
    n, warm = ctx.n(1_000, 20), ctx.n(100, 5)
    metrics: dict[str, Any] = {}
    for count in COUNTS:
        label = _label(count)
        rounds = await measure_group(ctx, "triage", count, wl, n=n, concurrency=100, warmup=warm, triage=True)
        loops = [lp for lp, _, _ in rounds]
        metrics[f"runs/s ({label})"] = summary([lp.runs_per_s for lp in loops])
        metrics[f"steps/s ({label})"] = summary([k / lp.elapsed_s for lp, k, _ in rounds])
        metrics[f"steps per run ({label})"] = summary([k / lp.n for lp, k, _ in rounds])
        metrics[f"worker CPU ms/step ({label})"] = summary(
            [lp.worker_cpu_s / max(k, 1) * 1e3 for lp, k, _ in rounds]
        )
        metrics[f"worker CPU ms/run ({label})"] = summary([lp.cpu_us_per_run / 1000 for lp in loops])
        metrics |= _cores(loops, label)
        metrics[f"client p50 ms ({label})"] = summary([pct(lp.client_ms, 50) for lp in loops])
        metrics[f"runs quarantined or refused ({label})"] = summary([lp.not_completed for lp in loops])
        metrics |= _group(rounds, label)
    return {
        "params": {"runs": n, "warmup_runs": warm, "runs_in_flight": 100, "processes": list(COUNTS)},
        "metrics": metrics,
    }
