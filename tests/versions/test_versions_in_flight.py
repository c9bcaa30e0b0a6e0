"""Versions with runs in flight, against the real broker: runs finish on the version they started on, new
runs take the newest, a group without a run's version leaves it waiting (held, counted, told), and the run
continues when a worker with that version joins the group."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

import tests.versions.support as support
from calmrun.agents import ModelRegistry
from calmrun.check.invariants import check_history
from calmrun.client import Client
from calmrun.kafka.topics import partition_for
from calmrun.settings import Settings
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.records import task_out
from calmrun.streams.worker import Worker
from calmrun.workflow.events import RunCommand, RunRequest, StepTask
from calmrun.workflow.registry import pin_of
from calmrun.workflow.state import RunState
from tests.runtime_support import ready, running, settings_for, until
from tests.versions.support import AGENTS, V1, V2

ROOT = Path(__file__).resolve().parents[2]


def at_b(worker: Worker, run_ids: Sequence[str], step: str = "b") -> bool:
    """Every run is in flight at ``step`` in this worker's table."""
    states = [worker.parts.state(partition_for(r, 4), r) for r in run_ids]
    return all(s is not None and s.steps.get(step) is not None for s in states)


async def start_on_v1(settings: Settings, n: int) -> list[str]:
    """``n`` runs started by a v1 worker and held in flight at ``b``; the worker is stopped after."""
    async with running(settings, [V1], AGENTS) as w:
        await ready(w)
        async with Client(settings) as c:
            ids = await c.submit_many(RunRequest(workflow="pin", input={"n": i * 100}) for i in range(n))
        await until(lambda: at_b(w, ids), 60, "the v1 runs to reach b")
    return ids


async def cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "calmrun.cli", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


def path(state: RunState) -> list[str]:
    return sorted(n for n, st in state.steps.items() if st.status == "succeeded")


async def test_runs_in_flight_finish_on_their_version_after_a_restart_onto_v1_and_v2(
    broker: str, prefix: str
) -> None:
    support.OPEN = asyncio.Event()
    settings = settings_for(broker, prefix)
    old = await start_on_v1(settings, 4)
    async with running(settings, [V1, V2], AGENTS) as w:
        await ready(w)
        async with Client(settings) as c:
            new = await c.submit_many(RunRequest(workflow="pin", input={"n": 1}) for _ in range(3))
            await until(lambda: at_b(w, new, "b2"), 60, "the new runs to reach b2")
            support.OPEN.set()
            states = await c.wait_terminal([*old, *new], wait_s=60)
    for rid in old:  # decided with v1 all along: b ran, not v2's b2
        s = states[rid]
        assert (s.status, s.version, s.digest, path(s)) == ("completed", "1", V1.digest, ["a", "b", "c"])
    for rid in new:  # new runs take the newest version the worker has
        s = states[rid]
        assert (s.status, s.version, s.digest, path(s)) == ("completed", "2", V2.digest, ["a", "b2", "c"])
    report = await check_history(settings.kafka, [V1, V2])
    assert report.ok, report.summary()
    assert report.replayed == 7


async def test_a_v2_only_group_leaves_v1_runs_waiting_until_a_v1_worker_joins(
    broker: str, prefix: str
) -> None:
    support.OPEN = asyncio.Event()
    settings = settings_for(broker, prefix)
    old = await start_on_v1(settings, 3)
    metrics = WorkerMetrics(CollectorRegistry())
    v2_only = Worker(settings, [V2], AGENTS, ModelRegistry({}), metrics=metrics)
    await v2_only.start()
    v1_again: Worker | None = None
    try:
        await ready(v2_only)
        await until(lambda: v2_only.pins.waiting().get(pin_of(V1)) == 3, 30, "three runs waiting for v1")
        labels = {"workflow": "pin", "version": "1", "digest": V1.digest}
        assert metrics.registry.get_sample_value("calmrun_runs_waiting_version", labels) == 3
        support.OPEN.set()  # nothing holds the v1 runs now but the missing version
        async with Client(settings) as c:
            # a command for a waiting run is held in its state, not decided and not dropped
            redrive = RunCommand(command="redrive", run_id=old[0], workflow="pin", by="test")
            await c.producer.send_and_wait(c.topics.requests, c.codec.encode(redrive), key=old[0].encode())
            (fresh,) = await c.submit_many([RunRequest(workflow="pin", input={"n": 5})])
            done = (await c.wait_terminal([fresh], wait_s=60))[fresh]
            assert (done.status, done.version, path(done)) == ("completed", "2", ["a", "b2", "c"])
            p0 = partition_for(old[0], 4)
            await until(lambda: len(getattr(v2_only.parts.state(p0, old[0]), "held", [])) == 1, 30, "held")
            # a task record of a v1 run on a step v2 shares (a copy re-delivered, say): the v2 worker does
            # not judge it with v2, it leaves it (a task the run awaits would be re-issued by its deadline)
            task = StepTask(run_id=old[1], workflow="pin", version="1", step="a", attempt=1, agent="add_one",
                            input={"n": 100}, issued_ms=0, timeout_s=30)  # fmt: skip
            out = task_out(c.topics, c.codec, partition_for(old[1], 4), task)
            unserved = v2_only.intake.counts.tasks_unserved  # the v1 worker's own task records count too
            await c.producer.send_and_wait(out.topic, out.value, key=out.key, partition=out.partition)
            await until(lambda: v2_only.intake.counts.tasks_unserved == unserved + 1, 30, "the v1 task left")
            for rid in old:  # not guessed at: still at b, on v1
                s = v2_only.parts.state(partition_for(rid, 4), rid)
                assert s is not None and (s.status, s.version, s.steps["b"].status) == (
                    "running",
                    "1",
                    "scheduled",
                )
            code, shown = await cli("status", old[0], "-b", broker, "--prefix", prefix, "--json")
            assert code == 0, shown
            assert json.loads(shown)["waiting"] == (
                f"waiting for version 1 ({V1.digest}) of workflow pin: no worker of this group serves it"
            )
            code, shown = await cli("status", old[0], "-b", broker, "--prefix", prefix)
            assert "no worker of this group serves it" in shown and "1 commands held" in shown
            # a v1 worker joins the group: the partitions of the v1 runs move to it, and the runs go on
            v1_again = Worker(settings, [V1], AGENTS, ModelRegistry({}))
            await v1_again.start()
            states = await c.wait_terminal(old, wait_s=90)
        for rid in old:
            s = states[rid]
            assert (s.status, s.version, path(s), s.held) == ("completed", "1", ["a", "b", "c"], [])
        assert v1_again.pins.counts.released == 1  # the held redrive, decided (and ignored) in order
        owners = (v1_again, v2_only)
        await until(
            lambda: set().union(*(w.parts.owned for w in owners)) == set(range(4)), 30, "the group settled"
        )
        assert not v2_only.pins.waiting() and v1_again.parts.stable.is_set()
        # a group of two: the v1 runs' partitions went to the v1 worker, the rest stayed
        assert {partition_for(r, 4) for r in old} <= v1_again.parts.owned
        assert (
            v1_again.parts.owned | v2_only.parts.owned == set(range(4))
            and not v1_again.parts.owned & v2_only.parts.owned
        )
    finally:
        if v1_again is not None:
            await v1_again.stop()
        await v2_only.stop()
    report = await check_history(settings.kafka, [V1, V2])
    assert report.ok, report.summary()
    events: list[Any] = []
    async with Client(settings) as c:
        events = await c.events(old[0])
    ignored = [e for e in events if e.type == "input.ignored" and e.data.get("input") == "RedriveRequested"]
    assert len(ignored) == 1  # the held command was decided once, by the worker with the version
    (held,) = [e for e in events if e.type == "input.held"]  # and its holding is in the run's log
    assert held.seq == -1 and held.data["command"] == "redrive" and "pin v1" in held.data["reason"]
