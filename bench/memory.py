"""Workload 7: the worker's resident memory at rest, holding many runs in flight, and after many finished.

In flight: the worker runs with ``max_in_flight`` above the number of runs and agents that sleep, so every
submitted run is decided, its first step task consumed and its agent running at the same time. Finished:
no-op agents, and RSS once every run has completed (a worker keeps each run it has seen; finished ones as
their encoded state). RSS is read from ``/proc/<pid>/status`` (VmRSS now, VmHWM peak) by the worker itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.common import Ctx, summary
from bench.driver import WORKFLOW, start_worker
from calmrun.kafka.topics import Topics
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunRequest


async def submit_requests(bootstrap: str, pfx: str, n: int, tag: str = "mem") -> None:
    """Produce ``n`` run requests of the benchmark workflow at once (open loop) and wait for the acks."""
    codec = RecordCodec(wire_models())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futs = []
        for i in range(n):
            rid = f"{tag}-{i:07d}"
            req = RunRequest(workflow=WORKFLOW, run_id=rid, input={"n": 0})
            futs.append(await producer.send(Topics(pfx).requests, codec.encode(req), key=rid.encode()))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def _once(ctx: Ctx, n: int) -> dict[str, float]:
    worker, pfx = await start_worker(ctx, "mem", max_in_flight=n + 100, sleep=600)
    try:
        await asyncio.sleep(1.0)  # settle after start-up (a measurement pause, not synchronisation)
        rest = worker.status()["rss"]
        await submit_requests(ctx.bootstrap, pfx, n)
        held = await worker.wait_for(lambda s: s["stats"]["running"] >= n, 300, f"{n} runs in flight")
        return {
            "rest_mib": rest["VmRSS"] / 1024,
            "held_mib": held["rss"]["VmRSS"] / 1024,
            "peak_mib": held["rss"]["VmHWM"] / 1024,
            "per_run_kib": (held["rss"]["VmRSS"] - rest["VmRSS"]) / n,
        }
    finally:
        worker.kill()  # agents sleep for minutes: nothing to flush that matters here


async def _finished(ctx: Ctx, n: int) -> dict[str, float]:
    worker, pfx = await start_worker(ctx, "done")
    try:
        await asyncio.sleep(1.0)
        rest = worker.status()["rss"]
        await submit_requests(ctx.bootstrap, pfx, n, tag="done")
        held = await worker.wait_for(lambda s: s["stats"]["completed"] >= n, 600, f"{n} runs to finish")
        return {
            "held_mib": held["rss"]["VmRSS"] / 1024,
            "per_run_kib": (held["rss"]["VmRSS"] - rest["VmRSS"]) / n,
        }
    finally:
        worker.kill()


async def run(ctx: Ctx) -> dict[str, Any]:
    n, nf = ctx.n(10_000, 200), ctx.n(20_000, 200)
    rounds = [await _once(ctx, n) for _ in range(max(1, ctx.rounds - 1))]
    finished = [await _finished(ctx, nf) for _ in range(max(1, ctx.rounds - 1))]
    return {
        "params": {"runs_in_flight": n, "max_in_flight": n + 100, "finished_runs": nf},
        "metrics": {
            "RSS at rest MiB": summary([r["rest_mib"] for r in rounds]),
            f"RSS with {n} runs in flight MiB": summary([r["held_mib"] for r in rounds]),
            "peak RSS MiB": summary([r["peak_mib"] for r in rounds]),
            "KiB per run in flight": summary([r["per_run_kib"] for r in rounds]),
            f"RSS after {nf} runs finished MiB": summary([r["held_mib"] for r in finished]),
            "KiB per finished run": summary([r["per_run_kib"] for r in finished]),
        },
    }
