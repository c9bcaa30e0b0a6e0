"""An approval inside a tool call, answered after a restart of every worker (the real broker).

The agent (``durable_support.refunder``, its tool ``refund`` marked ``requires_approval``) runs in two
worker processes; the model is ``ScriptedModelServer`` in the test process, which counts every request.
The run waits on the tool call; both workers are killed with -9 and two new ones start; ``calmrun status``
names the tool call and its approver; ``calmrun approve`` (a separate process, as an operator runs it)
answers it. The same attempt resumes from its journal: the model is not asked again for what it answered
before, the tool runs once, and the recorded history re-decides.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from uuid import uuid4

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.kafka.topics import ensure_topics
from calmrun.workflow.events import RunRequest
from tests.agents.durable_support import ScriptedModelServer, charges_script, durable_settings, pay_flow
from tests.agents.test_durable_resume import _start
from tests.people.test_people_broker import wait_for, waiting

ROOT = Path(__file__).resolve().parents[2]


def _cli(broker: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calmrun.cli", *args, "--bootstrap", broker, "--prefix", prefix],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )


async def test_a_tool_approval_answered_after_every_worker_restarted(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    charges = tmp_path / "charges"
    env = {"DURABLE_CHARGES": str(charges)}
    run_id = f"refund-{uuid4().hex[:8]}"
    flow = pay_flow(agent="refunder", tool_approvers=["alice"])
    workers: list[subprocess.Popen[bytes]] = []

    def start_two(gen: int) -> None:
        for i in (1, 2):
            name = f"w{i}"
            args = ("--agent", "refunder", "--instance-id", f"{name}-{gen}", "--status-file")
            workers.append(_start(broker, prefix, url, tmp_path, env, *args, str(tmp_path / f"{name}.json")))

    with ScriptedModelServer(charges_script(1, tool="refund")) as server:
        url = server.base_url
        settings = durable_settings(broker, prefix, url)
        await ensure_topics(settings.kafka, [flow])
        try:
            start_two(1)
            async with Client(settings) as client:
                await client.submit(RunRequest(workflow="pay", run_id=run_id, input={"orders": 1}))
                s = await wait_for(client, run_id, waiting("pay"), "the tool call to wait", wait_s=120)
                assert s.steps["pay"].tool_approval is not None
                assert [c["tool"] for c in s.steps["pay"].tool_approval["pending"]] == ["refund"]
                asked_before = len(server.requests)
                assert asked_before == 1 and not charges.exists()
                for w in workers:  # every worker dies; the run rests in its state
                    w.send_signal(signal.SIGKILL)
                for w in workers:
                    w.wait(timeout=30)
                workers.clear()
                start_two(2)
                status = _cli(broker, prefix, "status", run_id)
                assert status.returncode == 0, status.stdout + status.stderr
                assert "waiting: pay for approval of tool call refund" in status.stdout, status.stdout
                assert "by alice" in status.stdout and "call_0" in status.stdout, status.stdout
                refused = _cli(broker, prefix, "approve", run_id, "--step", "pay", "--by", "mallory")
                assert refused.returncode == 0  # sent; the worker ignores it (not an approver)
                done = _cli(broker, prefix, "approve", run_id, "--step", "pay", "--by", "alice")
                assert done.returncode == 0, done.stdout + done.stderr
                states = await client.wait_terminal([run_id], wait_s=180)
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                assert w.wait(timeout=60) == 0
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait(timeout=30)

    final = states[run_id]
    assert final.status == "completed", final
    assert final.steps["pay"].attempt == 1  # the same attempt, resumed with the answer
    assert final.steps["pay"].output == {"output": "charged 1 orders"}
    assert Counter(charges.read_text().splitlines()) == {"refund 0": 1}
    # the first model request was answered from the journal: the server saw each request once
    digests = server.digests()
    assert len(digests) == 2 and len(set(digests)) == 2
    assert server.requests[1]["messages"][-1]["role"] == "tool"
    report = await check_history(settings.kafka, [flow])
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations[:10])
    async with Client(settings) as client:
        events = await client.events(run_id)
    kinds = [e.type for e in events]
    assert "step.approved" in kinds and "step.reissued" in kinds
    # the pause reported the first request, the resumed attempt the second: each counted once
    costs = [e.cost.requests for e in events if e.type in ("step.failed", "step.succeeded") and e.cost]
    assert costs == [1, 1]
    ignored = [e for e in events if e.type == "input.ignored"]
    assert any("mallory" in str(e.data.get("reason")) for e in ignored)
