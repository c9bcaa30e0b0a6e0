"""Failures against the real broker: retries then quarantine, poison records, redrive after a fix."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from calmrun.agents import AgentRegistry, StepContext
from calmrun.client import Client
from calmrun.kafka.topics import INVALID, Topics
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest, StepTask
from tests.runtime_support import Item, Out, add_one, linear, poll_states, ready, running, settings_for, until

FAST_RETRY = {"initial_backoff_s": 0.01, "max_backoff_s": 0.05, "jitter": 0.0}


async def test_failing_agents_are_retried_then_quarantined_with_their_cause(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    calls: Counter[tuple[str, str]] = Counter()  # (workflow, run) -> agent calls

    async def boom(ctx: StepContext, item: Item) -> Out:
        calls[(ctx.workflow, ctx.run_id)] += 1
        raise RuntimeError(f"boom on attempt {ctx.attempt}")

    async def hang(ctx: StepContext, item: Item) -> Out:
        calls[(ctx.workflow, ctx.run_id)] += 1
        await asyncio.Event().wait()  # never set: only the step's timeout ends this
        raise AssertionError("unreachable")

    async def bad_output(ctx: StepContext, item: Item) -> Out:
        calls[(ctx.workflow, ctx.run_id)] += 1
        return {"n": "not a number"}  # type: ignore[return-value]

    attempts = {"boom": 3, "hang": 2, "badout": 3}
    workflows = [
        linear("boom", steps=1, agent="boom", retry={"max_attempts": 3, **FAST_RETRY}),
        linear("hang", steps=1, agent="hang", timeout_s=0.3, retry={"max_attempts": 2, **FAST_RETRY}),
        linear("badout", steps=2, agent="bad_output", retry={"max_attempts": 3, **FAST_RETRY}),
        linear("lin"),
    ]
    agents = AgentRegistry({"boom": boom, "hang": hang, "bad_output": bad_output, "add_one": add_one})
    async with running(settings, workflows, agents) as w, Client(settings) as client:
        await ready(w)
        requests = [
            RunRequest(workflow=wf, input={"n": i}, run_id=f"{wf}-{i}") for wf in attempts for i in range(3)
        ]
        good = [RunRequest(workflow="lin", input={"n": i}, run_id=f"ok-{i}") for i in range(20)]
        ids = await client.submit_many([*requests[:5], *good[:10], *requests[5:], *good[10:]])
        states = await client.wait_terminal(ids, wait_s=90)
        dlq = {wf: await client.read_dlq(wf) for wf in attempts}
        events = await client.events()
        assert w.failure is None
    errors = {"boom": "RuntimeError", "hang": "AgentTimeout", "badout": "InvalidOutputError"}
    for req in good:
        assert states[req.run_id].status == "completed", states[req.run_id]
    for wf, n in attempts.items():
        runs = [r.run_id for r in requests if r.workflow == wf]
        assert sorted(d.run_id for d in dlq[wf]) == sorted(runs), dlq[wf]
        for d in dlq[wf]:
            assert (d.reason, d.error_type, d.workflow, d.step, d.attempt) == (
                "quarantined",
                errors[wf],
                wf,
                "s1",
                n,
            )
            assert d.error
        for rid in runs:
            s = states[rid]
            assert (s.status, s.error_type) == ("quarantined", errors[wf])
            assert (s.steps["s1"].status, s.steps["s1"].attempt) == ("failed", n)
            assert "s2" not in s.steps
            assert calls[(wf, rid)] == n
            mine = [e for e in events if e.run_id == rid and e.seq > 0]
            assert [e.type for e in mine if e.type.startswith(("step.", "timer.", "run.q"))] == [
                "step.scheduled",
                *(["step.failed", "step.retry_scheduled", "timer.fired", "step.scheduled"] * (n - 1)),
                "step.failed",
                "run.quarantined",
            ]
            assert mine[-1].type == "run.quarantined"
            assert mine[-1].data["error_type"] == errors[wf]
    boom_dlq = dlq["boom"][0]
    assert "boom on attempt 3" in boom_dlq.error


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "read-back"])
async def test_quarantine_record_carries_the_agent_traceback(broker: str, prefix: str, eager: bool) -> None:
    """Also the task itself: an eager task's dead-letter record holds the bytes written to its step topic."""
    settings = settings_for(broker, prefix, eager=eager)

    async def boom(ctx: StepContext, item: Item) -> Out:
        raise RuntimeError("kaput")

    wf = linear("boom", steps=1, agent="boom", retry={"max_attempts": 1})
    async with running(settings, [wf], AgentRegistry({"boom": boom})) as w, Client(settings) as client:
        await ready(w)
        await client.wait_terminal(
            await client.submit_many([RunRequest(workflow="boom", run_id="b", input={"n": 1})]), 60
        )
        [d] = await client.read_dlq("boom")
    assert (d.reason, d.error_type, d.error) == ("quarantined", "RuntimeError", "kaput")
    assert d.traceback is not None
    assert "kaput" in d.traceback and "in boom" in d.traceback
    assert d.source_topic == Topics(prefix).step("boom", "s1")
    assert (d.source_offset == -1) is eager
    task = RecordCodec(wire_models()).decode_as(d.value or b"", StepTask)
    assert (task.run_id, task.step, task.attempt) == ("b", "s1", 1)


async def test_poison_requests_are_parked_and_the_worker_goes_on(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    topics = Topics(prefix)
    poison: list[tuple[bytes | None, bytes, str]] = [  # key, value, expected error_type
        (b"p1", b"\xff\x00garbage", "DecodeError"),
        (None, b"\xff\x00garbage, keyless", "DecodeError"),
        (b"p2", b"{not json", "DecodeError"),
        (b"p3", json.dumps({"workflow": 5}).encode(), "DecodeError"),
        (b"p4", json.dumps([1, 2, 3]).encode(), "DecodeError"),
        (b"p5", b"\xc3\x01" + bytes(8) + b"avro-looking garbage", "UnknownSchemaError"),
        (b"p6", json.dumps({"workflow": "no-such-flow", "input": {"n": 1}}).encode(), "UnknownWorkflowError"),
        (b"p7", json.dumps({"workflow": "lin", "run_id": "other-id"}).encode(), "DecodeError"),
    ]
    async with (
        running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w,
        Client(settings) as client,
    ):
        await ready(w)
        producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
        await producer.start()
        try:
            for key, value, _ in poison:
                await producer.send_and_wait(topics.requests, value, key=key)
        finally:
            await producer.stop()
        [after] = await client.submit_many(
            [RunRequest(workflow="lin", input={"n": 1}, run_id="after-poison")]
        )
        states = await client.wait_terminal([after], wait_s=60)
        assert states[after].status == "completed"
        assert w.failure is None
        parked = await client.read_dlq(INVALID)
    assert w.stats.poison == len(poison)
    by_value = {d.value: d for d in parked}
    assert set(by_value) == {value for _, value, _ in poison}, parked
    for key, value, error_type in poison:
        d = by_value[value]
        assert d.reason == "poison"
        assert d.error_type == error_type, (value, d.error)
        assert d.error and d.traceback
        assert d.source_topic == topics.requests
        assert d.run_id == (key.decode() if key is not None else None) and d.step is None  # run.rejected
        if key is not None:
            assert d.key == key
    assert "no-such-flow" in by_value[poison[6][1]].error
    assert "workflow" in by_value[poison[3][1]].error


async def test_redrive_after_the_agent_is_fixed_completes_the_runs(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(broker, prefix)
    flag = tmp_path / "broken"
    flag.write_text("the downstream API is down")
    calls: Counter[tuple[str, str]] = Counter()

    async def counted(ctx: StepContext, item: Item) -> Out:
        calls[(ctx.run_id, ctx.step)] += 1
        return await add_one(ctx, item)

    async def fragile(ctx: StepContext, item: Item) -> Out:
        calls[(ctx.run_id, ctx.step)] += 1
        if flag.exists():
            raise ConnectionError(flag.read_text())
        return await add_one(ctx, item)

    wf = parse_workflow(
        {
            "name": "fragile",
            "steps": [
                {"name": "prep", "agent": "counted", "next": "call"},
                {
                    "name": "call",
                    "agent": "fragile",
                    "input": {"n": "steps.prep.n"},
                    "retry": {"max_attempts": 2, **FAST_RETRY},
                    "next": "post",
                },
                {"name": "post", "agent": "counted", "input": {"n": "steps.call.n"}},
            ],
        }
    )
    agents = AgentRegistry({"counted": counted, "fragile": fragile})
    async with running(settings, [wf], agents) as w, Client(settings) as client:
        await ready(w)
        ids = await client.submit_many(
            [RunRequest(workflow="fragile", input={"n": i}, run_id=f"fr{i}") for i in range(6)]
        )
        quarantined = await client.wait_terminal(ids, wait_s=60)
        assert {s.status for s in quarantined.values()} == {"quarantined"}
        assert {s.error_type for s in quarantined.values()} == {"ConnectionError"}
        assert len(await client.read_dlq("fragile")) == len(ids)

        flag.unlink()  # the fix
        runs, records = await client.redrive("fragile")
        assert (runs, records) == (len(ids), 0)
        states = await poll_states(client, ids, lambda s: s.status == "completed", 60, "redriven runs")
        events = await client.events()
        # a second redrive finds the runs completed: it is logged and ignored, nothing runs again
        before, ignored = dict(calls), w.stats.ignored
        assert await client.redrive("fragile") == (len(ids), 0)
        await until(lambda: w.stats.ignored == ignored + len(ids), 30, "the second redrive to be ignored")
        assert {s.status for s in (await client.read_states()).values()} == {"completed"}
    for i, rid in enumerate(ids):
        s = states[rid]
        assert s.steps["post"].output == {"n": i + 3, "label": "post:1"}
        assert s.steps["call"].attempt == 3  # two failed attempts, then one after the redrive
        assert calls[(rid, "prep")] == 1  # the step that had succeeded is not run again
        assert calls[(rid, "call")] == 3
        assert calls[(rid, "post")] == 1
        mine = [e for e in events if e.run_id == rid and e.seq > 0]
        assert [e.type for e in mine].count("run.redrive_requested") == 1
        q = next(i for i, e in enumerate(mine) if e.type == "run.quarantined")
        r = next(i for i, e in enumerate(mine) if e.type == "run.redrive_requested")
        assert q < r
        assert mine[r].data["previous_error"] == "the downstream API is down"
        assert mine[-1].type == "run.completed"
    assert dict(calls) == before
