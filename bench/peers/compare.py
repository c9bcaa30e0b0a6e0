"""Workload ``peers``: Restate and DBOS on calmrun's three-step no-op workflow, in the same bench run.

The same sizes as ``throughput`` (N runs, 100 in flight, after a warm-up, ``ctx.rounds`` rounds) and as
``latency``'s light load (runs one at a time). Each engine gets its servers fresh on loopback
(``bench.peers.servers``) and a load generator in the peers' venv (``bench.peers.loadgen``); CPU is read
per process (the server, the SDK service, PostgreSQL with its backends, the load generator).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from bench.common import LIGHT_WARMUP, ROOT, WARMUP, Ctx, summary
from bench.peers import install, servers
from bench.speed import UNIT_METRIC, medians


async def _load(ctx: Ctx, peers: install.Peers, module: str, pids: dict[str, int], *opts: str) -> list[Any]:
    """Run one load generator; returns its ROUND and LIGHT lines, parsed."""
    n, warm = ctx.n(5_000, 60), ctx.n(WARMUP, 10)
    cmd = [str(peers.python), "-m", module, "--runs", str(n), "--warmup", str(warm)]
    cmd += ["--concurrency", "100", "--rounds", str(ctx.rounds), "--light", str(ctx.n(300, 10))]
    cmd += ["--light-warmup", str(ctx.n(LIGHT_WARMUP, 3)), *opts]
    cmd += [a for name, pid in pids.items() for a in ("--pid", f"{name}={pid}")]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}")
    lines = [ln.split(" ", 1) for ln in out.decode().splitlines() if ln.startswith(("ROUND ", "LIGHT "))]
    return [(kind, json.loads(body)) for kind, body in lines]


def _speed(ctx: Ctx, engine: str, lines: list[dict[str, Any]], label: str = "") -> dict[str, Any]:
    """The machine's speed during the engine's loops (``bench.speed``), if it was sampled."""
    got = medians(ctx.speed, [(r["ended_at"] - r["elapsed_s"], r["ended_at"]) for r in lines])
    return {f"{engine} {UNIT_METRIC}{label}": summary(got)} if got else {}


def _metrics(ctx: Ctx, engine: str, lines: list[Any]) -> dict[str, Any]:
    rounds = [body for kind, body in lines if kind == "ROUND"]
    light = [body for kind, body in lines if kind == "LIGHT"]
    out: dict[str, Any] = {
        f"{engine} runs/s": summary([r["runs_per_s"] for r in rounds]),
        f"{engine} client p50 ms": summary([r["client_p50_ms"] for r in rounds]),
        f"{engine} client p99 ms": summary([r["client_p99_ms"] for r in rounds]),
        f"{engine} CPU ms/run, all its processes": summary(
            [sum(r["cpu_s"].values()) / r["runs"] * 1000 for r in rounds]
        ),
    }
    for name in rounds[0]["cpu_s"] if rounds else ():
        out[f"{engine} cores busy: {name}"] = summary([r["cpu_s"][name] / r["elapsed_s"] for r in rounds])
    out |= _speed(ctx, engine, rounds)
    if light:
        out[f"{engine} client p50 ms, light (1 in flight)"] = summary([r["client_p50_ms"] for r in light])
        out[f"{engine} client p99 ms, light (1 in flight)"] = summary([r["client_p99_ms"] for r in light])
        out |= _speed(ctx, engine, light, ", light (1 in flight)")
    return out


async def run(ctx: Ctx) -> dict[str, Any]:
    peers = await asyncio.to_thread(install.ensure)
    metrics: dict[str, Any] = {}
    async with servers.restate(peers, ctx.out) as rs:
        lines = await _load(ctx, peers, "bench.peers.restate_load", rs.pids, "--ingress", rs.ingress)
    metrics |= _metrics(ctx, "Restate", lines)
    async with servers.postgres(peers, ctx.out) as pg:
        lines = await _load(ctx, peers, "bench.peers.dbos_load", pg.pids, "--database", pg.url)
    metrics |= _metrics(ctx, "DBOS", lines)
    return {
        "params": {
            "runs": ctx.n(5_000, 60),
            "warmup_runs": ctx.n(WARMUP, 10),
            "runs_in_flight": 100,
            "light_runs": ctx.n(300, 10),
            "light_warmup_runs": ctx.n(LIGHT_WARMUP, 3),
            "steps": 3,
            "versions": peers.versions,
        },
        "metrics": metrics,
        "notes": [
            "peers: " + ", ".join(f"{k} {v}" for k, v in peers.versions.items()) + "; Restate on its "
            "single-node defaults, DBOS on a fresh PostgreSQL cluster with default durability (fsync, "
            "synchronous_commit on), calmrun on the bench's single broker (Kafka's default: no fsync "
            "per write)"
        ],
    }
