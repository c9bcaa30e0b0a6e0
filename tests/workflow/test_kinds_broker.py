"""The new step kinds against a real broker: the invoice reconciliation example end to end (a 200-line
map, a critique loop, an agent-chosen handler, a child workflow for disputes), each run ending as its
data says, then the history checker (which re-decides every run: iterations, map elements and the child
included) passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.check import check_history
from calmrun.client import Client
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import load_workflow
from calmrun.workflow.events import RunRequest
from tests.people.test_people_broker import ended, wait_for
from tests.runtime_support import ready, settings_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "invoices" / "workflow.yaml"


def lines(n: int, *, bad: int | None = None, qty: int = 2) -> list[dict[str, Any]]:
    skus = ["paper", "toner", "stapler"]
    price = {"paper": "4.50", "toner": "89.00", "stapler": "12.00"}
    out = [{"sku": skus[i % 3], "qty": qty, "unit_price": price[skus[i % 3]]} for i in range(n)]
    if bad is not None:
        out[bad] = {**out[bad], "unit_price": "99.99"}
    return out


async def test_invoice_reconciliation_end_to_end(broker: str, prefix: str) -> None:
    settings = settings_for(broker, prefix)
    wf, child = load_workflow(EXAMPLE), load_workflow(EXAMPLE.with_name("dispute.yaml"))
    worker = Worker(
        settings,
        [wf, child],
        AgentRegistry({}),
        ModelRegistry({}),
        metrics=WorkerMetrics(CollectorRegistry()),
    )
    plan = {
        "inv-paid": (lines(5), "paid"),
        "inv-disputed": (lines(7, bad=3), "disputed"),
        "inv-rejected": (lines(3, qty=1000), "rejected"),
        "inv-wide": (lines(200, qty=1), "paid"),
    }
    await worker.start()
    try:
        await ready(worker)
        async with Client(settings) as c:
            await c.submit_many(
                [
                    RunRequest(
                        workflow="invoices",
                        run_id=rid,
                        input={"invoice_id": rid, "vendor": "acme", "lines": ls},
                    )
                    for rid, (ls, _) in plan.items()
                ]
            )
            for rid, (ls, outcome) in plan.items():
                s = await wait_for(c, rid, ended, f"{rid} to end", wait_s=120)
                assert (s.status, s.outcome) == ("completed", outcome), (rid, s.status, s.error)
                match = s.steps["match"].output
                assert match is not None and [m["index"] for m in match["items"]] == list(range(len(ls)))
                # the loop: the first reconciliation is sent back once (review 0.5), the second accepted
                assert s.steps["reconcile"].iteration == 1 and s.steps["enough"].output == {
                    "iterations": 2,
                    "until": True,
                }
                assert s.steps["match"].map is not None and s.steps["match"].map.running == {}
            disputed = await c.state("inv-disputed")
            assert disputed is not None and disputed.steps["reconcile"].output is not None
            assert disputed.steps["reconcile"].output["disputed"] == [3]
            assert "line 3: billed 99.99, agreed 4.50" in disputed.steps["reconcile"].output["summary"]
            # the child run: its own ID, history and state; its end routed the parent
            kid = await c.state("inv-disputed.dispute")
            assert kid is not None and (kid.status, kid.outcome) == ("completed", "credited")
            assert kid.parent == {"run_id": "inv-disputed", "workflow": "invoices", "step": "dispute"}
            assert disputed.steps["dispute"].output is not None
            assert disputed.steps["dispute"].output["outcome"] == "credited"
    finally:
        await worker.stop()
    report = await check_history(settings.kafka, [wf, child])
    assert report.ok, report.to_dict()
    assert report.replayed == report.runs == len(plan) + 1  # the child run too
