"""Two (or more) source trees measured alternately on one broker, for a busy machine:
``python -m bench.ab --bootstrap B [--broker-pid PID] [--rounds 3] [--runs 1500] [--light 100] TREE...``.

Each round runs, for each tree in turn, the throughput loop (``--runs`` runs, 100 in flight, one worker
process of that tree's ``bench.worker``) and the one-at-a-time loop (``--light`` runs), and prints one JSON
line: runs/s, worker and broker CPU per run, records moved per run, the worker's decisions per transaction
its writers committed (``decisions per commit``, over its life), the client's p50/p90/p99 one at a time,
the machine's speed during the throughput loop (``bench.speed``: this machine's cores run the same work up to
1.9x slower at times, so a pair's difference may be the machine's; the worker's CPU per run over the unit's
µs, x1000, is printed beside it as a coarse correction), and the commit cycles on a run's path (the
transactions its events were committed in, one at a time: a commit marker takes an offset, so each gap in a
run's event offsets is one more transaction). Alternating in the same minutes is the only fair comparison when
other processes compete for the cores; the load average is printed beside each line. A tree is a checkout
(``git worktree add`` or ``git archive``).

Every tree's client reads the events ``read_committed`` (a run is over when its end is committed), the
older trees' ``bench.driver`` too, whose client read them uncommitted before: the same client for all.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from bench import driver
from bench.common import PARTITIONS, Ctx, loadavg, pct
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics


async def commits_per_run(bootstrap: str, pfx: str, run_ids: list[str]) -> list[int]:
    """Per run: the transactions its events were committed in (runs one at a time only)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    offsets: dict[bytes, list[int]] = {}
    try:
        tps = [TopicPartition(Topics(pfx).events, p) for p in range(PARTITIONS)]
        async for rec in read_to_end(consumer, tps):
            offsets.setdefault(rec.key or b"", []).append(rec.offset)
    finally:
        await consumer.stop()
    out = []
    for rid in run_ids:
        o = offsets.get(rid.encode(), [])
        if o:
            out.append(1 + sum(1 for a, b in itertools.pairwise(o) if b != a + 1))
    return out


def _per_commit(stats: dict[str, Any]) -> float | None:
    """The worker's decisions per transaction its writers committed, over its life (warm-up included;
    None for a tree whose worker does not count its commits)."""
    commits = stats.get("commits")
    return round(stats.get("decisions", 0) / commits, 1) if commits else None


def _unit(speed: str | None, lp: driver.Loop) -> float | None:
    """The machine's speed (``bench.speed``'s unit, µs) during the loop, where the tree's bench can say."""
    try:  # an older tree's bench has no bench.speed, nor a loop's end time
        from bench.speed import during
    except ImportError:
        return None
    ended = getattr(lp, "ended_at", 0.0)
    return during(Path(speed), ended - lp.elapsed_s, ended) if speed and ended else None


async def one(args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Both loops for the tree this process runs in (its bench.worker is started from the cwd)."""
    ctx = Ctx(bootstrap=args.bootstrap, rounds=1, out=Path(args.out), broker_pid=args.broker_pid)
    # the same client for every tree: an older driver read the terminal events uncommitted
    driver.AIOKafkaConsumer = functools.partial(  # type: ignore[misc]
        AIOKafkaConsumer, isolation_level="read_committed"
    )
    res: dict[str, Any] = {"tree": label, "load": loadavg()}
    if args.runs:
        loops, st = await driver.measure(
            ctx, "thru", n=args.runs, concurrency=100, warmup=300, max_in_flight=100, with_timings=False
        )
        lp = loops[0]
        unit = _unit(args.speed, lp)
        res |= {
            "runs/s": round(lp.runs_per_s, 1),
            "worker us/run": round(lp.cpu_us_per_run),
            "broker us/run": round(lp.broker_cpu_s / lp.n * 1e6),
            "records moved/run": round((lp.consumed + lp.produced) / lp.n, 1),
            "transactions": st.get("stats", {}).get("transactions"),
            "decisions per commit": _per_commit(st.get("stats", {})),
            "machine unit us": round(unit) if unit else None,
            "worker us/run per unit": round(lp.cpu_us_per_run / unit * 1000) if unit else None,
        }
    if args.light:
        commits: list[int] = []
        loop = driver.closed_loop

        async def counted(ctx: Ctx, pfx: str, tag: str, *a: Any, **k: Any) -> driver.Loop:
            lp = await loop(ctx, pfx, tag, *a, **k)
            if tag.startswith("r"):  # a measured round, not the warm-up
                commits.extend(await commits_per_run(ctx.bootstrap, pfx, lp.run_ids))
            return lp

        driver.closed_loop = counted  # type: ignore[assignment]
        loops, _ = await driver.measure(
            ctx, "lat1", n=args.light, concurrency=1, warmup=20, max_in_flight=100, with_timings=False
        )
        c = loops[0].client_ms
        res |= {
            "light broker us/run": round(loops[0].broker_cpu_s / loops[0].n * 1e6),
            "light p50 ms": round(pct(c, 50), 1),
            "light p90 ms": round(pct(c, 90), 1),
            "light p99 ms": round(pct(c, 99), 1),
            "commits on a run's path": round(statistics.mean(commits), 2) if commits else None,
        }
    return res


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ab")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--broker-pid", type=int, default=0, help="the broker's pid: its CPU is counted")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=1500, help="throughput loop (0: skip)")
    p.add_argument("--light", type=int, default=100, help="one-at-a-time loop (0: skip)")
    p.add_argument("--out", default="/tmp/calmrun-bench-ab")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure the tree of the cwd, as this label
    p.add_argument("--speed", help=argparse.SUPPRESS)  # internal: the samples of bench.speed (parent's)
    p.add_argument("trees", nargs="*")
    args = p.parse_args()
    if args.one:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(json.dumps(asyncio.run(one(args, args.one))), flush=True)
        return
    from bench.speed import Sampler  # this (the newest) tree's, for the parent only

    speed = Path(args.out).resolve() / "speed.txt"  # the machine's speed through every round
    speed.parent.mkdir(parents=True, exist_ok=True)
    speed.write_text("")
    with Sampler(speed):
        for _ in range(args.rounds):
            for tree in args.trees:
                root = Path(tree).resolve()
                # this file, run against the tree's own calmrun and bench (the tree need not have bench.ab)
                opts = [a for a in sys.argv[1:] if a not in args.trees]
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", root.name, *opts]
                cmd += ["--speed", str(speed)]
                env = {**os.environ, "PYTHONPATH": str(root)}
                subprocess.run(cmd, cwd=root, env=env, check=True)


if __name__ == "__main__":
    main()
