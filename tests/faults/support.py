"""The fault scenarios' shared shape: two worker processes on the three-node cluster, a batch of runs in
flight, one fault, then every run terminal with its expected end and ``check_history`` passing.

Recovery is measured from the events topic's record timestamps (broker time): for the partitions that
waited on the lost node, the first event after the fault; for the others, their longest gap in the 30 s
after it. Both are printed (``FAULT <name> {...}``) and collected into ``docs/faults.md`` by hand; they
are measured, never asserted (the machine is shared).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.devkafka.cluster import DevCluster
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics
from calmrun.settings import Settings, load_settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import WorkerProcs, linear

PARTITIONS = 4
RUNS = 2_100
IN_FLIGHT = 2_000
"""At least this many runs not yet terminal when the fault strikes (counted from the events topic)."""
NAMES = ("w1", "w2")
TERMINAL = {"run.completed", "run.quarantined", "run.over_budget", "run.refused", "run.cancelled"}


def settings_on(cluster: DevCluster, prefix: str) -> Settings:
    return load_settings(kafka={"bootstrap": cluster.bootstrap, "prefix": prefix, "partitions": PARTITIONS})


def worker_args(sleep: float = 2.0, in_flight: int = 600, *extra: str) -> list[str]:
    """Many agents at once, each a 2 s wait: a run takes at least 6 s, so the batch is still in flight when
    the fault strikes however fast the machine (the point is runs in flight, not runtime)."""
    return ["--sleep", str(sleep), "--max-in-flight", str(in_flight), "--partitions", str(PARTITIONS), *extra]


async def wait_owned(procs: WorkerProcs, names: tuple[str, ...] = NAMES, wait_s: float = 180) -> None:
    """Both workers run and hold the partitions between them."""
    end = time.monotonic() + wait_s
    while True:
        owned = sorted(p for n in names for p in procs.status(n).get("owned", []))
        if owned == list(range(PARTITIONS)) and all(procs.status(n).get("owned") for n in names):
            return
        for n in names:
            procs.alive(n)
        if time.monotonic() > end:
            raise AssertionError(f"workers never split the partitions: {owned}")
        await asyncio.sleep(0.2)


async def wait_progress(procs: WorkerProcs, completed: int, wait_s: float = 180) -> None:
    """Until the workers have completed ``completed`` runs between them (the batch is under way)."""
    end = time.monotonic() + wait_s
    while sum(procs.status(n).get("stats", {}).get("completed", 0) for n in NAMES) < completed:
        for n in NAMES:
            procs.alive(n)
        if time.monotonic() > end:
            raise AssertionError(f"the batch made no progress to {completed} completed runs")
        await asyncio.sleep(0.1)


@dataclass
class Outcome:
    """What a scenario measured."""

    name: str
    runs: int
    in_flight_at_fault: int
    statuses: dict[str, int]
    waited_s: float  # the affected partitions' first event after the fault
    others_longest_gap_s: float
    stall_lines: list[str] = field(default_factory=list)
    client_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def print(self) -> None:
        print(f"FAULT {self.name} {json.dumps(self.__dict__, default=str)}")


async def events_records(settings: Settings) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(Topics(settings.kafka.prefix).events, p) for p in range(PARTITIONS)]
        return [r async for r in read_to_end(consumer, tps)]
    finally:
        await consumer.stop()


def recovery(records: list[Any], at_s: float, affected: set[int]) -> tuple[float, float]:
    """(how long the affected partitions waited for their next event, the others' longest gap)."""
    by_part: dict[int, list[int]] = defaultdict(list)
    for r in records:
        by_part[r.partition].append(r.timestamp)
    at = at_s * 1000
    waited = 0.0
    for p in affected:
        after = sorted(t for t in by_part[p] if t > at)
        waited = max(waited, (after[0] - at) / 1000 if after else float("inf"))
    gap = 0.0
    for p in set(range(PARTITIONS)) - affected:
        ts = [at, *sorted(t for t in by_part[p] if at < t < at + 30_000)]
        gap = max(gap, *[(b - a) / 1000 for a, b in itertools.pairwise(ts)], 0.0)
    return waited, gap


def said_after(procs: WorkerProcs, pattern: str, at_s: float) -> dict[str, float]:
    """Per worker, how long after ``at_s`` (epoch seconds) its log's first line matching ``pattern`` came
    (from the line's own time stamp, ``%(asctime)s``); measured, never asserted."""
    out = {}
    for n in NAMES:
        for line in log_lines(procs, pattern, (n,)):
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
            if stamp:
                when = time.mktime(time.strptime(stamp[1], "%Y-%m-%d %H:%M:%S")) + int(stamp[2]) / 1000
                if when >= at_s:
                    out[n] = round(when - at_s, 1)
                    break
    return out


def log_lines(procs: WorkerProcs, pattern: str, names: tuple[str, ...] = NAMES) -> list[str]:
    found = []
    for n in names:
        path: Path = procs.dir / f"{n}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        found += [line for line in text.splitlines() if re.search(pattern, line)]
    return found


Fault = Callable[[DevCluster, Settings, WorkerProcs], Awaitable[tuple[float, set[int], dict[str, Any]]]]
"""Injects the fault and undoes it; returns (when it struck, the partitions that waited on it, extra)."""


async def scenario(
    name: str,
    cluster: DevCluster,
    procs: WorkerProcs,
    prefix: str,
    fault: Fault,
    *,
    runs: int = RUNS,
    args: list[str] | None = None,
    expect: Callable[[str], str] = lambda run_id: "completed",
    wait_s: float = 420,
    own_args: dict[str, list[str]] | None = None,
    among: bool = False,
) -> Outcome:
    """Two workers, ``runs`` runs of ``lin`` submitted at once, ``fault`` a second later (``among``: while
    they are sent); then every run ends as ``expect`` says, both workers still run (same PIDs), and the
    history checker passes."""
    settings = settings_on(cluster, prefix)
    for n in NAMES:
        procs.start(n, *(args or worker_args()), *(own_args or {}).get(n, []), "--instance-id", n)
    await wait_owned(procs)
    pids = {n: procs.procs[n].pid for n in NAMES}
    made = time.time()  # records and events are stamped from here on
    requests = [RunRequest(workflow="lin", input={"n": i}, run_id=f"{name}-{i}") for i in range(runs)]
    async with Client(settings) as client:
        if among:  # the fault arrives among the batch's requests (poison), not after them: it strikes
            at = made  # as the batch starts, every run of which is then in flight
            ids, (_, affected, extra) = await asyncio.gather(
                client.submit_many(requests), fault(cluster, settings, procs)
            )
        else:
            ids = await client.submit_many(requests)
            await asyncio.sleep(1.0)  # the batch is under way
            at, affected, extra = await fault(cluster, settings, procs)
        states = await client.wait_terminal(ids, wait_s=wait_s)
    for n in NAMES:
        procs.alive(n)
        assert procs.procs[n].pid == pids[n]
    statuses: dict[str, int] = defaultdict(int)
    for rid, s in states.items():
        statuses[s.status] += 1
        assert s.status == expect(rid), (rid, s.status, s.error)
    report = await check_history(settings.kafka, [linear()])
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations[:10])
    async with Client(settings) as client:  # besides ours: refused requests' IDs, each ended run.rejected
        rejected = {rid for rid, s in (await client.read_states()).items() if s.status == "rejected"}
    assert report.runs == runs + len(rejected - set(ids)), (report.runs, runs, sorted(rejected))
    records = await events_records(settings)
    waited, gap = recovery(records, at, affected)
    codec = RecordCodec(wire_models())
    ended_after = {
        e.run_id
        for r in records
        if r.timestamp > at * 1000
        and (e := codec.decode_as(r.value, RunEvent)).type.startswith("run.")
        and e.type in TERMINAL
    }
    if runs >= IN_FLIGHT:
        assert len(ended_after) >= IN_FLIGHT, (
            f"only {len(ended_after)} runs were in flight at the fault ({at}; {len(records)} events, "
            f"the last at {max((r.timestamp for r in records), default=None)} ms)"
        )
    extra["affected"] = sorted(affected)
    extra["stall_line_after_s"] = said_after(procs, r"calmrun\.brokers .* wait on it", at)
    extra["events_after_fault"] = {
        p: sum(1 for r in records if r.partition == p and r.timestamp > at * 1000) for p in range(PARTITIONS)
    }
    outcome = Outcome(
        name,
        runs,
        len(ended_after),
        dict(statuses),
        round(waited, 1),
        round(gap, 1),
        log_lines(procs, r"calmrun\.brokers"),
        len(log_lines(procs, r"Unable connect to node")),
        extra,
    )
    outcome.print()
    return outcome


async def led_by(cluster: DevCluster, topics: list[str], node: int) -> set[int]:
    """The partitions numbers of ``topics`` whose leader is ``node``."""
    return {p for t, p in (await cluster.leaders(topics)).get(node, [])}


async def kill_and_restart(cluster: DevCluster, node: int, down_s: float = 10.0) -> float:
    """kill -9 ``node``, restart it ``down_s`` later; returns when it was killed (epoch seconds)."""
    await asyncio.to_thread(cluster.kill9, node)
    at = time.time()
    await asyncio.sleep(down_s)
    await asyncio.to_thread(cluster.restart, node)
    return at
