"""The triage example end to end on a secured broker: over SASL_SSL (SCRAM-SHA-512) and over mTLS.

The user (``alice``) is no super user: ``calmrun acls --apply`` (run as ``admin``) gives her exactly the
ACLs of a worker, the cost aggregator and an operator for the test's prefix, and nothing else. The worker
and the aggregator run as her; the CLI verbs (``dlq tail``, ``replay run``, ``costs``) read a config file
whose SASL password is ``env:NAME``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.cli import app
from calmrun.cli.costs import batch_costs
from calmrun.client import Client
from calmrun.costs.process import AggregatorProcess
from calmrun.devkafka import DevKafka
from calmrun.kafka.topics import INVALID
from calmrun.settings import load_settings
from calmrun.workflow.definition import load_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import ready, running

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "triage"


def write_config(kafka: DevKafka, user: str, via: str, prefix: str, path: Path, env_name: str) -> Path:
    """A config file as an operator writes one: the password is a reference to an environment variable."""
    k = kafka.client_settings(user, via=via)  # type: ignore[arg-type]
    if via == "sasl":
        k["security"]["sasl"]["password"] = f"env:{env_name}"
    models = yaml.safe_load((EXAMPLE / "models.yaml").read_text())["models"]
    path.write_text(yaml.safe_dump({"kafka": {**k, "prefix": prefix}, "models": models}))
    return path


def cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"calmrun {' '.join(args)} -> {result.exit_code}: {result.output}"
    return result.output


@pytest.mark.parametrize("via", ["sasl", "mtls"])
async def test_triage_runs_end_to_end_on_a_secured_broker(
    secured: DevKafka,
    prefix: str,
    via: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    assert secured.secured is not None
    sys.path.insert(0, str(ROOT))
    monkeypatch.setenv("CALMRUN_TEST_ALICE_PW", secured.secured.passwords["alice"])
    monkeypatch.setenv("CALMRUN_TEST_ADMIN_PW", secured.secured.passwords["admin"])
    admin_cfg = write_config(
        secured, "admin", "sasl", prefix, tmp_path / "admin.yaml", "CALMRUN_TEST_ADMIN_PW"
    )
    cfg = write_config(secured, "alice", via, prefix, tmp_path / "alice.yaml", "CALMRUN_TEST_ALICE_PW")
    await asyncio.to_thread(
        cli, "acls", "--principal", "alice", "--role", "worker", "--role", "costs", "--role", "operator",
        "--apply", "--config", str(admin_cfg),
    )  # fmt: skip
    settings = load_settings(cfg, worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1})
    assert settings.kafka.security.protocol == ("SASL_SSL" if via == "sasl" else "SSL")

    wf = load_workflow(EXAMPLE / "workflow.yaml")
    tickets = [json.loads(line) for line in (EXAMPLE / "tickets.jsonl").read_text().splitlines() if line]
    aggregator = AggregatorProcess(settings, log=tmp_path / "aggregator.log")
    async with running(settings, [wf], AgentRegistry(), ModelRegistry(settings.models)) as w:
        await ready(w)
        aggregator.start()
        try:
            async with Client(settings) as c:
                ids = await c.submit_many(
                    RunRequest(workflow="triage", run_id=f"ticket-{i}", input=t)
                    for i, t in enumerate(tickets)
                )
                await c.producer.send_and_wait(c.topics.requests, b"\x00not a run request", key=b"poison")
                states = await c.wait_terminal(ids, wait_s=120)
            assert {s.status for s in states.values()} == {"completed"}, states
            table = await batch_costs(settings, wait_s=120)
            assert aggregator.alive(), (tmp_path / "aggregator.log").read_text()
        finally:
            aggregator.stop()
    assert any(r.cost_usd > 0 for r in table.rows("workflow", "all"))

    # the CLI, reading the same config file
    tail = await asyncio.to_thread(cli, "dlq", "tail", "-w", INVALID, "--json", "--config", str(cfg))
    parked = [json.loads(line) for line in tail.splitlines() if line.strip()]
    assert [r["source_topic"] for r in parked] == [f"{prefix}.runs.requests"], parked
    replayed = await asyncio.to_thread(
        cli, "replay", "run", ids[0], "-w", str(EXAMPLE / "workflow.yaml"), "--json", "--config", str(cfg)
    )
    assert json.loads(replayed)["verdict"] == "converged"
    costs = json.loads(
        await asyncio.to_thread(cli, "costs", "--by", "workflow", "--json", "--config", str(cfg))
    )
    assert [row["value"] for row in costs["rows"]] == ["triage"], costs
    password = secured.secured.passwords["alice"]
    assert password not in (tmp_path / "aggregator.log").read_text()
    assert caplog.records and password not in caplog.text
    assert password not in cfg.read_text() and password not in repr(settings)
