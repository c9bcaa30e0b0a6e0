"""Workloads 2-4: the three-step no-op workflow through a worker process.

* ``throughput``: N runs with 100 in flight (closed loop): runs/s, step hops/s, Kafka records moved/s.
* ``latency``: request -> completion and per hop, from event timestamps, one run at a time and saturated.
"""

from __future__ import annotations

from typing import Any

from bench.common import LIGHT_WARMUP, Ctx, summary
from bench.driver import Loop, measure
from bench.speed import UNIT_METRIC, medians


def _speed(ctx: Ctx, loops: list[Loop], label: str = "") -> dict[str, Any]:
    """The machine's speed during the loops (``bench.speed``), if it was sampled."""
    got = medians(ctx.speed, [(lp.ended_at - lp.elapsed_s, lp.ended_at) for lp in loops])
    return {f"{UNIT_METRIC}{label}": summary(got)} if got else {}


def _loop_metrics(loops: list[Loop], prefix: str = "") -> dict[str, Any]:
    out = {
        f"{prefix}runs/s": summary([lp.runs_per_s for lp in loops]),
        f"{prefix}step hops/s": summary([lp.hops_per_s for lp in loops]),
        f"{prefix}records moved/s": summary([lp.moved_per_s for lp in loops]),
        f"{prefix}worker CPU us/run": summary([lp.cpu_us_per_run for lp in loops]),
        f"{prefix}cores busy: worker": summary([lp.cores["worker"] for lp in loops]),
    }
    if loops and loops[0].broker_cpu_s:
        out[f"{prefix}cores busy: broker"] = summary([lp.cores["broker"] for lp in loops])
    out[f"{prefix}cores busy: driver (client)"] = summary([lp.cores["driver"] for lp in loops])
    if loops and loops[0].timings:
        for k in ("client p50 ms", "client p99 ms", "run p50 ms", "run p99 ms", "hop p50 ms", "hop p99 ms"):
            out[f"{prefix}{k}"] = summary([lp.timings[k] for lp in loops])
    return out


async def throughput(ctx: Ctx) -> dict[str, Any]:
    n, warm = ctx.n(5_000, 60), ctx.n(500, 10)
    loops, status = await measure(ctx, "thru", n=n, concurrency=100, warmup=warm, max_in_flight=100)
    metrics = _loop_metrics(loops) | _speed(ctx, loops)
    per_run = [(lp.consumed + lp.produced) / lp.n for lp in loops]
    metrics["records moved per run"] = summary(per_run)
    variants: dict[str, Any] = {}
    for mif, conc in [] if ctx.quick else [(10, 100), (400, 400)]:
        vl, _ = await measure(ctx, f"mif{mif}", n=n, concurrency=conc, warmup=warm, max_in_flight=mif)
        variants[f"max_in_flight={mif}, {conc} runs in flight"] = _loop_metrics(vl)
    for label, m in variants.items():
        for k in ("runs/s", "run p50 ms"):
            metrics[f"{k} ({label})"] = m[k]
    if ctx.profile:
        prof = ctx.out / "profile_worker.txt"
        await measure(
            ctx,
            "prof",
            n=n,
            concurrency=100,
            warmup=warm,
            max_in_flight=100,
            with_timings=False,
            profile=prof,
        )
        ctx.notes.append(f"pyinstrument profile of the worker (throughput loop): {prof.name}")
    return {
        "params": {"runs": n, "warmup_runs": warm, "runs_in_flight": 100, "max_in_flight": 100, "steps": 3},
        "metrics": metrics,
        "worker_stats": status.get("stats", {}),
    }


async def latency(ctx: Ctx) -> dict[str, Any]:
    n1, nsat = ctx.n(300, 10), ctx.n(3_000, 60)
    light, _ = await measure(
        ctx, "lat1", n=n1, concurrency=1, warmup=ctx.n(LIGHT_WARMUP, 3), max_in_flight=100
    )
    sat, _ = await measure(ctx, "latsat", n=nsat, concurrency=100, warmup=ctx.n(300, 10), max_in_flight=100)
    metrics: dict[str, Any] = {}
    for label, loops in (("light (1 in flight)", light), ("saturated (100 in flight)", sat)):
        for k in ("client p50 ms", "client p99 ms", "run p50 ms", "run p99 ms", "hop p50 ms", "hop p99 ms"):
            metrics[f"{k}, {label}"] = summary([lp.timings[k] for lp in loops])
        metrics[f"runs/s, {label}"] = summary([lp.runs_per_s for lp in loops])
        metrics |= _speed(ctx, loops, f", {label}")
    return {"params": {"light_runs": n1, "saturated_runs": nsat, "max_in_flight": 100}, "metrics": metrics}
