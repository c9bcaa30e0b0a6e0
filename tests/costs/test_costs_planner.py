"""The planner learns from the cost table, end to end: a real worker, aggregator and broker, scripted models.

The cheap model (a pydantic-ai FunctionModel) answers 30% of the step's inputs with text instead of its
output, an invalid output that escalates the step to the smart model. Once the window holds enough
attempts, a new run of the step starts on the smart model; the run's ``step.model_chosen`` event says why,
with the figures stamped on its request, and re-deciding the recorded inputs makes the same choice.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

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

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.cli import app
from calmrun.client import Client
from calmrun.costs.fold import PartitionFold
from calmrun.costs.peek import wire_dict
from calmrun.costs.planner import forecast
from calmrun.costs.process import AggregatorProcess
from calmrun.costs.table import CostTable
from calmrun.costs.totals import read_current
from calmrun.settings import load_settings
from calmrun.workflow.decider import decide
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunEvent, RunRequest, StepCost
from calmrun.workflow.history import inputs_from_events
from tests.runtime_support import Item, ready, running, until

FIRST = 40  # runs before the choice can be made: cheap 40 attempts (28 accepted), smart 12


class Label(BaseModel):
    label: str


def _n(messages: list[ModelMessage]) -> int:
    for m in messages:
        if isinstance(m, ModelRequest):
            for part in m.parts:
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    return int(json.loads(part.content)["n"])
    raise AssertionError("no prompt")


def _label(info: AgentInfo, text: str) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, {"label": text})])


def cheap(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Fails 30% of the inputs: n % 10 in (0, 1, 2) gets prose instead of the output tool call."""
    if _n(messages) % 10 < 3:
        return ModelResponse(parts=[TextPart("I think it is probably fine?")])
    return _label(info, "cheap")


def smart(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return _label(info, "smart")


label_agent = Agent(output_type=Label, retries=0)


async def labeler(ctx: StepContext, item: Item) -> Label:
    result = await ctx.run(label_agent, json.dumps({"n": item.n}))
    return result.output


WORKFLOW = {
    "name": "planned",
    "steps": [
        {
            "name": "label",
            "agent": "labeler",
            "input": {"n": "input.n"},
            "models": ["cheap", "smart"],
            "choose": {"cheapest_meeting": {"success_rate": 0.95, "min_attempts": 10, "window_s": 3600}},
        }
    ],
}


def settings(broker: str, prefix: str) -> Any:
    fn = "function:tests.costs.test_costs_planner"
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        costs={"emit_interval_s": 0.1, "session_timeout_s": 6},
        models={
            "cheap": {"model": f"{fn}:cheap", "price_in_per_mtok": 1, "price_out_per_mtok": 1},
            "smart": {"model": f"{fn}:smart", "price_in_per_mtok": 20, "price_out_per_mtok": 20},
        },
    )


async def test_a_step_starts_on_the_next_rung_once_the_cheap_one_is_seen_failing(
    broker: str, prefix: str
) -> None:
    s = settings(broker, prefix)
    wf = parse_workflow(WORKFLOW)
    agents = AgentRegistry({"labeler": labeler})
    with AggregatorProcess(s):
        async with running(s, [wf], agents, ModelRegistry(s.models)) as w, Client(s) as client:
            await ready(w)
            ids = await client.submit_many(
                RunRequest(workflow="planned", run_id=f"a{n:02d}", input={"n": n}) for n in range(FIRST)
            )
            states = await client.wait_terminal(ids, wait_s=120)
            assert {st.status for st in states.values()} == {"completed"}
            early = await client.events("a00")

            await read_current(s, wait=True, wait_s=60)  # the table covers every event so far
            stats = w.stamps.step_stats
            assert stats is not None

            def seen(alias: str) -> int:
                return int(stats.alias_figures("planned", "label", alias, _now(), 3600)["attempts"])

            await until(
                lambda: (seen("cheap"), seen("smart")) == (FIRST, 12),
                30,
                "the worker's figures of the first runs",
            )
            late_id = await client.submit(RunRequest(workflow="planned", run_id="late", input={"n": 0}))
            late_state = (await client.wait_terminal([late_id], wait_s=60))[late_id]
            late = await client.events("late")
            await read_current(s, wait=True, wait_s=60)  # folded before the aggregator stops

    # before the window had enough attempts: the ladder from the cheap rung, and why
    [chosen] = [e.data for e in early if e.type == "step.model_chosen"]
    assert (chosen["model"], chosen["rung"]) == ("cheap", 0)
    assert "fewer than 10" in chosen["why"]
    assert [e.data["model"] for e in early if e.type == "step.scheduled"] == ["cheap", "smart"]  # n=0 fails

    # after: cheap is seen at 28/40 = 0.7, smart at 12/12; the run starts on smart, no escalation
    [chosen] = [e.data for e in late if e.type == "step.model_chosen"]
    assert (chosen["model"], chosen["rung"]) == ("smart", 1)
    assert chosen["why"] == "smart: success rate 1.000 over 12 attempts meets 0.95"
    figures = chosen["figures"]
    assert (figures["cheap"]["attempts"], figures["cheap"]["accepted"]) == (40, 28)
    assert (figures["smart"]["attempts"], figures["smart"]["accepted"]) == (12, 12)
    assert Decimal(figures["smart"]["mean_cost_usd"]) > Decimal(figures["cheap"]["mean_cost_usd"]) > 0
    assert [e.data["model"] for e in late if e.type == "step.scheduled"] == ["smart"]
    assert not [e for e in late if e.type == "step.escalated"]
    assert late_state.steps["label"].output == {"label": "smart"}
    requested = next(e for e in late if e.type == "run.requested")
    assert requested.data["model_stats"] == {"label": figures}  # stamped on the recorded input

    # replay: re-deciding the recorded request makes the same choice from the same figures
    first = inputs_from_events(late)[0]
    again = decide(wf, None, first)
    assert again.state is not None and again.state.start_rungs == {"label": 1}
    assert [e.data for e in again.events if e.type == "step.model_chosen"] == [chosen]

    # the figures and the forecast through the CLI
    runner = CliRunner()
    common = ["--bootstrap", broker, "--prefix", prefix]
    res = await asyncio.to_thread(
        runner.invoke, app, ["costs", "--by", "step", "--window", "1h", "--json", "--wait", *common]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = {r["value"]: r for r in out["rows"]}
    assert rows["planned/label/cheap"]["attempts"] == FIRST and rows["planned/label/cheap"]["escalated"] == 12
    assert rows["planned/label/smart"]["attempts"] == 13
    assert out["coverage"]["lag_events"] == 0
    res = await asyncio.to_thread(
        runner.invoke, app, ["costs", "forecast", "-w", "planned", "--json", *common]
    )
    assert res.exit_code == 0, res.output
    fc = json.loads(res.stdout)
    assert fc["runs"] == FIRST + 1
    paths = {p["path"]: p for p in fc["paths"]}
    assert paths["label/cheap"]["share"] == FIRST / (FIRST + 1)
    assert paths["label/smart"]["share"] == 13 / (FIRST + 1)
    expected = Decimal(fc["expected_usd"])
    assert Decimal(fc["p10_usd"]) <= expected <= Decimal(fc["p90_usd"])
    assert abs(sum(Decimal(p["cost_per_run_usd"]) for p in fc["paths"]) - expected) < Decimal("1e-15")


def _now() -> int:
    import time

    return time.time_ns() // 1_000_000


def _ev(run: str, seq: int, type: str, step: str, data: dict[str, Any], usd: str | None = None) -> RunEvent:
    cost = StepCost(model="fast", tokens_in=10, cost_usd=Decimal(usd)) if usd is not None else None
    return RunEvent(
        run_id=run,
        seq=seq,
        type=type,
        at_ms=1_000_000 + seq,
        workflow="invoices",
        step=step,
        attempt=1,
        data=data,
        cost=cost,
    )


def _invoice_run(run: str, lines: int, drafts: int) -> list[RunEvent]:
    """A map over ``lines`` elements at $0.01 each, then a loop of ``drafts`` iterations of draft ($0.1)."""
    evs = [_ev(run, 1, "step.mapped", "match", {"size": lines, "max_concurrency": 8})]
    evs += [_ev(run, 2 + e, "step.succeeded", "match", {"kind": "run"}, "0.01") for e in range(lines)]
    seq = 2 + lines
    for i in range(drafts):
        if i:
            body = {"iteration": i, "to": "draft", "body": ["draft"]}
            evs.append(_ev(run, seq, "step.looped", "enough", body))
            seq += 1
        evs.append(_ev(run, seq, "step.succeeded", "draft", {"kind": "run"}, "0.1"))
        seq += 1
    return evs


def test_forecast_takes_loop_iterations_and_map_widths_from_the_table() -> None:
    """Four runs: 2, 4, 6, 8 invoice lines and 1, 1, 2, 4 drafts. The forecast has each path's visits per
    run (mean elements, mean iterations) and attempts per visit, the loop's and map's mean and max, and
    ``visits`` moves the expected cost to a width or an iteration count not seen (each event copied twice
    counts once)."""
    fold = PartitionFold(0, {})
    shapes = [(2, 1), (4, 1), (6, 2), (8, 4)]
    events = [e for i, (lines, drafts) in enumerate(shapes) for e in _invoice_run(f"r{i}", lines, drafts)]
    for off, e in enumerate(events + events):
        fold.apply(wire_dict(e), off)
    table = CostTable()
    for key, value in fold.drain()[0]:
        table.apply(key, value)
    f = forecast(table, "invoices")
    assert f.runs == 4 and f.expected == Decimal("0.2") + Decimal("0.05")  # 2 drafts, 5 lines on average
    lines = {p.path: p for p in f.paths}
    assert (lines["match/fast"].visits_per_run, lines["match/fast"].attempts_per_visit) == (5.0, 1.0)
    assert (lines["draft/fast"].visits_per_run, lines["draft/fast"].attempts_per_visit) == (2.0, 1.0)
    assert [(x.step, x.kind, x.runs, x.mean, x.most) for x in f.shapes] == [
        ("draft", "loop", 4, 2.0, 4),
        ("match", "map", 4, 5.0, 8),
    ]
    what_if = forecast(table, "invoices", visits={"match": 40, "draft": 3})
    assert what_if.expected == Decimal("0.3") + Decimal("0.4")  # 3 drafts, 40 lines
    assert what_if.as_json()["assumed"] == {"match": 40, "draft": 3}
