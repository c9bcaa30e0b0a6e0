"""Live replay against the real broker: a run's agents run again in a shadow namespace on a substituted
scripted model, and the report shows the output, path, token and cost differences per step."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo
from typer.testing import CliRunner

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.cli.replay import replay_app
from calmrun.client import Client
from calmrun.replay import fetch_snapshot, fetch_snapshots, replay_live
from calmrun.settings import load_settings
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import ready, running


class Verdict(BaseModel):
    label: str
    score: int


judge: Agent[None, Verdict] = Agent(output_type=Verdict)


def _n(messages: list[ModelMessage]) -> int:
    for m in messages:
        if isinstance(m, ModelRequest):
            for p in m.parts:
                if isinstance(p, UserPromptPart) and isinstance(p.content, str):
                    return int(json.loads(p.content)["n"])
    raise AssertionError("no prompt")


def model_a(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """The recorded model: big from 50 on."""
    n = _n(messages)
    args = {"label": "big" if n >= 50 else "small", "score": n}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, args)])


def model_b(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """The substitute: big from 25 on, scores double, and thinks aloud first (more tokens)."""
    n = _n(messages)
    args = {"label": "big" if n >= 25 else "small", "score": 2 * n}
    thought = TextPart("Let me weigh this ticket carefully before I decide on a label for it. " * 3)
    return ModelResponse(parts=[thought, ToolCallPart(info.output_tools[0].name, args)])


WORKFLOW: dict[str, Any] = {
    "name": "jl",
    "outcomes": ["big", "small"],
    "steps": [
        {
            "name": "judge",
            "agent": "tests.replay.test_replay_live:judge",
            "model": "fast",
            "input": {"n": "input.n"},
            "branches": [{"when": {"field": "label", "value": "big"}, "goto": "big"}],
            "next": "end:small",
        },
        {
            "name": "big",
            "agent": "tests.runtime_support:add_one",
            "input": {"n": "steps.judge.score"},
            "next": "end:big",
        },
    ],
}
PRICES = {"price_in_per_mtok": "1.0", "price_out_per_mtok": "4.0"}


def models(fn: str) -> dict[str, Any]:
    return {"fast": {"model": f"function:tests.replay.test_replay_live:{fn}", **PRICES}}


def settings(broker: str, prefix: str, fn: str) -> Any:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        models=models(fn),
    )


async def test_live_replay_on_a_substituted_model_reports_differences(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    wf = parse_workflow(WORKFLOW)
    prod = settings(broker, prefix, "model_a")
    async with running(prod, [wf], AgentRegistry(), ModelRegistry(prod.models)) as w, Client(prod) as c:
        await ready(w)
        ids = await c.submit_many(
            RunRequest(workflow="jl", input={"n": n}, run_id=f"j-{n}") for n in (10, 30, 60)
        )
        original = await c.wait_terminal(ids, wait_s=60)
    assert [original[i].outcome for i in ids] == ["small", "small", "big"]

    snaps = await fetch_snapshots(prod, workflow="jl")
    sub = settings(broker, prefix, "model_b")
    reports = await replay_live(
        sub, snaps, [wf], AgentRegistry(), ModelRegistry(sub.models), shadow=f"{prefix}-live"
    )
    by_run = {r.run_id: r for r in reports}
    r30 = by_run["j-30"]
    assert (r30.original_outcome, r30.replay_outcome) == ("small", "big")
    assert r30.original_path == ["judge", "end:small"] and r30.replay_path == ["judge", "big", "end:big"]
    judge_step = next(s for s in r30.steps if s.step == "judge")
    assert judge_step.original is not None and judge_step.replay is not None
    assert judge_step.original.output == {"label": "small", "score": 30}
    assert judge_step.replay.output == {"label": "big", "score": 60}
    assert not judge_step.same_output
    assert judge_step.replay.tokens_out > judge_step.original.tokens_out
    big = next(s for s in r30.steps if s.step == "big")
    assert (
        big.original is None and big.replay is not None and big.replay.output == {"n": 61, "label": "big:1"}
    )
    r10 = by_run["j-10"]
    assert r10.same_path and not r10.same_outputs and r10.tokens_delta > 0
    # money follows the tokens wherever the worker prices them
    if judge_step.original.cost_usd > 0:
        assert r30.cost_delta_usd > 0
    # production was not touched: its runs keep their recorded outputs
    again = await fetch_snapshot(prod, "j-30")
    assert again.state is not None and again.state.outcome == "small"

    # the same through the CLI, one run, the model substituted by --model
    wf_file = tmp_path / "jl.yaml"
    wf_file.write_text(yaml.safe_dump(WORKFLOW))
    app = typer.Typer()
    app.add_typer(replay_app, name="replay")
    app.command("noop")(lambda: None)
    res = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        [
            "replay",
            "run",
            "j-60",
            "--mode",
            "live",
            "-w",
            str(wf_file),
            "-b",
            broker,
            "--prefix",
            prefix,
            "--model",
            "fast=function:tests.replay.test_replay_live:model_b",
            "--shadow",
            f"{prefix}-cli",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["same_path"] is True and out["same_outputs"] is False and out["tokens_delta"] > 0
    assert out["replay_outcome"] == "big" and out["shadow"] == f"{prefix}-cli"
