"""People in the loop against a real broker: approve, reject, timeout, signal, cancel, end as expected.

An in-process worker runs ``tests.people.flows``; the commands go to the requests topic as
``calmrun approve``/``reject``/``signal``/``cancel`` send them (``Client.command``). Every test ends with
the history check (one history per run; the state is the fold of the events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from calmrun.agents import ModelRegistry
from calmrun.check import check_history
from calmrun.client import Client
from calmrun.settings import Settings
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.worker import Worker
from calmrun.workflow.events import RunCommand, RunEvent, RunRequest
from calmrun.workflow.state import RunState
from tests.people.flows import people_agents, people_flows
from tests.runtime_support import ready, settings_for


async def wait_for(
    c: Client, run_id: str, done: Callable[[RunState], bool], what: str, wait_s: float = 30
) -> RunState:
    """Poll the run's state until ``done`` holds for it (the state topic is the one the worker commits)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        s = await c.state(run_id)
        if s is not None and done(s):
            return s
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {wait_s}s waiting for {what}; state: {s}")
        await asyncio.sleep(0.1)


def waiting(step: str) -> Callable[[RunState], bool]:
    return lambda s: step in s.steps and s.steps[step].status == "waiting"


def ended(s: RunState) -> bool:
    return s.is_terminal()


def command(run_id: str, kind: str, **fields: object) -> RunCommand:
    return RunCommand(command=kind, run_id=run_id, workflow="hitl", **fields)  # type: ignore[arg-type]


def types(events: Sequence[RunEvent]) -> list[str]:
    return [e.type for e in events if e.seq > 0]


async def history_ok(settings: Settings, quick_s: float) -> None:
    report = await check_history(settings.kafka, people_flows(quick_s))
    assert report.ok, report.to_dict()
    assert report.replayed == report.runs


async def test_approve_signal_reject_timeout_cancel_end_as_expected(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    metrics = WorkerMetrics(CollectorRegistry())
    worker = Worker(settings, people_flows(quick_s=1.0), people_agents(), ModelRegistry({}), metrics=metrics)
    await worker.start()
    try:
        await _scenario(worker, metrics, settings)
    finally:
        await worker.stop()
    await history_ok(settings, quick_s=1.0)


async def _scenario(w: Worker, metrics: WorkerMetrics, settings: Settings) -> None:
    async with Client(settings) as c:
        await ready(w)
        ids = await c.submit_many(
            [
                RunRequest(workflow="hitl", run_id="approved", input={"n": 1}),
                RunRequest(workflow="hitl", run_id="rejected", input={"n": 1}),
                RunRequest(workflow="hitl_quick", run_id="expired", input={"n": 1}),
                RunRequest(workflow="hitl", run_id="cancelled", input={"n": 1}),
                RunRequest(workflow="hitl", run_id="early-signal", input={"n": 1}),
            ]
        )
        for run_id in ("approved", "rejected", "cancelled", "early-signal"):
            s = await wait_for(c, run_id, waiting("gate"), f"{run_id} to wait at the gate")
            assert s.steps["gate"].due_ms is not None and s.next_due_ms() == s.steps["gate"].due_ms
        gate = {"workflow": "hitl", "step": "gate"}
        assert metrics.registry.get_sample_value("calmrun_steps_waiting", gate) == 4

        # someone who is not an approver: ignored, with why, and the run still waits
        await c.command(command("approved", "approve", step="gate", by="mallory"))
        await c.command(command("approved", "approve", step="gate", by="alice", comment="ok by me"))
        await c.command(command("approved", "reject", step="gate", by="alice"))  # a second answer
        await c.command(command("rejected", "reject", step="gate", by="alice", comment="too much"))
        await c.command(command("cancelled", "approve", step="gate", by="alice"))
        await c.command(command("early-signal", "signal", name="paid", data={"amount": 40}))
        await c.command(command("early-signal", "approve", step="gate", by="alice"))

        s = await wait_for(c, "approved", waiting("pay"), "approved to wait for the payment")
        await c.command(command("approved", "signal", name="paid", data={"amount": 10}, by="psp-webhook"))
        await wait_for(c, "cancelled", waiting("pay"), "cancelled to wait for the payment")
        await c.command(command("cancelled", "cancel", reason="customer withdrew", by="ops"))

        states = await c.wait_terminal(ids, wait_s=30)
        for run_id in ids:
            states[run_id] = await wait_for(c, run_id, ended, f"{run_id} to end")
        assert (states["approved"].outcome, states["approved"].steps["c"].output) == (
            "completed",
            {"n": 11, "label": "c:1"},
        )
        assert states["rejected"].outcome == "rejected"
        assert states["expired"].outcome == "expired"
        assert states["expired"].steps["gate"].status == "timed_out"
        assert states["early-signal"].steps["c"].output == {"n": 41, "label": "c:1"}
        cancelled = states["cancelled"]
        assert (cancelled.status, cancelled.outcome) == ("cancelled", None)
        assert {n: cancelled.steps[n].status for n in ("a", "b", "pay")} == {
            "a": "compensated",
            "b": "compensated",
            "pay": "cancelled",
        }

        approved = await c.events("approved")
        ignored = [e.data["reason"] for e in approved if e.type == "input.ignored"]
        assert "'mallory' may not answer 'gate': its approvers are ['alice']" in ignored
        assert "a second answer: 'gate' was already approved by 'alice'" in ignored
        answer = next(e for e in approved if e.type == "step.approved")
        assert answer.data == {"by": "alice", "comment": "ok by me"}
        signal = next(e for e in approved if e.type == "signal.received")
        assert signal.data["by"] == "psp-webhook" and signal.data["to"] == ["pay"]
        rejected = await c.events("rejected")
        assert next(e for e in rejected if e.type == "step.rejected").data["comment"] == "too much"
        undo = [e.step for e in await c.events("cancelled") if e.type == "step.compensated" and e.seq > 0]
        assert undo == ["b", "a"]  # reverse order of success
        assert types(await c.events("cancelled"))[-1] == "run.cancelled"
        early = await c.events("early-signal")
        assert next(e for e in early if e.type == "step.signalled").data == {"name": "paid", "buffered": True}
        assert await c.read_dlq("hitl") == []  # a cancel is not a failure: no dead letter
        assert metrics.registry.get_sample_value("calmrun_steps_waiting", gate) is None
        assert (
            metrics.registry.get_sample_value(
                "calmrun_runs_total", {"workflow": "hitl", "tenant": "default", "status": "cancelled"}
            )
            == 1
        )
