"""Bad answers from an executor, on the real broker: a malformed result that names its run fails that
attempt at once with the cause (and is parked, naming run, step and attempt), instead of leaving the run
to wait out the step's deadline; a result for a run nobody knows is logged and parked, never dropped."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaProducer

from calmrun.agents import AgentRegistry
from calmrun.check import check_history
from calmrun.client import Client
from calmrun.kafka.topics import INVALID, Topics
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import add_one, linear, ready, running, settings_for, until


async def poll(pred: Callable[[], Awaitable[bool]], what: str, wait_s: float = 60.0) -> None:
    end = asyncio.get_running_loop().time() + wait_s
    while not await pred():
        assert asyncio.get_running_loop().time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


DEADLINE_S = 3600.0  # the attempt's deadline: far beyond what these tests wait, so it cannot be the cause


def pooled_s2() -> WorkflowDef:
    """``lin`` with s2 in pool ``gpu``, which no executor serves here: the test answers its tasks."""
    data = linear(timeout_s=DEADLINE_S, retry={"max_attempts": 2, "initial_backoff_s": 0.01}).model_dump(
        mode="json"
    )
    data["steps"][1]["pool"] = "gpu"
    return parse_workflow(data)


MALFORMED = {  # run ID -> (record value, a piece of the cause)
    # bad JSON: the key names the run; the run's one attempt in flight is the one it answers
    "m-json": (b'{"run_id": "m-json", "step": "s2", "attempt": 1, "output": {', "JSON"),
    # no step: taken from the run, whose only attempt in flight is s2's
    "m-nostep": (json.dumps({"run_id": "m-nostep", "workflow": "lin", "attempt": 1}).encode(), "step"),
    "m-output": (
        json.dumps(
            {"run_id": "m-output", "workflow": "lin", "step": "s2", "attempt": 1, "output": [1]}
        ).encode(),
        "output",
    ),
}


async def test_a_malformed_result_fails_its_attempt_at_once_and_is_parked(
    broker: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(broker, prefix)
    topics = Topics(prefix)
    wf = pooled_s2()
    caplog.set_level(logging.WARNING, logger="calmrun.worker")
    async with (
        running(settings, [wf], AgentRegistry({"add_one": add_one})) as w,
        Client(settings) as client,
    ):
        await ready(w)
        runs = [*MALFORMED, "m-big"]
        ids = await client.submit_many(RunRequest(workflow="lin", input={"n": 1}, run_id=r) for r in runs)

        async def waiting_on_s2() -> bool:
            states = await client.read_states()
            return all(r in states and states[r].steps.get("s2") is not None for r in ids)

        await poll(waiting_on_s2, "s1 done and s2's task waiting for the pool")
        producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
        await producer.start()
        try:
            for run_id, (value, _) in MALFORMED.items():
                await producer.send_and_wait(topics.results, value, key=run_id.encode())
            # a valid result whose output is over limits.max_output_bytes: failed too, naming the agent
            big = {"run_id": "m-big", "workflow": "lin", "step": "s2", "attempt": 1, "pool": "gpu"}
            big["output"] = {"text": "x" * 20_000}
            await producer.send_and_wait(topics.results, json.dumps(big).encode(), key=b"m-big")
            unknown = {"run_id": "nobody", "workflow": "lin", "step": "s2", "attempt": 1, "output": {"n": 1}}
            await producer.send_and_wait(topics.results, json.dumps(unknown).encode(), key=b"nobody")
        finally:
            await producer.stop()
        await until(lambda: w.stats.poison == len(MALFORMED) + 1, 60, "every bad result parked")
        failed: dict[str, RunEvent] = {}

        async def read_failed() -> bool:
            for e in await client.events():
                if e.type == "step.failed" and e.step == "s2":
                    failed[e.run_id] = e
            return set(failed) == set(runs)

        await poll(read_failed, "each malformed result's attempt to fail")
        parked = await client.read_dlq("lin") + await client.read_dlq(INVALID)
    for run_id, (_, cause) in MALFORMED.items():
        ev = failed[run_id]
        assert ev.attempt == 1 and ev.data["error_type"] == "InvalidOutputError", ev
        assert ev.data["retriable"] is True
        assert (
            "agent 'add_one': invalid output: malformed result record" in ev.data["error"]
        )  # names the agent
        assert cause in ev.data["error"], ev.data["error"]
        [letter] = [d for d in parked if d.run_id == run_id]
        assert (letter.reason, letter.workflow, letter.step, letter.attempt) == ("poison", "lin", "s2", 1)
        assert letter.value == MALFORMED[run_id][0]
    assert failed["m-big"].data["error"].startswith("agent 'add_one': invalid output: output of 20,")
    assert not [d for d in parked if d.run_id == "m-big"]  # not parked: a failed attempt, as a local one
    [gone] = [d for d in parked if d.run_id == "nobody"]
    assert (gone.reason, gone.error_type, gone.error) == (
        "poison",
        "UnknownRunError",
        "no run 'nobody' is known here",
    )
    assert "result for unknown run nobody parked" in caplog.text
    assert (w.stats.results_malformed, w.stats.results_unknown_run) == (len(MALFORMED), 1)
    report = await check_history(settings.kafka, [wf])
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations)
