"""The peers' load generator core (runs in the peers' venv): closed loops, CPU of processes, percentiles.

A closed loop keeps ``concurrency`` runs in flight until ``n`` have completed, as calmrun's driver does
(``bench.driver.closed_loop``). Each measured round prints one ``ROUND {json}`` line, the light round
(one run at a time) a ``LIGHT {json}`` line; ``bench.peers.compare`` reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

PAD = "x" * 170
"""The same ~200-byte step output as calmrun's bench worker (``bench.worker.Out``)."""


def step(n: int, label: str) -> dict[str, Any]:
    return {"n": n + 1, "label": label, "pad": PAD}


def parser(description: str) -> argparse.ArgumentParser:
    """The options every peer's load generator takes; it adds its own and parses."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--light", type=int, default=300, help="runs one at a time (0: none)")
    parser.add_argument("--light-warmup", type=int, default=0, help="runs one at a time before those")
    parser.add_argument("--pid", action="append", default=[], help="NAME=PID whose CPU is reported")
    parser.add_argument("--self-name", default="load generator", help="this process's name in the CPU")
    return parser


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class Cpu:
    """CPU seconds of named processes over a stretch of time."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: cpu_s(pid) for name, pid in pids.items()}

    def used(self) -> dict[str, float]:
        return {name: cpu_s(pid) - self.start[name] for name, pid in self.pids.items()}


def pids(a: argparse.Namespace) -> dict[str, int]:
    out = {a.self_name: psutil.Process().pid}
    for item in a.pid:
        name, _, pid = item.partition("=")
        out[name] = int(pid)
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))] if s else 0.0


def report(kind: str, n: int, elapsed: float, lat_s: list[float], cpu: dict[str, float]) -> None:
    line = {
        "runs": n,
        "elapsed_s": elapsed,
        "runs_per_s": n / elapsed,
        "client_p50_ms": pct(lat_s, 50) * 1000,
        "client_p99_ms": pct(lat_s, 99) * 1000,
        "cpu_s": cpu,
        "ended_at": time.time(),
    }
    print(kind, json.dumps(line), flush=True)


async def async_loop(call: Callable[[str], Awaitable[None]], tag: str, n: int, conc: int) -> list[float]:
    """``n`` calls of ``call(run_id)``, ``conc`` at a time; returns each call's latency in seconds."""
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> float:
        async with sem:
            t0 = time.perf_counter()
            await call(f"{tag}-{i:07d}")
            return time.perf_counter() - t0

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def thread_loop(call: Callable[[str], None], tag: str, n: int, conc: int) -> list[float]:
    """The same with ``conc`` threads, for a synchronous engine."""

    def one(i: int) -> float:
        t0 = time.perf_counter()
        call(f"{tag}-{i:07d}")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=conc) as pool:
        return list(pool.map(one, range(n)))


async def measure_async(a: argparse.Namespace, call: Callable[[str], Awaitable[None]]) -> None:
    await async_loop(call, "warm", a.warmup, min(a.concurrency, max(a.warmup, 1)))
    for r in range(a.rounds):
        cpu = Cpu(pids(a))
        t0 = time.perf_counter()
        lat = await async_loop(call, f"r{r}", a.runs, a.concurrency)
        report("ROUND", a.runs, time.perf_counter() - t0, lat, cpu.used())
    if a.light:
        await async_loop(call, "lightwarm", a.light_warmup, 1)
        cpu = Cpu(pids(a))
        t0 = time.perf_counter()
        lat = await async_loop(call, "light", a.light, 1)
        report("LIGHT", a.light, time.perf_counter() - t0, lat, cpu.used())


def measure_threads(a: argparse.Namespace, call: Callable[[str], None]) -> None:
    thread_loop(call, "warm", a.warmup, min(a.concurrency, max(a.warmup, 1)))
    for r in range(a.rounds):
        cpu = Cpu(pids(a))
        t0 = time.perf_counter()
        lat = thread_loop(call, f"r{r}", a.runs, a.concurrency)
        report("ROUND", a.runs, time.perf_counter() - t0, lat, cpu.used())
    if a.light:
        thread_loop(call, "lightwarm", a.light_warmup, 1)
        cpu = Cpu(pids(a))
        t0 = time.perf_counter()
        lat = thread_loop(call, "light", a.light, 1)
        report("LIGHT", a.light, time.perf_counter() - t0, lat, cpu.used())
