"""Recorded replay against the real broker: 200 runs converge, a changed transition diverges where it
should, a snapshot file replays with no broker at all."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import typer
import yaml
from typer.testing import CliRunner

from calmrun.agents import AgentRegistry
from calmrun.cli.replay import replay_app, snapshot
from calmrun.client import Client
from calmrun.replay import (
    fetch_snapshot,
    fetch_snapshots,
    load_snapshot,
    replay_recorded,
    replay_recorded_many,
)
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, ready, running, settings_for

RUNS = 200


def branching(threshold: int = 100, version: str = "1") -> dict[str, Any]:
    """s1 adds one, then routes on its output: n >= threshold -> big, else small."""
    return {
        "name": "rp",
        "version": version,
        "outcomes": ["big", "small"],
        "steps": [
            {
                "name": "s1",
                "agent": "add_one",
                "input": {"n": "input.n"},
                "branches": [{"when": {"field": "n", "op": "ge", "value": threshold}, "goto": "big"}],
                "next": "small",
            },
            {"name": "big", "agent": "add_one", "input": {"n": "steps.s1.n"}, "next": "end:big"},
            {"name": "small", "agent": "add_one", "input": {"n": "steps.s1.n"}, "next": "end:small"},
        ],
    }


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(replay_app, name="replay")
    app.command("snapshot")(snapshot)
    return app


@pytest.fixture(scope="module")
def recorded(broker: str) -> tuple[str, list[str]]:
    """RUNS completed runs of ``rp`` (n = 0..RUNS-1) under a prefix of this module's own."""
    prefix = f"t{uuid4().hex[:10]}"
    settings = settings_for(broker, prefix)
    wf = parse_workflow(branching())

    async def main() -> list[str]:
        async with running(settings, [wf], AgentRegistry({"add_one": add_one})) as w, Client(settings) as c:
            await ready(w)
            ids = await c.submit_many(
                RunRequest(workflow="rp", input={"n": i}, run_id=f"run-{i:03d}") for i in range(RUNS)
            )
            states = await c.wait_terminal(ids, wait_s=120)
        assert {s.status for s in states.values()} == {"completed"}
        return ids

    return prefix, asyncio.run(main())


def test_recorded_replay_of_all_runs_converges(broker: str, recorded: tuple[str, list[str]]) -> None:
    prefix, ids = recorded
    snaps = asyncio.run(fetch_snapshots(settings_for(broker, prefix), workflow="rp"))
    assert sorted(s.run_id for s in snaps) == sorted(ids)
    batch = replay_recorded_many([parse_workflow(branching())], snaps)
    assert (batch.runs, batch.converged, batch.diverged, batch.errors) == (RUNS, RUNS, 0, 0)
    one = replay_recorded(parse_workflow(branching()), next(s for s in snaps if s.run_id == "run-150"))
    assert one.verdict == "converged"
    assert one.original_path == one.replay_path == ["s1", "big", "end:big"]


def test_changed_transition_diverges_at_the_routing_decision(
    broker: str, recorded: tuple[str, list[str]]
) -> None:
    prefix, _ = recorded
    snap = asyncio.run(fetch_snapshot(settings_for(broker, prefix), "run-070"))  # s1 gives 71: small
    changed = parse_workflow(branching(threshold=50, version="2"))  # 71 would now go to big
    r = replay_recorded(changed, snap)
    assert r.verdict == "diverged" and r.divergence is not None
    d = r.divergence
    assert d.decision == 1 and "'s1' attempt 1" in d.input  # the decision on s1's result
    routed = [e for e in d.original if e["type"] == "run.routed"]
    assert routed and d.seq == routed[0]["seq"]
    assert routed[0]["data"]["to"] == ["small"]
    assert [e["data"]["to"] for e in d.replay if e["type"] == "run.routed"] == [["big"]]
    assert r.original_path == ["s1", "small", "end:small"]

    # the same change is safe for runs that never reach the changed condition's other side
    same = replay_recorded(changed, asyncio.run(fetch_snapshot(settings_for(broker, prefix), "run-020")))
    assert same.verdict == "converged"
    # the batch counts: s1 gives n+1, so runs with 49 <= n < 99 take the other branch now
    snaps = asyncio.run(fetch_snapshots(settings_for(broker, prefix), workflow="rp"))
    batch = replay_recorded_many([changed], snaps)
    assert (batch.converged, batch.diverged) == (RUNS - 50, 50)
    assert {r.run_id for r in batch.divergent} == {f"run-{i:03d}" for i in range(49, 99)}


def test_cli_snapshot_file_replays_without_a_broker(
    broker: str, recorded: tuple[str, list[str]], tmp_path: Path
) -> None:
    prefix, _ = recorded
    runner = CliRunner()
    file = tmp_path / "run-150.json"
    res = runner.invoke(cli(), ["snapshot", "run-150", "-o", str(file), "-b", broker, "--prefix", prefix])
    assert res.exit_code == 0, res.output
    snap = load_snapshot(file)
    assert snap.run_id == "run-150" and snap.state is not None and snap.state.outcome == "big"
    assert json.loads(file.read_text())["format"] == "calmrun.snapshot/1"

    v1, v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1.write_text(yaml.safe_dump(branching()))
    v2.write_text(yaml.safe_dump(branching(threshold=200, version="2")))
    nowhere = ["-b", "127.0.0.1:1"]  # no broker answers there: the file is all replay needs
    res = runner.invoke(cli(), ["replay", "run", str(file), "-w", str(v1), *nowhere])
    assert res.exit_code == 0, res.output
    assert "converged" in res.output
    res = runner.invoke(
        cli(),
        [
            "replay",
            "run",
            str(file),
            "-w",
            str(v1),
            "-w",
            str(v2),
            "--workflow-version",
            "2",
            "--json",
            *nowhere,
        ],
    )
    assert res.exit_code == 3, res.output
    report = json.loads(res.output)
    assert report["verdict"] == "diverged" and report["divergence"]["decision"] == 1
    assert report["replay_version"] == "2"

    res = runner.invoke(cli(), ["replay", "run", str(file), *nowhere])
    assert res.exit_code == 2 and "--workflow FILE" in res.output


def test_cli_batch_recorded_replay(broker: str, recorded: tuple[str, list[str]], tmp_path: Path) -> None:
    prefix, _ = recorded
    v1 = tmp_path / "v1.yaml"
    v1.write_text(yaml.safe_dump(branching()))
    res = CliRunner().invoke(
        cli(),
        [
            "replay",
            "runs",
            "-w",
            str(v1),
            "--since",
            "2000-01-01T00:00:00Z",
            "-b",
            broker,
            "--prefix",
            prefix,
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert (out["runs"], out["converged"], out["diverged"]) == (RUNS, RUNS, 0)
    res = CliRunner().invoke(
        cli(),
        [
            "replay",
            "runs",
            "-w",
            str(v1),
            "--since",
            "2999-01-01T00:00:00Z",
            "-b",
            broker,
            "--prefix",
            prefix,
        ],
    )
    assert res.exit_code == 1 and "no run of 'rp'" in res.output
