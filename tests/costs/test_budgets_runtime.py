"""Budgets and model escalation through a real worker and broker: the decider's decisions, end to end."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.costs.process import AggregatorProcess
from calmrun.errors import InvalidOutputError
from calmrun.settings import load_settings
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, linear, ready, running, until


async def charge(ctx: StepContext, item: Item) -> Out:
    ctx.count_api_call(kind="charge")  # priced at 0.004 USD below
    return Out(n=item.n + 1)


def settings(broker: str, prefix: str, **extra: object):  # type: ignore[no-untyped-def]
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        prices={"api_calls": {"charge": "0.004"}},
        models={"cheap": {"model": "test"}, "smart": {"model": "test"}},
        **extra,
    )


async def test_run_over_budget_stops_before_the_step_that_would_exceed_it(broker: str, prefix: str) -> None:
    s = settings(broker, prefix)
    wf = linear("paid", steps=3, agent="charge", estimated_cost_usd="0.004")
    async with running(s, [wf], AgentRegistry({"charge": charge})) as w, Client(s) as client:
        await ready(w)
        ids = await client.submit_many(
            [
                RunRequest(workflow="paid", run_id="tight", input={"n": 0}, budget_usd=Decimal("0.010")),
                RunRequest(workflow="paid", run_id="roomy", input={"n": 0}, budget_usd=Decimal("1")),
            ]
        )
        states = await client.wait_terminal(ids, wait_s=60)
        events = await client.events("tight")
        dlq = await client.read_dlq("paid")
    tight = states["tight"]
    assert (tight.status, tight.spent_usd) == ("over_budget", Decimal("0.008"))
    assert tight.steps["s3"].status == "cancelled" and tight.steps["s3"].attempt == 0
    over = [e for e in events if e.type == "run.over_budget"]
    assert len(over) == 1 and over[0].step == "s3"
    assert over[0].data == {"spent_usd": "0.008", "budget_usd": "0.010", "estimated_usd": "0.004"}
    assert [(d.run_id, d.error_type, d.step) for d in dlq] == [("tight", "OverBudget", "s3")]
    assert (states["roomy"].status, states["roomy"].spent_usd) == ("completed", Decimal("0.012"))


class Verdict(BaseModel):
    label: str
    confidence: float


async def picky(ctx: StepContext, item: Item) -> Verdict:
    if ctx.model_alias == "cheap" and item.n % 2 == 0:
        raise InvalidOutputError("picky", "the cheap model's JSON did not parse")
    return Verdict(label=f"by {ctx.model_alias}", confidence=0.4 if ctx.model_alias == "cheap" else 0.9)


async def test_escalation_moves_up_the_model_ladder_and_says_why(broker: str, prefix: str) -> None:
    s = settings(broker, prefix)
    wf = parse_workflow(
        {
            "name": "ladder",
            "steps": [
                {
                    "name": "judge",
                    "agent": "picky",
                    "models": ["cheap", "smart"],
                    "input": {"n": "input.n"},
                    "confidence_field": "confidence",
                    "min_confidence": 0.5,
                }
            ],
        }
    )
    agents = AgentRegistry({"picky": picky})
    async with running(s, [wf], agents, ModelRegistry(s.models)) as w, Client(s) as client:
        await ready(w)
        ids = await client.submit_many(
            RunRequest(workflow="ladder", run_id=f"j{n}", input={"n": n}) for n in (0, 1)
        )
        states = await client.wait_terminal(ids, wait_s=60)
        ev0, ev1 = await client.events("j0"), await client.events("j1")
    for st in states.values():
        assert st.status == "completed" and st.steps["judge"].output == {
            "label": "by smart",
            "confidence": 0.9,
        }
    [esc0] = [e.data for e in ev0 if e.type == "step.escalated"]
    [esc1] = [e.data for e in ev1 if e.type == "step.escalated"]
    assert (esc0["from"], esc0["to"], esc0["reason"]) == ("cheap", "smart", "invalid_output")
    assert (esc1["from"], esc1["to"], esc1["reason"], esc1["confidence"]) == (
        "cheap",
        "smart",
        "low_confidence",
        0.4,
    )
    assert [e.data["model"] for e in ev1 if e.type == "step.scheduled"] == ["cheap", "smart"]


async def test_tenant_over_its_window_budget_is_refused(broker: str, prefix: str) -> None:
    s = settings(broker, prefix, budgets={"tenants": {"acme": {"usd": "0.005", "window": "1h"}}})
    wf = linear("paid", steps=2, agent="charge")
    with AggregatorProcess(s):
        async with running(s, [wf], AgentRegistry({"charge": charge})) as w, Client(s) as client:
            await ready(w)
            first = await client.submit(
                RunRequest(workflow="paid", run_id="a1", tenant="acme", input={"n": 0})
            )
            assert (await client.wait_terminal([first], wait_s=60))[first].status == "completed"
            assert w.stamps.tenant_spend is not None
            spend = w.stamps.tenant_spend
            await until(
                lambda: spend.spent("acme", "1h") >= Decimal("0.008"), 60, "the aggregator's tenant spend"
            )
            ids = await client.submit_many(
                [
                    RunRequest(workflow="paid", run_id="a2", tenant="acme", input={"n": 0}),
                    RunRequest(workflow="paid", run_id="b1", tenant="other", input={"n": 0}),
                ]
            )
            states = await client.wait_terminal(ids, wait_s=60)
            events = await client.events("a2")
    assert states["a2"].status == "refused" and states["a2"].error_type == "TenantBudgetExceeded"
    assert states["b1"].status == "completed"
    refused = [e for e in events if e.type == "run.refused"]
    assert refused[0].data == {"tenant": "acme", "spent_usd": "0.008", "budget_usd": "0.005", "window": "1h"}
    assert not [e for e in events if e.type == "step.scheduled"]
