"""Shared pieces of the workloads: the run context, statistics, RSS, topics and worker subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
"""Partitions of every benchmark topic: calmrun's default, the same for the floor and the workflow."""

WARMUP = 100_000
"""Runs (100 in flight) each engine takes before its first measured round: calmrun's broker, and each peer's
servers (``bench.peers``). Kafka is a JVM: on a fresh broker its CPU per three-step run fell over twelve
rounds of 5,000 runs in a row from 2,070 to 1,540, 898, 770, 712, then 528-596 from 26,500 runs on and
450-472 from 47,700 (its JIT compiler had spent 34 s of CPU by then: ``docs/benchmarks.md``, *Warm-up*),
and it was still falling there: measured by ``bench.warmth``, 434 µs a run after 40,000 runs and 256 after
115,500 (``docs/benchmarks.md``, *From 40,000 to 100,000*). A round measured before it settles measures a
broker still compiling, not the broker a user runs for months. The same count for every engine."""

LIGHT_WARMUP = 2_000
"""Runs one at a time each engine takes before its runs one at a time are measured. Runs at 100 in flight do
not warm the broker for them (most likely its JIT compiler: its CPU per run fell with the p50): after 10,000
runs at 100 in flight, a fresh broker's first 300 runs one at a time had a p50 of 19.3 ms, and 16.9, 14.1,
13.4, 11.9, 12.2, 11.7, 11.4 and 12.1 ms in the eight rounds of 300 after them (``docs/benchmarks.md``,
*Warm-up one at a time*). The same count for every engine."""


@dataclass
class Ctx:
    """What every workload gets: the broker, the size knobs and where to put artefacts.

    Attributes:
        bootstrap: the broker's address.
        quick: tiny sizes (smoke test, a first look); full sizes otherwise.
        rounds: measured rounds per metric (after one warm-up round).
        skip_confluent: leave confluent-kafka out (it is a bench-only extra, absent in CI).
        profile: write a pyinstrument profile of the worker during the throughput workload.
        out: the results directory.
    """

    bootstrap: str
    quick: bool = False
    rounds: int = 3
    skip_confluent: bool = False
    profile: bool = False
    out: Path = ROOT / "bench" / "results"
    notes: list[str] = field(default_factory=list)
    broker_pid: int = 0  # the broker this run started (0: an external one, whose CPU is not measured)
    broker_warmup: int = 0  # runs through the first worker, unmeasured, before its own warm-up (WARMUP)
    speed: Path | None = None  # bench.speed's samples of the machine's speed during this run

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def prefix(name: str) -> str:
    return f"b{name[:6]}{uuid4().hex[:8]}"


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return float(s[k])


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, and the relative half-range) of one metric over the rounds."""
    vals = [float(v) for v in values]
    med = statistics.median(vals) if vals else 0.0
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
    return {
        "median": med,
        "min": lo,
        "max": hi,
        "spread_pct": (hi - lo) / 2 / med * 100 if med else 0.0,
        "rounds": len(vals),
    }


def rss_kib(pid: int | str = "self") -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, from ``/proc/<pid>/status``."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value, _unit = line.split()
            out[name.rstrip(":")] = int(value)
    return out


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[str, int]:
    """Sum of the end offsets of each topic (all partitions): the records it has received so far."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        totals = dict.fromkeys(topics, 0)
        for tp, off in ends.items():
            totals[tp.topic] += off
        return totals
    finally:
        await consumer.stop()


class Proc:
    """A benchmark helper process (``python -m bench.<module> ...``) reporting through a JSON status file;
    run from ``root`` (this checkout by default, another tree's for ``bench.pairs``)."""

    def __init__(self, module: str, args: Sequence[str], status: Path, root: Path = ROOT) -> None:
        self.module = module
        self.status_path = status
        self.log_path = status.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--status-file", str(status), *args],
            cwd=root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(root)},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_path.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{tail}")

    async def wait_for(self, pred: Any, wait_s: float = 90.0, what: str = "helper") -> dict[str, Any]:
        """Poll the status file until ``pred(status)`` holds (raise if the process died or time ran out)."""
        end = time.monotonic() + wait_s
        while True:
            st = self.status()
            if st and pred(st):
                return st
            self.check()
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {wait_s}s waiting for {what}; last status {st}")
            await asyncio.sleep(0.05)

    async def stop(self, wait_s: float = 60.0) -> dict[str, Any]:
        """SIGTERM, wait for a clean exit, return the last status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.status()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextlib.asynccontextmanager
async def proc(module: str, args: Sequence[str], status: Path) -> AsyncIterator[Proc]:
    p = Proc(module, args, status)
    try:
        yield p
    finally:
        if p.proc.poll() is None:
            with contextlib.suppress(Exception):
                await p.stop()
        p.kill()


def write_status(path: Path | None, data: dict[str, Any]) -> None:
    """Atomically replace the JSON status file ``path`` (helper processes report through it)."""
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def on_a_broker(bootstrap: str | None, main: Callable[[str], Coroutine[Any, Any, None]], name: str) -> None:
    """Run ``main`` on the broker at ``bootstrap``, or, without one, on a broker started for it (data under
    a temporary ``calmrun-<name>-kafka-`` directory) and stopped after: a bench module's ``--bootstrap``."""
    if bootstrap:
        asyncio.run(main(bootstrap))
        return
    from calmrun.devkafka import DevKafka
    from calmrun.localproc import free_port

    kafka = DevKafka(data_dir=Path(tempfile.mkdtemp(prefix=f"calmrun-{name}-kafka-")), port=free_port())
    kafka.start()
    try:
        asyncio.run(main(kafka.bootstrap))
    finally:
        kafka.stop()
