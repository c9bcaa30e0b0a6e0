"""Step pools: what a pooled step's extra hop costs, and a slow step scaled by its pool alone.

* ``hop``: one run at a time, ``s2`` of the no-op workflow eager in the deciding worker (the default) vs
  in a pool (task record -> executor -> results topic -> decider): the hop ``s1 result -> s2 result``
  from the recorded event times (a pooled result's time is when its executor wrote it, so this hop leaves
  out the result's own commit and read), and the whole run as the client sees it, p50 and p99.
* ``slow``: ``s2`` sleeps 200 ms in a pool whose executors run 50 at once each; completed runs/s with 200
  runs in flight and one executor, then two; the fast steps (``s1``, ``s3``, in the deciding worker)
  keep their hop times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from bench.common import PARTITIONS, Ctx, Proc, cpu_s, pct, summary
from bench.driver import closed_loop, start_worker, worker_args
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent

STEPS = ("s1", "s2", "s3")


async def step_hops(ctx: Ctx, pfx: str, run_ids: Sequence[str]) -> dict[str, list[float]]:
    """Per step: the previous step's result (or the request) -> this step's result, in ms."""
    codec = RecordCodec(wire_models())
    wanted = set(run_ids)
    at: dict[str, dict[str, int]] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=ctx.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(Topics(pfx).events, p) for p in range(PARTITIONS)]
        async for rec in read_to_end(consumer, tps):
            kind = dict(rec.headers).get("type")
            if kind not in (b"run.requested", b"step.succeeded") or rec.value is None:
                continue
            if (rec.key or b"").decode() not in wanted:
                continue
            ev = codec.decode_as(rec.value, RunEvent)
            if ev.seq > 0:
                at.setdefault(ev.run_id, {}).setdefault(ev.step or ev.type, ev.at_ms)
    finally:
        await consumer.stop()
    hops: dict[str, list[float]] = {s: [] for s in STEPS}
    for t in at.values():
        prev = t.get("run.requested")
        for s in STEPS:
            if s in t and prev is not None:
                hops[s].append(t[s] - prev)
            prev = t.get(s)
    return hops


async def start_executor(ctx: Ctx, pfx: str, name: str, **opts: Any) -> Proc:
    args = worker_args(ctx, pfx, pool="slow", pooled="s2=slow", **opts)
    ex = Proc("bench.worker", args, ctx.out / f".{pfx}.{name}.json")
    try:
        await ex.wait_for(lambda s: bool(s.get("owned")), 120, f"executor {name} to own partitions")
    except BaseException:
        ex.kill()
        raise
    return ex


async def hop(ctx: Ctx) -> dict[str, Any]:
    n = ctx.n(300, 10)
    metrics: dict[str, Any] = {}
    for label, pooled in (("eager (default pool)", False), ("pooled", True)):
        worker, pfx = await start_worker(ctx, "hop", **({"pooled": "s2=slow"} if pooled else {}))
        executors = [await start_executor(ctx, pfx, "e1")] if pooled else []
        try:
            await closed_loop(ctx, pfx, "warm", ctx.n(30, 3), 1)
            p50, p99, c50, c99 = [], [], [], []
            for r in range(ctx.rounds):
                loop = await closed_loop(ctx, pfx, f"r{r}", n, 1, worker.pid)
                s2 = (await step_hops(ctx, pfx, loop.run_ids))["s2"]
                p50.append(pct(s2, 50))
                p99.append(pct(s2, 99))
                c50.append(pct(loop.client_ms, 50))
                c99.append(pct(loop.client_ms, 99))
            metrics[f"s2 hop p50 ms, {label}"] = summary(p50)
            metrics[f"s2 hop p99 ms, {label}"] = summary(p99)
            metrics[f"run client p50 ms, {label}"] = summary(c50)
            metrics[f"run client p99 ms, {label}"] = summary(c99)
        finally:
            for ex in executors:
                await ex.stop()
            await worker.stop()
    return {"params": {"runs": n, "in_flight": 1}, "metrics": metrics}


async def slow(ctx: Ctx) -> dict[str, Any]:
    n, conc = ctx.n(3_000, 100), 200
    metrics: dict[str, Any] = {}
    worker, pfx = await start_worker(ctx, "slow", pooled="s2=slow", max_in_flight=100)
    executors: list[Proc] = []
    try:
        for count in (1, 2):
            executors.append(await start_executor(ctx, pfx, f"e{count}", sleep=0.2, max_in_flight=50))
            if count == 2:  # both own partitions before the measured loops
                for ex in executors:
                    await ex.wait_for(lambda s: len(s.get("owned", [])) == PARTITIONS // 2, 120, "a split")
            await closed_loop(ctx, pfx, f"warm{count}", ctx.n(300, 20), conc)
            rates, fast, ex_cores = [], [], []
            for r in range(ctx.rounds):
                ex0 = [cpu_s(ex.pid) for ex in executors]
                loop = await closed_loop(ctx, pfx, f"x{count}r{r}", n, conc, worker.pid)
                ex_cores.append(sum(cpu_s(ex.pid) - c for ex, c in zip(executors, ex0, strict=True)))
                ex_cores[-1] /= loop.elapsed_s
                rates.append(loop.runs_per_s)
                hops = await step_hops(ctx, pfx, loop.run_ids)
                fast.append(pct(hops["s3"], 50))
            label = f"{count} executor{'s' if count > 1 else ''}"
            metrics[f"runs/s, {label}"] = summary(rates)
            metrics[f"s3 (fast step) hop p50 ms, {label}"] = summary(fast)
            metrics[f"cores busy: executors, {label}"] = summary(ex_cores)
        one = metrics["runs/s, 1 executor"]["median"]
        two = metrics["runs/s, 2 executors"]["median"]
        metrics["scaling (2 executors / 1)"] = summary([two / one])
    finally:
        for ex in executors:
            await ex.stop()
        await worker.stop()
    params = {"runs": n, "in_flight": conc, "slow_step_s": 0.2, "executor_max_in_flight": 50}
    return {"params": params, "metrics": metrics}
