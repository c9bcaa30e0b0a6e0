"""The runtime against the real broker: branches, fan-out and join, duplicate requests, kcat."""

from __future__ import annotations

import asyncio
import json
import shutil
import zlib
from collections import Counter

from pydantic import BaseModel

from calmrun.agents import AgentRegistry, StepContext
from calmrun.client import Client
from calmrun.kafka.topics import Topics, partition_for
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, add_one, linear, read_raw, ready, running, settings_for, until


class Verdict(BaseModel):
    kind: str
    n: int


class Pair(BaseModel):
    x: int
    y: int


async def classify(ctx: StepContext, item: Item) -> Verdict:
    return Verdict(kind="big" if item.n >= 10 else "small", n=item.n)


def branching() -> object:
    return parse_workflow(
        {
            "name": "triage",
            "outcomes": ["completed", "escalated"],
            "steps": [
                {
                    "name": "classify",
                    "agent": "classify",
                    "branches": [{"when": {"field": "kind", "op": "eq", "value": "big"}, "goto": "big"}],
                    "next": "small",
                },
                {
                    "name": "big",
                    "agent": "add_one",
                    "input": {"n": "steps.classify.n"},
                    "next": "end:escalated",
                },
                {"name": "small", "agent": "add_one", "input": {"n": "steps.classify.n"}},
            ],
        }
    )


async def test_branch_on_step_output_takes_each_side(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    wf = branching()
    agents = AgentRegistry({"classify": classify, "add_one": add_one})
    async with running(settings, [wf], agents) as w, Client(settings) as client:  # type: ignore[list-item]
        await ready(w)
        ids = await client.submit_many(
            [RunRequest(workflow="triage", input={"n": n}, run_id=f"r{n}") for n in (1, 5, 10, 42)]
        )
        states = await client.wait_terminal(ids, wait_s=60)
        events = {rid: await client.events(rid) for rid in ids}
    for rid in ("r1", "r5"):
        s = states[rid]
        assert s.status == "completed", s
        assert s.outcome == "completed"
        assert set(s.steps) == {"classify", "small"}
        assert s.steps["small"].output == {"n": int(rid[1:]) + 1, "label": "small:1"}
        routed = [e for e in events[rid] if e.type == "run.routed" and e.step == "classify"]
        assert [e.data for e in routed] == [{"to": ["small"], "by": "next"}]
    for rid in ("r10", "r42"):
        s = states[rid]
        assert s.status == "completed", s
        assert s.outcome == "escalated"
        assert set(s.steps) == {"classify", "big"}
        assert s.steps["big"].output == {"n": int(rid[1:]) + 1, "label": "big:1"}
        routed = [e for e in events[rid] if e.type == "run.routed" and e.step == "classify"]
        assert [e.data for e in routed] == [{"to": ["big"], "by": "branches[0]"}]


async def test_fan_out_then_join_runs_join_once_after_both(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    calls: list[tuple[str, str, str]] = []  # (run, step, "start" | "end"), in the order they happened

    async def branch(ctx: StepContext, item: Item) -> Out:
        calls.append((ctx.run_id, ctx.step, "start"))
        if ctx.step == "b":
            # b finishes well after c for every run, so the join is first reached by c and must wait
            await until(lambda: (ctx.run_id, "c", "end") in calls, 30, "c to finish")
        calls.append((ctx.run_id, ctx.step, "end"))
        return Out(n=item.n + (10 if ctx.step == "b" else 100), label=ctx.step)

    async def join(ctx: StepContext, pair: Pair) -> Out:
        calls.append((ctx.run_id, ctx.step, "start"))
        calls.append((ctx.run_id, ctx.step, "end"))
        return Out(n=pair.x + pair.y, label="joined")

    wf = parse_workflow(
        {
            "name": "fan",
            "steps": [
                {"name": "a", "agent": "add_one", "next": ["b", "c"]},
                {"name": "b", "agent": "branch", "input": {"n": "steps.a.n"}, "next": "d"},
                {"name": "c", "agent": "branch", "input": {"n": "steps.a.n"}, "next": "d"},
                {
                    "name": "d",
                    "agent": "join",
                    "needs": ["b", "c"],
                    "input": {"x": "steps.b.n", "y": "steps.c.n"},
                },
            ],
        }
    )
    agents = AgentRegistry({"add_one": add_one, "branch": branch, "join": join})
    async with running(settings, [wf], agents) as w, Client(settings) as client:
        await ready(w)
        ids = await client.submit_many(
            [RunRequest(workflow="fan", input={"n": i}, run_id=f"f{i}") for i in range(8)]
        )
        states = await client.wait_terminal(ids, wait_s=60)
        events = await client.events()
    for i, rid in enumerate(ids):
        s = states[rid]
        assert s.status == "completed", s
        a = i + 1
        assert s.steps["d"].output == {"n": (a + 10) + (a + 100), "label": "joined"}
        mine = [c for c in calls if c[0] == rid]
        assert [c for c in mine if c[1] == "d"] == [(rid, "d", "start"), (rid, "d", "end")]
        d_start = mine.index((rid, "d", "start"))
        assert mine.index((rid, "b", "end")) < d_start
        assert mine.index((rid, "c", "end")) < d_start
        scheduled = Counter(e.step for e in events if e.run_id == rid and e.type == "step.scheduled")
        assert scheduled == {"a": 1, "b": 1, "c": 1, "d": 1}
        completed = [e for e in events if e.run_id == rid and e.type == "run.completed"]
        assert len(completed) == 1


async def test_duplicate_run_requests_make_one_run(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    started: Counter[tuple[str, str]] = Counter()

    async def counting(ctx: StepContext, item: Item) -> Out:
        started[(ctx.run_id, ctx.step)] += 1
        return await add_one(ctx, item)

    agents = AgentRegistry({"counting": counting})
    async with running(settings, [linear(agent="counting")], agents) as w, Client(settings) as client:
        await ready(w)
        await client.submit_many(
            [
                RunRequest(workflow="lin", input={"n": 1}, run_id="dup"),
                RunRequest(workflow="lin", input={"n": 1}, run_id="dup"),
                RunRequest(workflow="lin", input={"n": 500}, run_id="dup"),
                RunRequest(workflow="lin", input={"n": 7}, run_id="other"),
            ]
        )
        states = await client.wait_terminal(["dup", "other"], wait_s=60)
        events = await client.events("dup")
    assert states["dup"].status == "completed"
    assert states["dup"].input == {"n": 1}
    assert states["dup"].steps["s3"].output == {"n": 4, "label": "s3:1"}
    assert [e.type for e in events].count("run.requested") == 1
    assert [e.type for e in events].count("run.completed") == 1
    ignored = [e for e in events if e.type == "input.ignored"]
    assert len(ignored) == 2, ignored
    assert all(e.seq == -1 and e.data["input"] == "RunRequested" for e in ignored)
    assert all("duplicate run request" in e.data["reason"] for e in ignored)
    assert {k: v for k, v in started.items() if k[0] == "dup"} == {
        ("dup", "s1"): 1,
        ("dup", "s2"): 1,
        ("dup", "s3"): 1,
    }


def _kcat_partition(key: str, partitions: int) -> int:
    """librdkafka's default partitioner (consistent_random) for a keyed record: CRC-32 of the key."""
    return zlib.crc32(key.encode()) % partitions


async def test_request_produced_by_kcat_completes(broker: str, prefix: str) -> None:
    kcat = shutil.which("kcat")
    assert kcat is not None, "the kcat CLI is not installed (Debian package 'kcat'); this test needs it"
    settings = settings_for(broker, prefix)
    n = settings.kafka.partitions
    # run IDs on which kcat and calmrun agree, and more on which they do not (the worker must move those)
    moved = [f"kc{i}" for i in range(100) if _kcat_partition(f"kc{i}", n) != partition_for(f"kc{i}", n)][:3]
    same = [f"kc{i}" for i in range(100) if _kcat_partition(f"kc{i}", n) == partition_for(f"kc{i}", n)][:2]
    ids = moved + same
    topic = Topics(prefix).requests
    agents = AgentRegistry({"add_one": add_one})
    async with running(settings, [linear()], agents) as w, Client(settings) as client:
        await ready(w)
        for i, rid in enumerate(ids):
            body = json.dumps({"workflow": "lin", "input": {"n": i}}).encode() + b"\n"
            proc = await asyncio.create_subprocess_exec(
                kcat, "-P", "-b", broker, "-t", topic, "-k", rid,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await proc.communicate(body)
            assert proc.returncode == 0, f"kcat failed ({proc.returncode}): {err.decode(errors='replace')}"
        states = await client.wait_terminal(ids, wait_s=60)
        events = await client.events()
    for i, rid in enumerate(ids):
        assert states[rid].status == "completed", states[rid]
        assert states[rid].steps["s3"].output == {"n": i + 3, "label": "s3:1"}
        assert [e.type for e in events if e.run_id == rid].count("run.requested") == 1
    records = await read_raw(broker, topic)
    originals = {r.key.decode(): r for r in records if "calmrun-moved-from" not in dict(r.headers)}
    copies = {r.key.decode(): r for r in records if "calmrun-moved-from" in dict(r.headers)}
    assert set(originals) == set(ids)
    wrong = {rid for rid, r in originals.items() if r.partition != partition_for(rid, n)}
    assert wrong == set(moved), "kcat's partitioner placed records other than predicted"
    assert set(copies) == set(moved)
    for rid in moved:
        copy, orig = copies[rid], originals[rid]
        assert copy.partition == partition_for(rid, n)
        assert copy.value == orig.value
        assert dict(copy.headers)["calmrun-moved-from"] == f"{orig.partition}:{orig.offset}".encode()
