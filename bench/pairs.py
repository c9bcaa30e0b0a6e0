"""Two source trees compared in pairs of short loops, for a machine whose speed swings within minutes:
``python -m bench.pairs --bootstrap B [--broker-pid PID] [--pairs 24] [--runs 1500] [--warmup 3000] A B``.

``bench.ab`` starts a new worker for each tree and loop, so a round's two loops are 20-40 s apart; on this
machine the speed of a core (``bench.speed``'s unit) moved 1.8x between two such loops, more than most changes
are worth. Here one ``bench.worker`` of each tree is started once (each from its tree, as ``bench.ab`` runs
them), both on one broker with their own prefixes, warmed, and then driven in turn: ``--pairs`` pairs of
``--runs``-run loops at 100 in flight, the order flipped every pair, so that the two loops of a pair are a
few seconds apart. Prints one JSON line per pair (runs/s and worker µs per run for each tree), then the
medians, the median of the pairs' runs/s ratios (B over A) and in how many pairs B was ahead. A tree is a
checkout (``git worktree add`` or ``git archive``) whose ``bench.worker`` takes ``--max-in-flight``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
from pathlib import Path
from typing import Any

from bench import driver
from bench.common import Ctx, Proc, loadavg


def summary(names: list[str], pairs: list[dict[str, tuple[float, float]]]) -> dict[str, Any]:
    """Medians per tree, and the pairs' runs/s ratios of the second tree over the first."""
    a, b = names
    ratios = [p[b][0] / p[a][0] for p in pairs]
    return {
        "pairs": len(pairs),
        "median runs/s": {n: round(statistics.median(p[n][0] for p in pairs), 1) for n in names},
        "median worker us/run": {n: round(statistics.median(p[n][1] for p in pairs)) for n in names},
        f"median ratio of runs/s, {b} / {a}": round(statistics.median(ratios), 3),
        f"pairs where {b} was ahead": sum(r > 1 for r in ratios),
    }


async def run(args: argparse.Namespace, roots: list[Path]) -> dict[str, Any]:
    """Start one worker per tree at ``roots``, warm both, drive the pairs; returns ``summary``'s."""
    ctx = Ctx(bootstrap=args.bootstrap, out=Path(args.out), broker_pid=args.broker_pid)
    names = [r.name for r in roots]
    workers: list[tuple[str, Proc, str]] = []
    try:
        for name, root in zip(names, roots, strict=True):
            safe = re.sub(r"[^A-Za-z0-9]", "", name) or "tree"  # its topics' prefix (Kafka's characters)
            w, pfx = await driver.start_worker(ctx, safe, root=root, status_every=1.0, max_in_flight=100)
            workers.append((name, w, pfx))
            await driver.closed_loop(ctx, pfx, "warm", args.warmup, 100)
        pairs: list[dict[str, tuple[float, float]]] = []
        for i in range(args.pairs):
            row: dict[str, tuple[float, float]] = {}
            for name, w, pfx in workers if i % 2 == 0 else workers[::-1]:
                lp = await driver.closed_loop(ctx, pfx, f"p{i}", args.runs, 100, w.pid)
                row[name] = (lp.runs_per_s, lp.cpu_us_per_run)
            pairs.append(row)
            line = {n: {"runs/s": round(v[0], 1), "worker us/run": round(v[1])} for n, v in row.items()}
            print(json.dumps({"pair": i} | line | {"load": loadavg()[0]}), flush=True)
        return summary(names, pairs)
    finally:
        for _, w, _ in workers:
            await w.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pairs")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--broker-pid", type=int, default=0, help="the broker's pid: its CPU is counted")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--runs", type=int, default=1500, help="runs per loop, 100 in flight")
    p.add_argument("--warmup", type=int, default=3000, help="runs through each worker before the pairs")
    p.add_argument("--out", default="/tmp/calmrun-bench-pairs")
    p.add_argument("trees", nargs=2)
    args = p.parse_args()
    roots = [Path(t).resolve() for t in args.trees]
    if roots[0].name == roots[1].name:
        p.error("give two trees with different directory names (they name the workers and the output)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(json.dumps(asyncio.run(run(args, roots))), flush=True)


if __name__ == "__main__":
    main()
