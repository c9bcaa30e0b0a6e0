"""``calmrun replay run RUN --agents recorded``: a run's agents re-run from their journal, with no model.

A worker runs a multi-tool agent against ``ScriptedModelServer``; then the replay runs the agent again from
the journal on the real broker: it converges and the model server sees no new request. The same agent code
with another tool default makes another call at a recorded position, and the replay names it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import yaml
from pydantic_ai import Agent

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.client import Client
from calmrun.replay.agents import replay_agents
from calmrun.replay.snapshot import fetch_snapshot
from calmrun.streams.journal import KafkaJournal
from calmrun.workflow.events import RunRequest
from tests.agents.durable_support import ScriptedModelServer, charges_script, durable_settings, pay_flow
from tests.runtime_support import ready, running

ROOT = Path(__file__).resolve().parents[2]
CALLS = 4
REF = "tests.agents.durable_support:payer"


def _changed_payer() -> Agent[None, str]:
    """``payer`` after a code change: its tool now has a currency, so the recorded calls' arguments differ."""
    agent: Agent[None, str] = Agent(name="payer", instructions="Charge every order, then say so.")

    @agent.tool_plain
    def charge(order: int, currency: str = "eur") -> str:
        return f"order {order} charged in {currency}"

    return agent


async def test_agents_recorded_replay_converges_without_a_model_and_names_a_changed_call(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    run_id = f"pay-{uuid4().hex[:8]}"
    with ScriptedModelServer(charges_script(CALLS)) as server:
        settings = durable_settings(broker, prefix, server.base_url)
        async with (
            running(settings, [pay_flow()], AgentRegistry(), ModelRegistry(settings.models)) as worker,
            Client(settings) as client,
        ):
            await ready(worker)
            await client.submit(RunRequest(workflow="pay", run_id=run_id, input={"orders": CALLS}))
            states = await client.wait_terminal([run_id], wait_s=120)
        assert states[run_id].status == "completed"
        sent = len(server.requests)
        assert sent == CALLS + 1

        definition = tmp_path / "pay.yaml"
        definition.write_text(yaml.safe_dump(pay_flow().model_dump(mode="json", exclude_none=True)))
        done = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable, "-m", "calmrun.cli", "replay", "run", run_id, "-w", str(definition),
                "--agents", "recorded", "--json", "--bootstrap", broker, "--prefix", prefix,
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(server.requests) == sent  # zero model requests

    verdict = json.loads(done.stdout)
    assert verdict["verdict"] == "converged"
    (agent,) = verdict["agents"]
    assert agent["verdict"] == "converged", agent
    assert agent["agent"] == REF and agent["model_requests"] == 0
    assert agent["units"] == agent["answered"] == 2 * CALLS + 1

    # the same run against changed agent code: the first tool call differs at position 1
    snap = await fetch_snapshot(settings, run_id)
    journal = KafkaJournal(settings)
    try:
        records = await journal.records(run_id)
    finally:
        await journal.close()
    (changed,) = await replay_agents(records, snap.events, AgentRegistry({REF: _changed_payer()}))
    assert changed.verdict == "diverged" and changed.position == 1 and changed.model_requests == 0
    assert changed.reason is not None
    assert '"currency": "eur"' in changed.reason and "charge" in changed.reason
