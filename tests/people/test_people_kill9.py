"""Approvals, rejections, timeouts, signals and cancel survive kill -9 of the worker while runs wait.

A worker process (``tests.worker_proc --workflow people``) starts five runs and is killed with SIGKILL
while every one waits (at the approval gate or for the payment signal). A new worker restores their
state; the answers then come from the ``calmrun`` CLI, as an operator sends them, and the gate of the
``hitl_quick`` run times out from its restored timer. Every run ends as its answer says, and the
history check passes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from tests.people.flows import people_flows
from tests.people.test_people_broker import ended, wait_for, waiting
from tests.runtime_support import WorkerProcs, settings_for

ROOT = Path(__file__).resolve().parents[2]


async def owned_all(procs: WorkerProcs, name: str, wait_s: float = 90) -> None:
    end = time.monotonic() + wait_s
    while sorted(procs.status(name).get("owned", [])) != [0, 1, 2, 3]:
        procs.alive(name)
        assert time.monotonic() < end, f"{name} never owned every partition"
        await asyncio.sleep(0.1)


def cli_run(broker: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one ``calmrun`` verb as a separate process, as an operator does."""
    return subprocess.run(
        [sys.executable, "-m", "calmrun.cli", *args, "--bootstrap", broker, "--prefix", prefix],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli(broker: str, prefix: str, *args: str) -> str:
    """Run one ``calmrun`` verb; it must exit 0."""
    done = cli_run(broker, prefix, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.fault
async def test_answers_after_kill_9_while_waiting(broker: str, prefix: str, procs: WorkerProcs) -> None:
    settings = settings_for(broker, prefix)
    procs.start("w1", "--workflow", "people")
    await owned_all(procs, "w1")
    async with Client(settings) as c:
        plan = {
            "approve": "hitl",
            "reject": "hitl",
            "timeout": "hitl_quick",
            "signal": "hitl",
            "cancel": "hitl",
        }
        first = [RunRequest(workflow=wf, run_id=r, input={"n": 1}) for r, wf in plan.items() if wf == "hitl"]
        await c.submit_many(first)
        for req in first:
            await wait_for(c, req.run_id, waiting("gate"), f"{req.run_id} at the gate")
        for run_id in ("signal", "cancel"):
            cli(broker, prefix, "approve", run_id, "--step", "gate", "--by", "alice")
            await wait_for(c, run_id, waiting("pay"), f"{run_id} waiting for the payment")
        # the run whose gate times out (after 8 s) starts last, so that its timeout is due after the kill
        # however long the CLI calls above took on a busy machine: the restored state must carry it
        await c.submit(RunRequest(workflow="hitl_quick", run_id="timeout", input={"n": 1}))
        await wait_for(c, "timeout", waiting("gate"), "timeout at the gate")

        procs.kill9("w1")
        procs.start("w2", "--workflow", "people")
        await owned_all(procs, "w2")

        status = cli(broker, prefix, "status", "approve")
        assert "waiting: gate for an approval by alice" in status
        cli(
            broker, prefix, "approve", "approve", "--step", "gate", "--by", "alice", "--comment", "after kill"
        )
        cli(broker, prefix, "reject", "reject", "--step", "gate", "--by", "alice")
        (Path(procs.dir) / "paid.json").write_text('{"amount": 20}')
        cli(broker, prefix, "signal", "signal", "paid", "--data", f"@{procs.dir}/paid.json")
        cli(broker, prefix, "cancel", "cancel", "--reason", "withdrawn", "--by", "ops")
        await wait_for(c, "approve", waiting("pay"), "approve waiting for the payment")
        assert "waiting: pay for signal 'paid'" in cli(broker, prefix, "status", "approve")
        cli(broker, prefix, "signal", "approve", "paid", "--data", '{"amount": 5}')

        final = {r: await wait_for(c, r, ended, f"{r} to end", wait_s=60) for r in plan}
        assert {r: (s.status, s.outcome) for r, s in final.items()} == {
            "approve": ("completed", "completed"),
            "reject": ("completed", "rejected"),
            "timeout": ("completed", "expired"),
            "signal": ("completed", "completed"),
            "cancel": ("cancelled", None),
        }
        assert final["approve"].steps["c"].output == {"n": 6, "label": "c:1"}
        assert final["signal"].steps["c"].output == {"n": 21, "label": "c:1"}
        undo = [e.step for e in await c.events("cancel") if e.type == "step.compensated" and e.seq > 0]
        assert undo == ["b", "a"]
        # the refused CLI call: a step that is not waiting is a clear error, exit 1, nothing sent
        late = cli_run(broker, prefix, "approve", "reject", "--step", "gate", "--by", "alice")
        assert late.returncode == 1 and "is not waiting for an answer (it is succeeded)" in late.stderr
    report = await check_history(settings.kafka, people_flows())
    assert report.ok, report.to_dict()
    assert report.replayed == report.runs == len(plan)
