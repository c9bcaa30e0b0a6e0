"""How far a fresh broker is from settled after a warm-up: ``python -m bench.warmth --bootstrap B --broker-pid
PID [--stages 40000,60000] [--runs 5000] [--rounds 3]``.

Start it on a fresh broker (``python -m calmrun.devkafka start --fresh``). For each stage, one worker decides
that many runs (100 in flight, unmeasured but timed), then a new worker is measured over ``--rounds`` loops of
``--runs`` runs at 100 in flight after 500 of its own: runs/s, the worker's and the broker's CPU µs per run.
The stages add up, so the defaults measure after 40,000 runs (``bench.common.WARMUP`` until 2026-12-07) and
after 115,500 (past the 100,000 since). Kafka is a JVM: its CPU per run keeps falling while its JIT compiler
works, and a loop measured before it settles measures a broker that a user running it for months never sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from bench import driver
from bench.common import Ctx, loadavg


async def _bulk(ctx: Ctx, n: int) -> dict[str, float]:
    proc, pfx = await driver.start_worker(ctx, "warmth-bulk", status_every=1.0)
    try:
        lp = await driver.closed_loop(ctx, pfx, "bulk", n, 100, proc.pid)
        await proc.stop()
    finally:
        proc.kill()
    return {"runs/s": round(lp.runs_per_s), "broker us/run": round(lp.broker_cpu_s * 1e6 / n)}


async def run(args: argparse.Namespace) -> None:
    ctx = Ctx(bootstrap=args.bootstrap, rounds=args.rounds, out=Path(args.out), broker_pid=args.broker_pid)
    ctx.out.mkdir(parents=True, exist_ok=True)
    seen = 0  # runs the broker has taken so far
    for stage in (int(s) for s in args.stages.split(",")):
        bulk = await _bulk(ctx, stage)
        seen += stage
        measured, _ = await driver.measure(
            ctx, "warmth", n=args.runs, concurrency=100, warmup=500, with_timings=False
        )
        loops = [
            {
                "runs/s": round(lp.runs_per_s),
                "worker us/run": round(lp.cpu_us_per_run),
                "broker us/run": round(lp.broker_cpu_s * 1e6 / lp.n),
            }
            for lp in measured
        ]
        med = {k: statistics.median(lp[k] for lp in loops) for k in loops[0]}
        line = {"after runs": seen, "warm-up": bulk, "rounds": loops, "median": med, "load": loadavg()}
        print(json.dumps(line), flush=True)
        seen += 500 + args.runs * args.rounds


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.warmth")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--broker-pid", type=int, required=True, help="the broker's pid: its CPU is counted")
    p.add_argument("--stages", default="40000,60000", help="runs decided before each measurement")
    p.add_argument("--runs", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="/tmp/calmrun-bench-warmth")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
