"""Attempts with no task record survive a kill -9: the new owner starts them from the restored state.

With ``worker.task_records`` off, the steps a deciding worker runs itself write no task record.
A worker killed while such attempts run leaves only its committed states; the next owner restores them and
starts every attempt they await (``streams.local.Resumption``), under the same attempt and idempotency key,
and every run completes with one history (the checker, and the agents' start log against the history).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from calmrun.client import Client
from calmrun.kafka.topics import Topics
from calmrun.workflow.events import RunRequest
from tests.runtime_support import WorkerProcs, branchy, read_raw, settings_for, until
from tests.streams.test_effectively_once import (
    PARTITIONS,
    check_starts,
    checked_history,
    starts,
    worker_args,
)

RUNS = 200


@pytest.mark.fault
async def test_kill_9_while_local_attempts_run_then_the_new_owner_resumes_them_under_their_keys(
    broker: str, prefix: str, procs: WorkerProcs, tmp_path: Path
) -> None:
    settings = settings_for(broker, prefix)
    log = tmp_path / "starts.jsonl"
    args = [*worker_args(log, 2.0, 100), "--no-task-records"]  # each attempt 2 s: many run at the kill
    procs.start("w1", *args)
    await until(lambda: procs.status("w1").get("owned") == [0, 1, 2, 3], 90, "w1 ready", procs.watch("w1"))
    requests = [RunRequest(workflow="fork", input={"n": i}, run_id=f"r{i}") for i in range(RUNS)]
    async with Client(settings) as client:
        ids = await client.submit_many(requests)
        # attempts running, and some of them decided from a committed result (s2a/s2b: not started early)
        await until(
            lambda: (
                procs.status("w1")["stats"]["running"] >= 50 and any(s["step"] != "s1" for s in starts(log))
            ),
            90,
            "w1 running second steps",
            procs.watch("w1"),
        )
        w1 = procs.procs["w1"].pid
        procs.kill9("w1")
        killed = {(s["run_id"], s["step"], s["attempt"]) for s in starts(log)}
        procs.start("w2", *args)
        states = await client.wait_terminal(ids, wait_s=240)
        procs.alive("w2")
    assert {s.status for s in states.values()} == {"completed"}
    events, records = await checked_history(broker, prefix, settings, branchy(), RUNS)
    counts = check_starts(log, events, records)  # every start: an attempt scheduled, under its own key
    again = [s for s in starts(log) if s["pid"] != w1]
    resumed = {(s["run_id"], s["step"], s["attempt"]) for s in again} & killed
    assert resumed, f"no attempt running at the kill was started again by w2: {counts}"
    assert procs.terminate("w2") == 0
    stats = procs.status("w2")["stats"]
    assert stats["restored_runs"] > 0 and stats["tasks_resumed"] > 0, stats
    assert stats["tasks_echoed"] == 0  # nothing to read back
    # the steps run by the deciding worker wrote no task record at all
    t = Topics(prefix)
    assert [len(await read_raw(broker, topic, PARTITIONS)) for topic in t.step_topics([branchy()])] == [0] * 4
