"""The triage example with its model steps in a pool and its ``notify`` step in another, each served by
its own process: ``calmrun worker --pool models`` and the calmrun-free ``notify_executor.py`` (plain
aiokafka and fastavro). The deciding worker executes only the steps that name no pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.settings import load_settings
from calmrun.workflow.definition import load_workflow
from calmrun.workflow.events import RunRequest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "triage"
MODEL_STEPS = ("classify", "sentiment", "decide")


def pooled_triage(path: Path) -> Path:
    data = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())
    for step in data["steps"]:
        if step["name"] in MODEL_STEPS:
            step["pool"] = "models"
        elif step["name"] == "notify":
            step["pool"] = "notify"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def children(tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Processes this test spawns (any command, unlike the ``procs`` worker fixture); SIGTERM at the end."""
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield running
    finally:
        for p in running.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in running.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def spawn(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - the process holds it until it ends
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


async def test_triage_with_a_model_pool_and_a_calmrun_free_executor(
    broker: str, prefix: str, tmp_path: Path, children: dict[str, subprocess.Popen[bytes]]
) -> None:
    wf_path = pooled_triage(tmp_path / "triage.yaml")
    common = ["-w", str(wf_path), "--config", str(EXAMPLE / "models.yaml"), "--bootstrap", broker]
    common += ["--prefix", prefix]
    children["worker"] = spawn(tmp_path, "worker", "-m", "calmrun.cli", "worker", *common)
    children["models"] = spawn(tmp_path, "models", "-m", "calmrun.cli", "worker", "--pool", "models", *common)
    script = str(EXAMPLE / "notify_executor.py")
    children["notify"] = spawn(tmp_path, "notify", script, "--bootstrap", broker, "--prefix", prefix)
    settings = load_settings(EXAMPLE / "models.yaml", kafka={"bootstrap": broker, "prefix": prefix})
    tickets = [json.loads(line) for line in (EXAMPLE / "tickets.jsonl").read_text().splitlines() if line]
    requests = [RunRequest(workflow="triage", input=t, run_id=f"t{i}") for i, t in enumerate(tickets)]
    async with Client(settings) as client:
        ids = await client.submit_many(requests)
        try:
            states = await client.wait_terminal(ids, wait_s=120)
        except Exception:
            for name in children:
                print(name, (tmp_path / f"{name}.log").read_text()[-2000:])
            raise
        events = {rid: await client.events(rid) for rid in ids}
    for name, p in children.items():
        assert p.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-2000:]}"
    assert {s.status for s in states.values()} == {"completed"}
    refunded = [s for s in states.values() if s.outcome == "refunded"]
    assert refunded, "no ticket took the refund path, so notify never ran"
    for s in refunded:
        out: Any = s.steps["notify"].output
        assert out["message_id"] == f"msg-{s.steps['refund'].output['refund_id']}"  # type: ignore[index]
        [done] = [e for e in events[s.run_id] if e.type == "step.succeeded" and e.step == "notify"]
        assert done.cost is not None and done.cost.agent == "notify_executor.py"
    for rid in ids:  # the model steps' costs came back from the pool with their tokens
        [cls] = [e for e in events[rid] if e.type == "step.succeeded" and e.step == "classify"]
        assert cls.cost is not None and cls.cost.tokens_in > 0 and cls.cost.model == "fast"
    report = await check_history(settings.kafka, [load_workflow(wf_path)])
    assert report.ok and report.runs == len(ids), report.summary()
