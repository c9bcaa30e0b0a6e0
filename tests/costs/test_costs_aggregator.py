"""The cost aggregator against the real broker: exact totals per dimension and window, copies not counted,
a kill -9 in the middle not counting anything twice, the CLI table and the tenants' spend."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from calmrun.cli.costs import costs_app
from calmrun.costs.costtopics import ensure_cost_topics
from calmrun.costs.fold import bucket_start
from calmrun.costs.process import AggregatorProcess
from calmrun.costs.spend import TenantSpend
from calmrun.costs.table import CostTable
from calmrun.costs.totals import read_totals
from calmrun.kafka.topics import partition_for
from calmrun.settings import Settings, load_settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, StepCost
from tests.runtime_support import until

T0 = 1_704_067_170_000  # 2023-12-31T23:59:30Z: the runs below cross a minute, hour and day boundary
MODELS = ("cheap", "smart")
TENANTS = ("acme", "beta")
WORKFLOWS = ("wfa", "wfb")


def settings_for(broker: str, prefix: str, **costs: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        costs={"emit_interval_s": 0.2, "session_timeout_s": 6, **costs},
    )


def cost(i: int, k: int, model: str) -> StepCost:
    return StepCost(
        latency_ms=10.0 + k,
        queue_wait_ms=float(i % 3),
        tokens_in=100 * (k + 1) + i,
        tokens_out=10 * (k + 1),
        requests=1,
        api_calls=k,
        model=model,
        cost_usd=Decimal("0.000123") * (k + 1) + Decimal(i) / Decimal(1_000_000),
        price_source="config models.x",
    )


def run_events(i: int) -> list[RunEvent]:
    """One run: requested, three attempts of two steps (one failed), completed; ~2s apart per run."""
    rid = f"run-{i:04d}"
    wf, tenant, at = WORKFLOWS[i % 2], TENANTS[(i // 2) % 2], T0 + i * 1500
    base = {"run_id": rid, "workflow": wf, "tenant": tenant}
    ev = [
        RunEvent(**base, seq=1, type="run.requested", at_ms=at),
        RunEvent(
            **base, seq=2, type="step.scheduled", at_ms=at, step="s1", attempt=1, data={"agent": "ag.one"}
        ),
        RunEvent(
            **base, seq=3, type="step.succeeded", at_ms=at + 5, step="s1", attempt=1, cost=cost(i, 0, "cheap")
        ),
        RunEvent(
            **base, seq=4, type="step.scheduled", at_ms=at + 5, step="s2", attempt=1, data={"agent": "ag.two"}
        ),
        RunEvent(
            **base,
            seq=5,
            type="step.failed",
            at_ms=at + 9,
            step="s2",
            attempt=1,
            data={"kind": "run"},
            cost=cost(i, 1, "cheap"),
        ),
        RunEvent(
            **base, seq=6, type="step.scheduled", at_ms=at + 9, step="s2", attempt=2, data={"agent": "ag.two"}
        ),
        RunEvent(
            **base,
            seq=7,
            type="step.succeeded",
            at_ms=at + 14,
            step="s2",
            attempt=2,
            cost=cost(i, 2, "smart"),
        ),
        RunEvent(**base, seq=8, type="run.completed", at_ms=at + 14),
    ]
    return ev


def copies(i: int) -> list[RunEvent]:
    """What a worker crash re-sends: the same seqs (with another cost), and a logged-only event."""
    ev = run_events(i)
    again = [e.model_copy(update={"cost": cost(i + 7, 5, "smart")}) if e.cost else e for e in ev[2:5]]
    ignored = ev[2].model_copy(update={"seq": -1, "type": "input.ignored"})
    return [*again, ignored]


def expected(events: list[RunEvent]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """The totals, computed independently of the aggregator: first copy of each (run, seq) with a cost."""
    seen: set[tuple[str, int]] = set()
    agents: dict[tuple[str, str], str] = {}
    out: dict[tuple[str, str, str, int], dict[str, Any]] = defaultdict(
        lambda: {
            "attempts": 0,
            "failed": 0,
            "tokens_in": 0,
            "tokens_out": 0,
            "api_calls": 0,
            "cost": Decimal(0),
        }
    )
    for e in events:
        if e.type == "step.scheduled":
            agents[(e.run_id, e.step or "")] = e.data["agent"]
        if e.seq <= 0 or e.cost is None or (e.run_id, e.seq) in seen:
            continue
        seen.add((e.run_id, e.seq))
        dims = {
            "run": (e.run_id, ("all",)),
            "workflow": (e.workflow, ("all", "1m", "1h")),
            "agent": (agents[(e.run_id, e.step or "")], ("all", "1m", "1h")),
            "model": (e.cost.model or "-", ("all", "1m", "1h")),
            "tenant": (e.tenant, ("all", "1m", "1h", "1d")),
        }
        for dim, (value, windows) in dims.items():
            for w in windows:
                row = out[(dim, value, w, bucket_start(e.at_ms, w))]
                row["attempts"] += 1
                row["failed"] += e.type == "step.failed"
                row["tokens_in"] += e.cost.tokens_in
                row["tokens_out"] += e.cost.tokens_out
                row["api_calls"] += e.cost.api_calls
                row["cost"] += e.cost.cost_usd
    return dict(out)


def as_expected(table: CostTable) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    got = {}
    for w in ("all", "1m", "1h", "1d"):
        for r in table.rows(None, w):
            if r.dim == "step":
                continue  # this file's expected() has no step dimension (tests/costs_oracle.py has)
            got[(r.dim, r.value, r.window, r.start_ms)] = {
                "attempts": r.attempts,
                "failed": r.failed,
                "tokens_in": r.tokens_in,
                "tokens_out": r.tokens_out,
                "api_calls": r.api_calls,
                "cost": r.cost_usd,
            }
    return got


async def produce(settings: Settings, events: list[RunEvent]) -> None:
    codec = RecordCodec(wire_models())
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        topic = f"{settings.kafka.prefix}.runs.events"
        for e in events:
            p = partition_for(e.run_id, settings.kafka.partitions)
            await producer.send(topic, codec.encode(e), key=e.run_id.encode(), partition=p)
        await producer.flush()
    finally:
        await producer.stop()


async def until_totals(settings: Settings, want: dict[Any, Any], wait_s: float = 90.0) -> CostTable:
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while True:
        table = await read_totals(settings)
        got = as_expected(table)
        if got == want:
            return table
        if loop.time() > end:
            diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
            extra = set(got) - set(want)
            raise AssertionError(
                f"totals differ ({len(diff)} rows, {len(extra)} extra): {list(diff.items())[:5]}"
            )
        await asyncio.sleep(0.3)


def workload(n: int) -> list[RunEvent]:
    """``n`` runs; every third run's first events are re-sent after its end (a crash's copies)."""
    events: list[RunEvent] = []
    for i in range(n):
        events += run_events(i)
        if i % 3 == 0:
            events += copies(i)
    return events


async def test_known_workload_gives_exact_totals(broker: str, prefix: str, tmp_path: Path) -> None:
    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    events = workload(60)
    want = expected(events)
    days = {k[3] for k in want if k[:3] == ("tenant", "acme", "1d")}
    assert len(days) == 2  # the workload spans two days (and so two hours and several minutes)
    await produce(settings, events)
    with AggregatorProcess(settings, log=tmp_path / "agg.log") as agg:
        table = await until_totals(settings, want)
        assert agg.alive()
        spend = TenantSpend(settings, clock=lambda: T0 + 59 * 1500)
        async with spend:
            await spend.caught_up()
            last_hour = bucket_start(T0 + 59 * 1500, "1h")
            want_hour = want[("tenant", "acme", "1h", last_hour)]["cost"]

            await until(lambda: spend.spent("acme", "1h") == want_hour, 30, "the tenant's spend")
            # only each tenant's current bucket is kept: an earlier hour is not a budget window any more
            assert spend.spent("acme", "1h", at_ms=T0) == 0
            assert spend.spent("nobody", "1h") == 0

    # money is exact: Decimal all the way, e.g. the workflow totals
    wfa = table.row("workflow", "wfa")
    assert wfa.cost_usd == want[("workflow", "wfa", "all", 0)]["cost"]
    assert wfa.attempts == 30 * 3 and wfa.failed == 30 and wfa.succeeded == 60

    app = typer.Typer()
    app.add_typer(costs_app, name="costs")
    runner = CliRunner()
    res = await asyncio.to_thread(
        runner.invoke, app, ["costs", "--by", "model", "--json", "--bootstrap", broker, "--prefix", prefix]
    )
    assert res.exit_code == 0, res.output
    rows = {r["value"]: r for r in json.loads(res.stdout)["rows"]}
    assert set(rows) == {"cheap", "smart"}
    for model in ("cheap", "smart"):
        assert Decimal(rows[model]["cost_usd"]) == want[("model", model, "all", 0)]["cost"]
        assert rows[model]["attempts"] == want[("model", model, "all", 0)]["attempts"]
    res = await asyncio.to_thread(
        runner.invoke,
        app,
        ["costs", "--by", "tenant", "--window", "1m", "--bootstrap", broker, "--prefix", prefix],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert "cost by tenant per 1m" in res.stdout and "total" in res.stdout
    assert "2023-12-31 23:59" in res.stdout and "2024-01-01 00:00" in res.stdout


async def test_kill_9_in_the_middle_counts_nothing_twice(broker: str, prefix: str, tmp_path: Path) -> None:
    # Killed with records in flight: the batches committed before the kill are in the totals, the rest is
    # re-read from the coverage the last committed transaction wrote; the totals end exact.
    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    first, second = workload(40), [e for i in range(40, 80) for e in run_events(i)]
    second += [e for i in range(0, 40, 2) for e in copies(i)]  # copies of first-half seqs after the crash
    await produce(settings, first)
    agg = AggregatorProcess(settings, log=tmp_path / "agg.log").start()
    try:
        await until_totals(settings, expected(first))
        producing = asyncio.create_task(produce(settings, second))
        await asyncio.sleep(0.05)
        agg.kill()
        await producing
        agg = AggregatorProcess(settings, log=tmp_path / "agg2.log").start()
        table = await until_totals(settings, expected(first + second), wait_s=60)
        assert table.row("workflow", "wfa").attempts == 40 * 3
    finally:
        agg.kill()


async def test_totals_equal_the_recount_and_say_what_they_cover(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    """The independent recount (tests/costs_oracle.py) agrees, and the coverage reaches the topic's end."""
    from calmrun.costs.totals import events_end, read_current
    from tests.costs_oracle import counted, recount

    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    await produce(settings, workload(12))
    with AggregatorProcess(settings, log=tmp_path / "agg.log"):
        table, cov = await read_current(settings, wait=True, wait_s=90)
    assert cov.lag == 0 and cov.covered == await events_end(settings)
    want = recount(workload(12))
    assert counted(table) == want
    assert as_expected(table) == expected(workload(12))


def family_events() -> list[RunEvent]:
    """A parent run (p, workflow wfa) with a map of 3 elements and a child run (wfb) with a grandchild."""

    def ev(
        run: str, seq: int, type: str, step: str, data: dict[str, Any], usd: str | None = None
    ) -> RunEvent:
        c = StepCost(model="cheap", tokens_in=1, cost_usd=Decimal(usd)) if usd is not None else None
        wf = "wfa" if run == "p" else "wfb"
        return RunEvent(
            run_id=run,
            seq=seq,
            type=type,
            at_ms=T0 + seq,
            workflow=wf,
            step=step,
            attempt=1,
            data=data,
            cost=c,
        )

    return [
        ev("p", 1, "step.mapped", "match", {"size": 3, "max_concurrency": 2}),
        *[ev("p", 2 + e, "step.succeeded", "match", {"kind": "run"}, "0.01") for e in range(3)],
        ev("p", 5, "step.child_started", "fraud", {"child_run_id": "p.fraud", "workflow": "wfb"}),
        ev("p.fraud", 1, "step.succeeded", "s1", {"kind": "run"}, "0.2"),
        ev("p.fraud", 2, "step.child_started", "deep", {"child_run_id": "p.fraud.deep", "workflow": "wfb"}),
        ev("p.fraud.deep", 1, "step.succeeded", "s1", {"kind": "run"}, "0.4"),
    ]


async def test_a_parents_row_adds_its_children_and_the_forecast_its_map_width(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    await produce(settings, family_events())
    app = typer.Typer()
    app.add_typer(costs_app, name="costs")
    runner = CliRunner()
    args = ["--bootstrap", broker, "--prefix", prefix]
    with AggregatorProcess(settings, log=tmp_path / "agg.log"):
        res = await asyncio.to_thread(runner.invoke, app, ["costs", "--by", "run", "--wait", "--json", *args])
        assert res.exit_code == 0, res.output
        rows = {r["value"]: r for r in json.loads(res.stdout)["rows"]}
        assert {k: (Decimal(r["cost_usd"]), Decimal(r["children_usd"])) for k, r in rows.items()} == {
            "p": (Decimal("0.03"), Decimal("0.6")),
            "p.fraud": (Decimal("0.2"), Decimal("0.4")),
            "p.fraud.deep": (Decimal("0.4"), Decimal(0)),
        }
        res = await asyncio.to_thread(
            runner.invoke, app, ["costs", "--by", "run", *args], env={"COLUMNS": "220"}
        )
        assert "children $" in res.stdout and "0.630000" in res.stdout  # p: 0.03 + 0.6
        res = await asyncio.to_thread(runner.invoke, app, ["costs", "--by", "workflow", "--json", *args])
        by_wf = {r["value"]: Decimal(r["cost_usd"]) for r in json.loads(res.stdout)["rows"]}
        assert by_wf == {"wfa": Decimal("0.03"), "wfb": Decimal("0.6")}  # each attempt once
        res = await asyncio.to_thread(
            runner.invoke, app, ["costs", "forecast", "-w", "wfa", "--visits", "match=30", "--json", *args]
        )
        assert res.exit_code == 0, res.output
        f = json.loads(res.stdout)
        assert f["shapes"] == [{"step": "match", "kind": "map", "runs": 1, "mean": 3.0, "max": 3}]
        assert f["paths"][0]["visits_per_run"] == 3.0 and Decimal(f["expected_usd"]) == Decimal("0.3")
