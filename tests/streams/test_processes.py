"""``calmrun worker --processes N``: N children in one group, restarted when they die, stopped together.

The fault test runs the effectively-once workload (the branching nonce workflow, every agent start logged)
on ``--processes 2``, kills one child with SIGKILL mid-load and ends with the same checks as
``test_effectively_once``: one history per run, every start an attempt the history scheduled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from calmrun.client import Client
from calmrun.localproc import free_port
from calmrun.settings import load_settings
from calmrun.supervisor import Supervisor, child_argv, child_env
from calmrun.workflow.definition import load_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import settings_for
from tests.streams.test_effectively_once import check_starts, checked_history, starts, submit_spread

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "calmrun.cli"]

FORK = """
name: fork
steps:
  - name: s1
    agent: tests.runtime_support:nonce_step
    input: {n: input.n}
    branches: [{when: {field: even, value: true}, goto: s2a}]
    next: s2b
  - {name: s2a, agent: "tests.runtime_support:nonce_step", input: {n: steps.s1.n}, next: s3}
  - {name: s2b, agent: "tests.runtime_support:nonce_step", input: {n: steps.s1.n}, next: s3}
  - {name: s3, agent: "tests.runtime_support:nonce_step", input: {n: steps.s1.n}}
"""


class Supervised:
    """``calmrun worker --processes N`` as an OS process, its output in ``<dir>/supervisor.log``."""

    def __init__(self, directory: Path, broker: str, prefix: str, n: int, *args: str, **env: str) -> None:
        self.wf = directory / "fork.yaml"
        self.wf.write_text(FORK)
        self.log_path = directory / "supervisor.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*CLI, "worker", "-w", str(self.wf), "-b", broker, "--prefix", prefix, f"--processes={n}", *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "CALMRUN_KAFKA__PARTITIONS": "4",
                "CALMRUN_WORKER__COMMIT_INTERVAL_S": "0.2",
                "CALMRUN_WORKER__TIMER_INTERVAL_S": "0.1",
                **env,
            },
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """The pids of the supervisor's live children (read from /proc)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return sorted(found)

    async def until_running(self, n: int, wait_s: float = 60) -> None:
        """Wait until ``n`` children in all have printed that their worker runs."""
        end = time.monotonic() + wait_s
        while self.text().count("worker running") < n:
            assert self.proc.poll() is None, f"the supervisor exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < end, f"children never ran:\n{self.text()[-3000:]}"
            await asyncio.sleep(0.1)

    def close(self) -> None:
        children = self.children()  # before the supervisor goes: its orphans are init's, not found after
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[list[Supervised]]:
    made: list[Supervised] = []
    try:
        yield made
    finally:
        for s in made:
            s.close()


def test_a_child_gets_the_arguments_without_processes_and_its_own_id_and_port() -> None:
    argv = ["worker", "-w", "f.yaml", "--processes", "2", "--max-in-flight", "5", "--processes=3"]
    assert child_argv(argv)[1:] == ["-m", "calmrun.cli", "worker", "-w", "f.yaml", "--max-in-flight", "5"]
    s = load_settings(worker={"instance_id": "pod-a"}, metrics={"port": 9100})
    assert [child_env(s, i) for i in range(2)] == [
        {"CALMRUN_WORKER__INSTANCE_ID": "pod-a-0", "CALMRUN_METRICS__PORT": "9100"},
        {"CALMRUN_WORKER__INSTANCE_ID": "pod-a-1", "CALMRUN_METRICS__PORT": "9101"},
    ]
    assert child_env(load_settings(), 1) == {}


async def test_a_child_failing_before_it_runs_stops_the_supervisor_with_its_code() -> None:
    """No hot loop: exit 3 before the ready line stops the siblings and is the supervisor's exit code."""
    script = "import os, sys, time\nif os.environ.get('FAIL'): sys.exit(3)\ntime.sleep(60)\n"
    sup = Supervisor([sys.executable, "-c", script], [{}, {"FAIL": "1"}], backoff_s=0.1)
    t0 = time.monotonic()
    assert await asyncio.wait_for(sup.run(), 30) == 3
    assert time.monotonic() - t0 < 10 and sup.restarts == 0 and sup.pids == {}


async def test_a_ready_child_that_dies_is_restarted(tmp_path: Path) -> None:
    # each child writes its ready line, then leaves a file named by its pid: the test's sign that it is ready
    script = (
        "import os, sys, time\nos.write(int(os.environ['CALMRUN_READY_FD']), b'ready\\n')\n"
        "open(os.path.join(os.environ['MARKS'], str(os.getpid())), 'w').close()\ntime.sleep(60)\n"
    )
    marks = {"MARKS": str(tmp_path)}
    sup = Supervisor([sys.executable, "-c", script], [marks, marks], backoff_s=0.1)
    running = asyncio.create_task(sup.run())
    end = time.monotonic() + 20
    while len(sup.pids) < 2:
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    first = dict(sup.pids)
    while not (tmp_path / str(first[0])).exists():  # it has written its ready line
        assert time.monotonic() < end, "the child never wrote its ready line"
        await asyncio.sleep(0.05)
    os.kill(first[0], signal.SIGKILL)
    while sup.pids.get(0) in (None, first[0]):
        assert time.monotonic() < end, "the killed child was never restarted"
        await asyncio.sleep(0.05)
    assert sup.pids[1] == first[1] and sup.restarts == 1
    sup.stop()
    assert await asyncio.wait_for(running, 30) == 0
    assert sup.pids == {}


async def test_sigterm_stops_every_child_cleanly(
    broker: str, prefix: str, tmp_path: Path, supervised: list[Supervised]
) -> None:
    sup = Supervised(tmp_path, broker, prefix, 2)
    supervised.append(sup)
    await sup.until_running(2)
    kids = sup.children()
    assert len(kids) == 2
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(60) == 0, sup.text()[-3000:]
    assert sup.children() == [] and not any(map(alive, kids))
    assert sup.text().count("stopped: exit code 0") == 2, sup.text()[-3000:]


def test_a_child_that_cannot_reach_kafka_stops_the_supervisor(tmp_path: Path) -> None:
    wf = tmp_path / "fork.yaml"
    wf.write_text(FORK)
    t0 = time.monotonic()
    done = subprocess.run(
        [*CLI, "worker", "-w", str(wf), "-b", f"127.0.0.1:{free_port()}", "--processes", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "no Kafka broker answers" in done.stderr
    assert "failed at startup (exit code 1" in done.stderr and "restarting it in" not in done.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.fault
async def test_processes_2_survives_kill_9_of_a_child_with_one_history_per_run(
    broker: str, prefix: str, tmp_path: Path, supervised: list[Supervised]
) -> None:
    log = tmp_path / "starts.jsonl"
    sup = Supervised(
        tmp_path,
        broker,
        prefix,
        2,
        "--max-in-flight",
        "20",
        CALMRUN_TEST_START_LOG=str(log),
        CALMRUN_TEST_SLEEP_S="0.02",
    )
    supervised.append(sup)
    await sup.until_running(2)
    settings = settings_for(broker, prefix)
    requests = [RunRequest(workflow="fork", input={"n": i}, run_id=f"p{i}") for i in range(1_000)]
    async with Client(settings) as client:
        submitting = asyncio.create_task(submit_spread(client, requests, 20.0))
        end = time.monotonic() + 60
        while len(starts(log) if log.exists() else []) < 100:  # the children are mid-stream: kill one now
            assert time.monotonic() < end, f"the children never started 100 steps:\n{sup.text()[-3000:]}"
            await asyncio.sleep(0.1)
        before = sup.children()
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        end = time.monotonic() + 30
        while len(after := sup.children()) < 2 or before[0] in after:
            assert time.monotonic() < end, f"the killed child was never restarted:\n{sup.text()[-3000:]}"
            await asyncio.sleep(0.1)
        ids = await submitting
        # the restarted child has its partitions (a slow start under load may miss the first runs): more
        end = time.monotonic() + 120
        while sup.text().count("worker ready: partitions") < 3:
            assert time.monotonic() < end, f"the restarted child never got ready:\n{sup.text()[-3000:]}"
            await asyncio.sleep(0.1)
        more = [RunRequest(workflow="fork", input={"n": i}, run_id=f"p{i}") for i in range(1_000, 1_200)]
        ids += await submit_spread(client, more, 4.0)
        states = await client.wait_terminal(ids, wait_s=90)
    assert sup.proc.poll() is None
    assert "died (signal SIGKILL" in sup.text()
    assert {s.status for s in states.values()} == {"completed"}
    wf = load_workflow(sup.wf)
    n = len(requests) + len(more)
    events, records = await checked_history(broker, prefix, settings, wf, n, replayed=False)
    counts = check_starts(log, events, records)
    pids = {s["pid"] for s in starts(log)}
    assert before[0] in pids and before[1] in pids and set(after) - set(before) <= pids, (pids, after)
    print(f"agent starts: {counts}; pids {sorted(pids)}")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(60) == 0
