"""``calmrun worker -w FOLDER`` serving two versions, as an OS process killed with SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from calmrun.check.invariants import check_history
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from calmrun.workflow.state import RunState
from tests.runtime_support import settings_for, until
from tests.versions.support import V1, V2, by_reference, write_yaml

ROOT = Path(__file__).resolve().parents[2]


def worker(broker: str, prefix: str, log: Path, *workflows: Path) -> subprocess.Popen[bytes]:
    """A worker process; its ``gate`` steps wait until ``log``'s folder holds a file ``open``."""
    args = [a for w in workflows for a in ("-w", str(w))]
    return subprocess.Popen(
        [sys.executable, "-m", "calmrun.cli", "worker", *args, "-b", broker, "--prefix", prefix],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CALMRUN_KAFKA__PARTITIONS": "4",
            "CALMRUN_TEST_GATE": str(log.parent / "open"),
        },
    )


def steps_done(s: RunState) -> list[str]:
    return sorted(n for n, st in s.steps.items() if st.status == "succeeded")


@pytest.mark.fault
async def test_a_killed_v1_worker_restarted_on_a_folder_of_v1_and_v2(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    v1, v2 = by_reference(V1), by_reference(V2)
    folder = tmp_path / "workflows"
    folder.mkdir()
    only_v1 = write_yaml(v1, tmp_path / "v1.yaml")
    write_yaml(v1, folder / "pin-1.yaml")
    write_yaml(v2, folder / "pin-2.yaml")
    settings = settings_for(broker, prefix)
    log = tmp_path / "worker.log"
    proc = worker(broker, prefix, log, only_v1)
    try:
        async with Client(settings) as c:
            old = await c.submit_many(RunRequest(workflow="pin", input={"n": i}) for i in range(8))
            states: dict[str, RunState] = {}

            async def poll() -> None:
                states.update(await c.read_states())

            async def some_at_b() -> bool:
                await poll()
                return sum(1 for r in old if r in states and "b" in states[r].steps) >= 2

            loop = asyncio.get_running_loop()
            end = loop.time() + 90
            while not await some_at_b():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert loop.time() < end, "no run reached b"
                await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            await poll()
            assert not any(states[r].is_terminal() for r in old if r in states)  # killed mid-run
            (tmp_path / "open").touch()  # the restarted worker's gate lets runs through
            proc = worker(broker, prefix, log, folder)  # v1 and v2 from one folder
            new = await c.submit_many(RunRequest(workflow="pin", input={"n": 1}) for _ in range(3))
            done = await c.wait_terminal([*old, *new], wait_s=120)
        for r in old:
            assert (done[r].status, done[r].version, steps_done(done[r])) == (
                "completed",
                "1",
                ["a", "b", "c"],
            )
        for r in new:
            assert (done[r].status, done[r].version, steps_done(done[r])) == (
                "completed",
                "2",
                ["a", "b2", "c"],
            )
        await until(lambda: proc.poll() is None, 1, "the worker to be alive")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    report = await check_history(settings.kafka, [v1, v2])
    assert report.ok, report.summary()
