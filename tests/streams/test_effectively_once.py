"""Effectively once under faults: two workers, kill -9 five times, a paused zombie; one history per run.

The agents of the ``fork`` workflow return a random nonce and the run branches on it, so a step executed
twice would show as two different results, and a run re-decided from a stale state would fork. Every agent
start is logged by the worker processes (``--start-log``). Each test ends with the history checker and
with the start log checked against the history:

- every start is an attempt the history scheduled, under that attempt's idempotency key;
- an attempt is started again only while its result is not recorded yet (a crash before the commit).

Recovery times (how long the killed worker's partitions wait, how long the survivor's stall) are printed
from the record timestamps of the events topic; they are measured here, not asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.kafka.reader import read_to_end
from calmrun.kafka.topics import Topics
from calmrun.settings import Settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import WorkerProcs, branchy, settings_for

PARTITIONS = 4
RUNS = 2_000


def starts(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def raw_events(broker: str, prefix: str) -> tuple[list[RunEvent], list[Any]]:
    """The events topic decoded, with each event's record (partition, offset, timestamp) beside it."""
    codec = RecordCodec(wire_models())
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(Topics(prefix).events, p) for p in range(PARTITIONS)]
        records = [r async for r in read_to_end(consumer, tps)]
    finally:
        await consumer.stop()
    return [codec.decode_as(r.value, RunEvent) for r in records], records


async def checked_history(
    broker: str,
    prefix: str,
    settings: Settings,
    wf: WorkflowDef,
    runs: int | None = None,
    *,
    replayed: bool = True,
    note: str = "",
) -> tuple[list[RunEvent], list[Any]]:
    """The checker passed on the history of ``wf`` (``runs`` runs when given, each replayed unless
    ``replayed`` is False); returns the events with their records (``raw_events``). Prints the summary."""
    report = await check_history(settings.kafka, [wf])
    print(report.summary(), note)
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations[:10])
    if runs is not None:
        assert report.runs == runs and (report.replayed == runs or not replayed), report.summary()
    return await raw_events(broker, prefix)


def check_starts(log: Path, events: list[RunEvent], records: list[Any]) -> dict[str, int]:
    """Every agent start against the history; returns counts (starts, repeated starts of one attempt)."""
    scheduled: set[tuple[str, str, str, int]] = set()
    recorded_ms: dict[tuple[str, str, str, int], int] = {}
    for e, rec in zip(events, records, strict=True):
        if e.seq < 0 or e.step is None or e.attempt is None:
            continue
        kind = str(e.data.get("kind", "run"))
        key = (e.run_id, e.step, kind, e.attempt)
        if e.type == "step.scheduled" or e.type == "step.reissued":
            scheduled.add(key)
        elif e.type == "step.compensation_scheduled":
            scheduled.add((e.run_id, e.step, "compensate", e.attempt))
        elif e.type in ("step.succeeded", "step.failed"):
            recorded_ms.setdefault(key, rec.timestamp)
    seen: dict[tuple[str, str, str, int], int] = defaultdict(int)
    late = []
    for s in starts(log):
        key = (s["run_id"], s["step"], s["kind"], s["attempt"])
        assert key in scheduled, f"an agent ran an attempt the history never scheduled: {s}"
        assert s["key"] == "/".join([s["run_id"], s["step"], s["kind"], str(s["attempt"])]), s
        seen[key] += 1
        done = recorded_ms.get(key)
        if done is not None and s["t_ms"] > done + 2_000:
            late.append((s, done))
    if late:
        s, _ = late[0]
        mine = [
            (e.seq, e.type, e.step, e.attempt, rec.timestamp, rec.partition, rec.offset)
            for e, rec in zip(events, records, strict=True)
            if e.run_id == s["run_id"]
        ]
        them = [x for x in starts(log) if x["run_id"] == s["run_id"]]
        raise AssertionError(
            f"{len(late)} attempts started again after their result was recorded: {late[:3]}\n"
            f"history of {s['run_id']}: {mine}\nstarts: {them}"
        )
    return {
        "starts": sum(seen.values()),
        "attempts": len(seen),
        "repeated": sum(n - 1 for n in seen.values()),
    }


def recovery(records: list[Any], kills: list[tuple[float, list[int]]]) -> list[dict[str, float]]:
    """Per kill: how long the victim's partitions had no committed event, and the survivor's longest gap."""
    by_part: dict[int, list[int]] = defaultdict(list)
    for r in records:
        by_part[r.partition].append(r.timestamp)
    for ts in by_part.values():
        ts.sort()
    out = []
    for at_s, victim_parts in kills:
        at = at_s * 1000
        moved = []
        for p in victim_parts:
            after = [t for t in by_part[p] if t > at]
            moved.append((after[0] - at) / 1000 if after else float("inf"))
        stall = 0.0
        for p in set(range(PARTITIONS)) - set(victim_parts):
            ts = [at, *[t for t in by_part[p] if at < t < at + 20_000]]
            stall = max(stall, *[(b - a) / 1000 for a, b in itertools.pairwise(ts)], 0.0)
        out.append({"victim_partitions_wait_s": max(moved, default=0.0), "survivor_longest_gap_s": stall})
    return out


async def submit_spread(
    client: Client, requests: list[RunRequest], over_s: float, faults_over: asyncio.Event | None = None
) -> list[str]:
    """Submit in waves over ``over_s`` seconds, so that runs are in flight at every kill. Once
    ``faults_over`` is set (the last kill is behind), the waves left go at once: spreading them further
    would only keep the test waiting, with no fault left to strike them."""
    ids: list[str] = []
    waves = 20
    per = -(-len(requests) // waves)
    for i in range(waves):
        ids += await client.submit_many(requests[i * per : (i + 1) * per])
        if faults_over is None:
            await asyncio.sleep(over_s / waves)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(faults_over.wait(), over_s / waves)
    return ids


async def wait_owned(procs: WorkerProcs, names: list[str], wait_s: float = 90) -> None:
    end = time.monotonic() + wait_s
    while True:
        owned = sorted(p for n in names for p in procs.status(n).get("owned", []))
        if owned == list(range(PARTITIONS)) and all(procs.status(n).get("owned") for n in names):
            return
        for n in names:
            procs.alive(n)
        if time.monotonic() > end:
            raise AssertionError(f"workers never split the partitions: {owned}")
        await asyncio.sleep(0.1)


def worker_args(log: Path, sleep: float, max_in_flight: int) -> list[str]:
    return [
        "--workflow",
        "fork",
        "--sleep",
        str(sleep),
        "--max-in-flight",
        str(max_in_flight),
        "--start-log",
        str(log),
        "--partitions",
        str(PARTITIONS),
    ]


@pytest.mark.fault
@pytest.mark.parametrize(
    ("sleep", "in_flight", "spread_s"), [(0.02, 20, 50.0), (1.0, 200, 50.0)], ids=["20ms", "1s"]
)
async def test_kill_9_five_times_leaves_one_history_per_run(
    broker: str,
    prefix: str,
    procs: WorkerProcs,
    tmp_path: Path,
    sleep: float,
    in_flight: int,
    spread_s: float,
) -> None:
    settings = settings_for(broker, prefix)
    log = tmp_path / "starts.jsonl"
    names = ["w1", "w2"]
    args = worker_args(log, sleep, in_flight)
    for n in names:
        procs.start(n, *args, "--instance-id", n)
    await wait_owned(procs, names)
    rng = random.Random(12)
    requests = [RunRequest(workflow="fork", input={"n": i}, run_id=f"k{i}") for i in range(RUNS)]
    kills: list[tuple[float, list[int]]] = []
    async with Client(settings) as client:
        faults_over = asyncio.Event()
        submitting = asyncio.create_task(submit_spread(client, requests, spread_s, faults_over))
        for _ in range(5):
            await wait_owned(procs, names)  # both are up again: each recovery is measured on its own
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            victim = rng.choice(names)
            owned = procs.status(victim).get("owned", [])
            procs.kill9(victim)
            kills.append((time.time(), owned))
            await asyncio.sleep(rng.uniform(1.0, 2.0))
            procs.start(victim, *args, "--instance-id", victim)
        faults_over.set()
        ids = await submitting
        states = await client.wait_terminal(ids, wait_s=240)
        for n in names:
            procs.alive(n)
    events, records = await checked_history(broker, prefix, settings, branchy(), RUNS)
    assert {s.status for s in states.values()} == {"completed"}
    counts = check_starts(log, events, records)
    times = recovery(records, kills)
    print(f"agent starts: {counts}; recovery per kill: {times}")


@pytest.mark.fault
async def test_a_paused_worker_cannot_make_its_late_decisions_count(
    broker: str, prefix: str, procs: WorkerProcs, tmp_path: Path
) -> None:
    """SIGSTOP one worker past its session: the group moves on; resumed, its writes are fenced."""
    settings = settings_for(broker, prefix)
    log = tmp_path / "starts.jsonl"
    args = worker_args(log, 1.0, 100)
    procs.start("w1", *args)
    procs.start("w2", *args)
    await wait_owned(procs, ["w1", "w2"])
    requests = [RunRequest(workflow="fork", input={"n": i}, run_id=f"z{i}") for i in range(400)]
    async with Client(settings) as client:
        ids = await client.submit_many(requests)
        end = time.monotonic() + 60
        while procs.status("w1").get("stats", {}).get("running", 0) < 10:
            assert time.monotonic() < end, "w1 never ran tasks"
            await asyncio.sleep(0.05)
        zombie = procs.procs["w1"].pid
        os.kill(zombie, signal.SIGSTOP)
        try:
            # the group notices after the 6 s session and gives w1's partitions to w2
            end = time.monotonic() + 60
            while procs.status("w2").get("owned") != list(range(PARTITIONS)):
                assert time.monotonic() < end, "w2 never took over w1's partitions"
                await asyncio.sleep(0.1)
            decided, end = procs.status("w2")["stats"]["decisions"], time.monotonic() + 60
            while procs.status("w2")["stats"]["decisions"] < decided + 10:  # w2 decides w1's runs meanwhile
                assert time.monotonic() < end, "w2 decided nothing after taking over"
                await asyncio.sleep(0.1)
        finally:
            os.kill(zombie, signal.SIGCONT)
        states = await client.wait_terminal(ids, wait_s=180)
        end = time.monotonic() + 30
        while not procs.status("w1").get("owned"):  # the zombie rejoined and got partitions again
            assert time.monotonic() < end, "w1 never rejoined the group"
            await asyncio.sleep(0.1)
    procs.alive("w1")
    procs.alive("w2")
    fenced = procs.status("w1")["stats"]["fenced"]
    events, records = await checked_history(
        broker, prefix, settings, branchy(), note=f"w1 fenced on {fenced} partitions"
    )
    assert {s.status for s in states.values()} == {"completed"}
    assert fenced >= 1, "the resumed worker was never refused: its late writes were not fenced"
    print(f"agent starts: {check_starts(log, events, records)}")
