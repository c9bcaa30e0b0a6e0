"""Restarts against the real broker: state restored on start, kill -9 mid-run, two workers in one group.

The worker processes of the fault tests are ``tests.worker_proc`` (separate OS processes); each writes its
stats and owned partitions to a status file, which is how these tests see progress and who did the work.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from calmrun.agents import AgentRegistry
from calmrun.client import Client
from calmrun.kafka.topics import Topics, ensure_topics, partition_for
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, RunRequest
from calmrun.workflow.state import RunState
from tests.runtime_support import (
    WorkerProcs,
    add_one,
    linear,
    ready,
    running,
    settings_for,
    successful_seqs,
    until,
)


def assert_each_step_applied_once(events: list[RunEvent], run_ids: list[str], steps: int = 3) -> None:
    """Every run has one run.requested and one applied success per step: none lost, none applied twice.

    Records re-sent after a crash repeat their seq and count once; two seqs for one step would be two
    different results applied.
    """
    wanted = set(run_ids)
    requested: dict[str, set[int]] = {}
    for e in events:
        if e.type == "run.requested" and e.seq > 0 and e.run_id in wanted:
            requested.setdefault(e.run_id, set()).add(e.seq)
    assert requested == {rid: {1} for rid in run_ids}
    seqs = {k: v for k, v in successful_seqs(events).items() if k[0] in wanted}
    twice = {k: sorted(v) for k, v in seqs.items() if len(v) > 1}
    assert not twice, f"step results applied more than once: {dict(list(twice.items())[:10])}"
    missing = {(rid, f"s{i}") for rid in run_ids for i in range(1, steps + 1)} - set(seqs)
    assert not missing, f"{len(missing)} steps never succeeded, e.g. {sorted(missing)[:10]}"
    assert len(seqs) == len(run_ids) * steps


def check_outputs(states: dict[str, Any], requests: list[RunRequest]) -> None:
    for req in requests:
        s = states[req.run_id]
        assert s.status == "completed", s
        assert s.steps["s3"].output == {"n": req.input["n"] + 3, "label": "s3:1"}


async def test_restarted_worker_restores_state_and_does_not_rerun_steps(broker: str, prefix: str) -> None:
    """Stop and start the worker a few times: each start restores every run, and only new runs execute."""
    settings = settings_for(broker, prefix)
    wf = linear()
    agents = AgentRegistry({"add_one": add_one})
    done: dict[str, Any] = {}
    for round in range(6):
        batch = [RunRequest(workflow="lin", input={"n": i}, run_id=f"r{round}-{i}") for i in range(10)]
        async with running(settings, [wf], agents) as w, Client(settings) as client:
            await ready(w)
            assert w.stats.restored_runs == len(done), f"round {round}: state not restored"
            assert sum(len(t) for t in w.parts.runs.values()) == len(done)
            ids = await client.submit_many(batch)
            new = await client.wait_terminal(ids, wait_s=60)
            states = await client.read_states()
            events = await client.events()
        check_outputs(new, batch)
        assert w.stats.tasks_started == 3 * len(batch), f"round {round}: {w.stats}"
        for rid, before in done.items():
            assert states[rid] == before
            assert [e.type for e in events if e.run_id == rid].count("step.scheduled") == 3
        done.update(new)


async def test_requests_fetched_while_the_worker_restores_see_the_restored_runs(
    broker: str, prefix: str
) -> None:
    """Requests waiting at startup must be decided against the restored state, not a partial one.

    The state topic holds 20,000 other runs first and the 20 runs of interest last, so restoring takes a
    while; meanwhile repeated requests for those 20 runs (a client retrying, with another input) and 20
    new runs wait on the requests topic. The repeats must be ignored as duplicates, never start a run.
    """
    settings = settings_for(broker, prefix)
    n = settings.kafka.partitions
    wf = linear()
    agents = AgentRegistry({"add_one": add_one})
    codec = RecordCodec(wire_models())
    await ensure_topics(settings.kafka, [wf])
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = []
        for i in range(20_000):
            rid = f"filler{i}"
            st = RunState(
                run_id=rid, workflow="lin", version=wf.version, status="completed", outcome="completed"
            )
            futures.append(
                await producer.send(
                    Topics(prefix).state, codec.encode(st), key=rid.encode(), partition=partition_for(rid, n)
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    old = [RunRequest(workflow="lin", input={"n": i}, run_id=f"old{i}") for i in range(20)]
    async with running(settings, [wf], agents) as w1, Client(settings) as client:
        await ready(w1)
        before = await client.wait_terminal(await client.submit_many(old), wait_s=60)
    repeats = [RunRequest(workflow="lin", input={"n": 1000 + i}, run_id=f"old{i}") for i in range(20)]
    fresh = [RunRequest(workflow="lin", input={"n": i}, run_id=f"new{i}") for i in range(20)]
    async with Client(settings) as client:
        await client.submit_many([*repeats, *fresh])  # no worker runs now
        async with running(settings, [wf], agents) as w2:
            states = await client.wait_terminal([r.run_id for r in fresh], wait_s=120)
            await until(lambda: w2.stats.requests >= 40 or w2.failure is not None, 60, "the backlog")
            assert w2.failure is None, f"worker failed: {w2.failure!r}"
            after = await client.read_states()
            events = await client.events()
    check_outputs(states, fresh)
    assert w2.stats.restored_runs == 20_000 + len(old)
    for req in old:
        mine = [e for e in events if e.run_id == req.run_id]
        assert [e.data["input"] for e in mine if e.type == "run.requested"] == [req.input], "run restarted"
        assert after[req.run_id] == before[req.run_id]
        ignored = [e for e in mine if e.type == "input.ignored"]
        assert [e.data["input"] for e in ignored] == ["RunRequested"]
    assert w2.stats.tasks_started == 3 * len(fresh)


@pytest.mark.fault
async def test_kill_9_mid_run_then_restart_completes_every_run_once(
    broker: str, prefix: str, procs: WorkerProcs
) -> None:
    settings = settings_for(broker, prefix)
    args = ["--sleep", "0.05", "--max-in-flight", "20"]
    procs.start("w1", *args)
    await until(lambda: procs.status("w1").get("owned") == [0, 1, 2, 3], 60, "w1 ready", procs.watch("w1"))
    requests = [RunRequest(workflow="lin", input={"n": i}, run_id=f"k{i}") for i in range(500)]
    async with Client(settings) as client:
        ids = await client.submit_many(requests)
        await until(
            lambda: procs.status("w1")["stats"]["completed"] >= 100,
            60,
            "some runs to complete",
            procs.watch("w1"),
        )
        procs.kill9("w1")
        completed = procs.status("w1")["stats"]["completed"]
        assert completed < len(ids), "w1 finished every run before it was killed: nothing was in flight"
        procs.start("w2", *args)
        # the group waits for the killed member's session to expire (30 s) before w2 gets its partitions
        states = await client.wait_terminal(ids, wait_s=150)
        procs.alive("w2")
        events = await client.events()
    check_outputs(states, requests)
    assert_each_step_applied_once(events, ids)
    assert procs.terminate("w2") == 0
    final = procs.status("w2")
    assert final["state"] == "stopped"
    assert final["stats"]["restored_runs"] > 0


@pytest.mark.fault
async def test_two_workers_share_the_partitions_and_each_run_completes_once(
    broker: str, prefix: str, procs: WorkerProcs
) -> None:
    settings = settings_for(broker, prefix)
    args = ["--sleep", "0.02", "--max-in-flight", "50"]
    procs.start("w1", *args)
    procs.start("w2", *args)

    def split() -> bool:
        a, b = procs.status("w1").get("owned"), procs.status("w2").get("owned")
        return bool(a) and bool(b) and sorted(a + b) == [0, 1, 2, 3]

    await until(split, 90, "the two workers to split the partitions", procs.watch("w1", "w2"))
    requests = [RunRequest(workflow="lin", input={"n": i}, run_id=f"t{i}") for i in range(400)]
    async with Client(settings) as client:
        ids = await client.submit_many(requests)
        states = await client.wait_terminal(ids, wait_s=120)
        events = await client.events()
    check_outputs(states, requests)
    assert_each_step_applied_once(events, ids)
    assert procs.terminate("w1") == 0
    assert procs.terminate("w2") == 0
    s1, s2 = procs.status("w1"), procs.status("w2")
    assert s1["state"] == s2["state"] == "stopped"
    started = [s1["stats"]["tasks_started"], s2["stats"]["tasks_started"]]
    assert min(started) > 0, f"one worker did no work: {started}"
    assert sum(started) == 3 * len(ids)  # no rebalance while runs were in flight: nothing ran twice
    assert s1["stats"]["completed"] + s2["stats"]["completed"] == len(ids)
