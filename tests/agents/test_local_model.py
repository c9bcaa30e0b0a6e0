"""A real language model inside calmrun: SmolLM2-135M-Instruct behind llama.cpp, the project's broker.

The ``local_model`` fixture installs the pinned server and model (``calmrun.devmodel``; ``make test`` has
done it already) and starts one server for the session; it fails, never skips, when that is impossible.
The triage example runs on it with ``examples/triage/models.local.yaml``, changed only in the server's port,
and a deliberately strict step shows a real model's invalid output retried, escalated and quarantined.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml
from pydantic import BaseModel, Field
from pydantic_ai import Agent, ModelRetry, PromptedOutput, RunContext

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.devmodel import DevModel, install
from calmrun.errors import DevModelError
from calmrun.localproc import free_port as free_http_port
from calmrun.settings import load_settings
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import ready, running

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triage"
MODEL_STEPS = ("classify", "sentiment", "decide")
MODEL_TIMEOUT_S = 120
"""The model steps' timeout here (the example's are 10-30 s, set for a hosted model): llama.cpp on two busy
cores took over 20 s for one classify in CI (5.7 s p50 when quiet), and a timed-out request reports no
usage, so the example's own timeouts would test the machine's load, not calmrun."""


@pytest.fixture(scope="session")
def local_model() -> Iterator[DevModel]:
    """One llama.cpp server of the installed SmolLM2 model on a free port, for the whole session."""
    try:
        install()
    except DevModelError as exc:
        pytest.fail(f"the local model could not be installed (make local-model): {exc}")
    server = DevModel(data_dir=Path(tempfile.mkdtemp(prefix="calmrun-test-model-")), port=free_http_port())
    try:
        server.start()
    except DevModelError as exc:
        pytest.fail(f"the local model server did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


def test_launcher_knows_its_server(local_model: DevModel) -> None:
    pid = local_model.running_pid()
    assert pid is not None and local_model.answers()
    assert Path(f"/proc/{pid}/cwd").resolve() == local_model.data_dir.resolve()
    with pytest.raises(DevModelError, match="already runs"):
        local_model.start()
    other = DevModel(data_dir=local_model.data_dir.parent / "not-started", port=free_http_port())
    assert other.running_pid() is None and not other.stop() and not other.answers(timeout=0.5)


def triage_on_a_busy_machine() -> WorkflowDef:
    """The triage example, its model steps given ``MODEL_TIMEOUT_S``; nothing else changed."""
    raw = yaml.safe_load((EXAMPLE / "workflow.yaml").read_text())
    for step in raw["steps"]:
        if step["name"] in MODEL_STEPS:
            step["timeout_s"] = MODEL_TIMEOUT_S
    return parse_workflow(raw)


def workflow_bound_s(workflow: WorkflowDef, runs: int) -> float:
    """How long ``runs`` runs may take, one attempt at a time, by the workflow's own bounds: every model
    step's every attempt up to its timeout. A wait shorter than that would bound the machine's speed, not
    calmrun's promise (each run is decided); on a quiet machine the runs take a minute or two."""
    steps = [s for s in workflow.steps if s.name in MODEL_STEPS]
    return runs * sum((s.timeout_s or MODEL_TIMEOUT_S) * s.retry.max_attempts for s in steps) + 60


def _settings(broker: str, prefix: str, config: Path, server: DevModel, aliases: list[str]) -> Any:
    """The example's configuration file, with the Kafka prefix of this test and the fixture's server port."""
    return load_settings(
        config,
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        # one attempt at a time: llama.cpp's server answers one request at a time, so concurrent attempts
        # would only queue there (and the measured latency would be the queue's)
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1, "max_in_flight": 1},
        models={a: {"base_url": server.base_url, "timeout_s": MODEL_TIMEOUT_S} for a in aliases},
    )


def _tickets(ids: set[str]) -> list[dict[str, Any]]:
    import json

    lines = (EXAMPLE / "tickets.jsonl").read_text().splitlines()
    return [t for t in map(json.loads, lines) if t["ticket_id"] in ids]


def step_report(events: list[RunEvent]) -> str:
    """Latency per model step and generation speed, from the attempts' recorded costs."""
    rows = []
    for step in MODEL_STEPS:
        costs = [e.cost for e in events if e.step == step and e.type in ("step.succeeded", "step.failed")]
        costs = [c for c in costs if c is not None and c.requests > 0]
        if not costs:
            continue
        lat = [c.latency_ms for c in costs]
        tok_out = sum(c.tokens_out for c in costs)
        rows.append(
            f"{step}: {len(costs)} attempts, latency p50 {statistics.median(lat):.0f} ms "
            f"max {max(lat):.0f} ms, "
            f"tokens in/out {sum(c.tokens_in for c in costs)}/{tok_out}, "
            f"{tok_out / (sum(lat) / 1000):.0f} output tokens/s"
        )
    return "\n".join(rows)


async def test_triage_runs_on_the_local_model(broker: str, prefix: str, local_model: DevModel) -> None:
    settings = _settings(broker, prefix, EXAMPLE / "models.local.yaml", local_model, ["fast", "smart"])
    models = ModelRegistry(settings.models)
    ok, detail = await models.probe("fast")
    assert ok, detail
    workflow = triage_on_a_busy_machine()
    tickets = _tickets({"T-1001", "T-1002"})
    runs = {f"{t['ticket_id']}-{uuid4().hex[:6]}": t for t in tickets}
    async with running(settings, [workflow], AgentRegistry(), models) as worker, Client(settings) as client:
        await ready(worker)
        for run_id, ticket in runs.items():
            await client.submit(RunRequest(workflow="triage", run_id=run_id, input=ticket))
        states = await client.wait_terminal(runs, wait_s=workflow_bound_s(workflow, len(runs)))
        events = [e for e in await client.events() if e.run_id in runs and e.seq >= 0]

    print("\nlocal model inside calmrun:\n" + step_report(events))
    # every run ended (a tiny model may be wrong, but each run is decided: completed or quarantined)
    assert all(s.status in ("completed", "quarantined") for s in states.values()), states
    assert any(s.status == "completed" for s in states.values()), {r: s.error for r, s in states.items()}
    for run_id in runs:
        attempts = [
            e
            for e in events
            if e.run_id == run_id and e.step in MODEL_STEPS and e.type in ("step.succeeded", "step.failed")
        ]
        assert {e.step for e in attempts} >= {"classify", "sentiment"}
        for e in attempts:
            # real usage reported by the server, and the real time the attempt took
            assert e.cost is not None and e.cost.requests >= 1, e
            assert e.cost.tokens_in > 0 and e.cost.tokens_out > 0, e
            assert e.cost.latency_ms > 0 and e.cost.model in ("fast", "smart")
    done = [s for s in states.values() if s.status == "completed"]
    assert all(s.outcome in ("approved", "escalated", "refunded") for s in done)


class Digest(BaseModel):
    """Deliberately strict: a 135M model writes 64 hex digits, never the right ones."""

    ticket_id: str
    body_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the ticket body, hex")


class TicketIn(BaseModel):
    ticket_id: str
    body: str


# prompted output named here (not left to the alias): pydantic-ai takes no run-time output type on an agent
# with output validators
digest_agent = Agent(
    output_type=PromptedOutput(Digest),
    deps_type=TicketIn,
    name="digest",
    instructions="Return the ticket's ID and the SHA-256 digest of its body as 64 lowercase hex digits.",
    retries=0,  # one request per attempt: the time goes to calmrun's retries, not pydantic-ai's
)


@digest_agent.output_validator
def _digest_matches(ctx: RunContext[TicketIn], out: Digest) -> Digest:
    if out.body_sha256 != hashlib.sha256(ctx.deps.body.encode()).hexdigest():
        raise ModelRetry("body_sha256 is not the SHA-256 of the body: compute it exactly")
    return out


async def strict_digest(ctx: StepContext, ticket: TicketIn) -> Digest:
    """The strict step: the model's reply is checked against the real digest of the body."""
    return (await ctx.run(digest_agent, ticket.model_dump_json(), deps=ticket)).output


STRICT_TIMEOUT_S = 300
"""The strict step's timeout: a reply of 120 tokens took over 120 s once, on two cores kept busy by the suite
and a burner, and timed out instead of failing its check (what this test is about)."""


async def test_strict_output_fails_escalates_and_quarantines(
    broker: str, prefix: str, local_model: DevModel, tmp_path: Path
) -> None:
    config = tmp_path / "models.yaml"
    # two rungs on the same tiny model: schema-constrained JSON, then JSON with the schema only in the prompt
    config.write_text(
        "models:\n"
        "  tiny-a: {model: 'llamacpp:smollm2', output_mode: prompted, temperature: 0, max_tokens: 120}\n"
        "  tiny-b: {model: 'openai:smollm2', output_mode: prompted, temperature: 0.7, max_tokens: 120}\n"
    )
    settings = _settings(broker, prefix, config, local_model, ["tiny-a", "tiny-b"])
    workflow = parse_workflow(
        {
            "name": "strict",
            "steps": [
                {
                    "name": "digest",
                    "agent": "tests.agents.test_local_model:strict_digest",
                    "models": ["tiny-a", "tiny-b"],
                    "input": {"ticket_id": "input.ticket_id", "body": "input.body"},
                    "timeout_s": STRICT_TIMEOUT_S,
                    "retry": {"max_attempts": 2, "initial_backoff_s": 0.1},
                }
            ],
        }
    )
    (ticket,) = _tickets({"T-1001"})
    run_id = f"strict-{uuid4().hex[:6]}"
    models = ModelRegistry(settings.models)
    async with running(settings, [workflow], AgentRegistry(), models) as worker, Client(settings) as client:
        await ready(worker)
        await client.submit(RunRequest(workflow="strict", run_id=run_id, input=ticket))
        # tiny-a's one attempt and tiny-b's two, each up to its timeout: the workflow's own bound
        state = (await client.wait_terminal([run_id], wait_s=3 * STRICT_TIMEOUT_S + 60))[run_id]
        events = [e for e in await client.events(run_id) if e.seq >= 0]
        dlq = [r for r in await client.read_dlq("strict") if r.run_id == run_id]

    failed = [e for e in events if e.type == "step.failed"]
    # tiny-a's invalid reply escalates at once (a decision of the decider, in the audit log) ...
    escalated = [e for e in events if e.type == "step.escalated"]
    assert [(e.data["from"], e.data["to"], e.data["reason"]) for e in escalated] == [
        ("tiny-a", "tiny-b", "invalid_output")
    ]
    # ... tiny-b gets the retry policy's 2 attempts, then the run is quarantined with its cause
    assert [e.cost.model for e in failed if e.cost is not None] == ["tiny-a", "tiny-b", "tiny-b"]
    assert {e.data.get("error_type") for e in failed} == {"InvalidOutputError"}
    assert state.status == "quarantined" and state.error_type == "InvalidOutputError"
    (parked,) = dlq
    assert parked.error_type == "InvalidOutputError" and parked.step == "digest"
    # the failed attempts' tokens are counted
    for e in failed:
        assert e.cost is not None and e.cost.requests == 1 and e.cost.tokens_in > 0 and e.cost.tokens_out > 0
