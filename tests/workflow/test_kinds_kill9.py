"""kill -9 of the worker in the middle of a 200-element map and while a parent waits on its child: a new
worker takes the runs over from their state, every element's output lands once and in order, the child
ends and routes its parent, and the history checker (iterations, elements, children) passes."""

from __future__ import annotations

import asyncio
import time

import pytest

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from calmrun.workflow.state import RunState
from tests.people.test_people_broker import ended, wait_for
from tests.runtime_support import WorkerProcs, settings_for
from tests.workflow.flows import kinds_flows

WIDTH = 200


async def owned_all(procs: WorkerProcs, name: str, wait_s: float = 90) -> None:
    end = time.monotonic() + wait_s
    while sorted(procs.status(name).get("owned", [])) != [0, 1, 2, 3]:
        procs.alive(name)
        assert time.monotonic() < end, f"{name} never owned every partition"
        await asyncio.sleep(0.1)


def mapped(at_least: int):  # type: ignore[no-untyped-def]
    def done(s: RunState) -> bool:
        m = s.steps["fan"].map if "fan" in s.steps else None
        return m is not None and m.done >= at_least

    return done


def waiting_on_child(s: RunState) -> bool:
    return "child" in s.steps and s.steps["child"].status == "waiting"


@pytest.mark.fault
async def test_kill_9_in_a_wide_map_and_while_a_parent_waits_on_its_child(
    broker: str, prefix: str, procs: WorkerProcs
) -> None:
    settings = settings_for(broker, prefix)
    procs.start("w1", "--workflow", "kinds", "--sleep", "0.25")  # a map of 200 takes 6 s or more
    await owned_all(procs, "w1")
    items = [f"line-{i}" for i in range(WIDTH)]
    async with Client(settings) as c:
        await c.submit_many(
            [RunRequest(workflow="kmap", run_id=r, input={"items": items, "n": 1}) for r in ("m1", "m2")]
        )
        await wait_for(c, "m1", mapped(40), "m1 part of the way through its map", wait_s=120)
        procs.kill9("w1")  # in the middle of the map: elements in flight, others not issued yet
        before = await c.state("m1")
        assert (
            before is not None
            and before.steps["fan"].map is not None
            and before.steps["fan"].map.done < WIDTH
        )

        procs.start("w2", "--workflow", "kinds", "--sleep", "1")  # the child's step now takes 1 s
        await owned_all(procs, "w2")
        await wait_for(c, "m1", waiting_on_child, "m1 waiting on its child", wait_s=180)
        procs.kill9("w2")  # a parent waits on a child whose step is in flight

        procs.start("w3", "--workflow", "kinds", "--sleep", "0")
        await owned_all(procs, "w3")
        for run_id in ("m1", "m2"):
            s = await wait_for(c, run_id, ended, f"{run_id} to end", wait_s=180)
            assert (s.status, s.outcome) == ("completed", "completed"), (run_id, s.error)
            fan = s.steps["fan"].output
            assert fan is not None and [o["of"] for o in fan["items"]] == items  # in order, each once
            assert (
                s.steps["child"].output is not None and s.steps["child"].output["run_id"] == f"{run_id}.child"
            )
            kid = await c.state(f"{run_id}.child")
            assert kid is not None and kid.status == "completed"
    report = await check_history(settings.kafka, kinds_flows())
    assert report.ok, report.to_dict()
    assert report.replayed == report.runs == 4  # two parents, two children
