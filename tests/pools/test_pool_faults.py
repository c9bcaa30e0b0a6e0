"""An executor killed with -9 mid-batch loses no run and records no result twice.

One deciding worker and two executors of the ``slow`` pool (the middle steps of the branching ``fork``
workflow, whose agents return a random nonce and log every start), all separate processes. One executor
is killed with -9 three times while runs are in flight and restarted. The run ends with the history
checker (one result per attempt, one history per run) and the agent start log checked against the
history, as the effectively-once tests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from tests.runtime_support import WorkerProcs, branchy, settings_for, until
from tests.streams.test_effectively_once import check_starts, raw_events, submit_spread, wait_owned
from tests.worker_proc import pooled

PARTITIONS = 4
RUNS = 600
POOLED = ["--pooled", "s2a=slow", "--pooled", "s2b=slow"]


@pytest.mark.fault
async def test_kill_9_of_an_executor_mid_batch_loses_no_run_and_records_no_result_twice(
    broker: str, prefix: str, procs: WorkerProcs, tmp_path: Path
) -> None:
    settings = settings_for(broker, prefix)
    log = tmp_path / "starts.jsonl"
    common = ["--workflow", "fork", "--start-log", str(log), "--partitions", str(PARTITIONS), *POOLED]
    procs.start("w", *common, "--max-in-flight", "100")
    executor = [*common, "--pool", "slow", "--sleep", "0.5", "--max-in-flight", "50"]
    for n in ("e1", "e2"):
        procs.start(n, *executor, "--instance-id", n)
    await wait_owned(procs, ["w"])
    await wait_owned(procs, ["e1", "e2"])
    rng = random.Random(19)
    requests = [RunRequest(workflow="fork", input={"n": i}, run_id=f"x{i}") for i in range(RUNS)]
    killed_running = []

    def running(name: str) -> int:
        return int(procs.status(name).get("stats", {}).get("running", 0))

    async with Client(settings) as client:
        submitting = asyncio.create_task(submit_spread(client, requests, 24.0))
        for _ in range(3):
            await wait_owned(procs, ["e1", "e2"])
            await asyncio.sleep(rng.uniform(1.0, 2.0))
            with contextlib.suppress(AssertionError):  # mid-batch: while agents run in e1, if soon
                await until(lambda: running("e1") >= 3, 10, "agents running in e1")
            killed_running.append(running("e1"))
            procs.kill9("e1")
            await asyncio.sleep(rng.uniform(1.0, 2.0))
            procs.start("e1", *executor, "--instance-id", "e1")
        ids = await submitting
        states = await client.wait_terminal(ids, wait_s=180)
        for n in ("w", "e1", "e2"):
            procs.alive(n)
    events, records = await raw_events(broker, prefix)
    wf = pooled(branchy(), ["s2a=slow", "s2b=slow"])
    report = await check_history(settings.kafka, [wf])
    print(report.summary(), f"agents running in e1 at each kill: {killed_running}")
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations[:10])
    assert report.runs == RUNS and report.replayed == RUNS
    assert {s.status for s in states.values()} == {"completed"}
    assert sum(killed_running) > 0, "no kill hit an executor mid-batch"
    results = [e for e in events if e.type == "step.succeeded" and e.step in ("s2a", "s2b")]
    assert len(results) == RUNS  # one recorded result per pooled step, none twice
    print(f"agent starts: {check_starts(log, events, records)}")
