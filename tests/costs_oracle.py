"""An independent recount of the events topic: what every cost total must be (the aggregator's oracle).

Written apart from ``calmrun.costs.fold`` on purpose: pydantic ``RunEvent``s, a set of counted
``(run_id, seq)`` (the first copy in offset order counts), plain dicts. Tests compare the aggregator's
``<prefix>.costs.totals`` against it.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from calmrun.costs.fold import ALL, WINDOW_MS, bucket_start
from calmrun.costs.table import CostTable
from calmrun.costs.totals import read_totals
from calmrun.errors import DecodeError
from calmrun.kafka.reader import read_to_end
from calmrun.settings import Settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent

Row = dict[str, Any]
RowKey = tuple[str, str, str, int]
COMPARED = (
    "attempts",
    "succeeded",
    "failed",
    "escalated",
    "tokens_in",
    "tokens_out",
    "api_calls",
    "cost_usd",
)
WINDOWS = {
    "run": (ALL,),
    "workflow": (ALL, "1m", "1h"),
    "agent": (ALL, "1m", "1h"),
    "model": (ALL, "1m", "1h"),
    "tenant": (ALL, "1m", "1h", "1d"),
    "step": (ALL, "1m", "1h"),
}


async def read_events(settings: Settings) -> list[RunEvent]:
    """Every committed event of ``<prefix>.runs.events``, in offset order per partition.

    Undecodable records, and event types this version does not know, are skipped.
    """
    codec = RecordCodec(wire_models())
    k = settings.kafka
    consumer = AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    out: list[RunEvent] = []
    try:
        tps = [TopicPartition(f"{k.prefix}.runs.events", p) for p in range(k.partitions)]
        async for rec in read_to_end(consumer, tps):
            try:
                out.append(codec.decode_as(rec.value or b"", RunEvent))
            except DecodeError:
                continue
    finally:
        await consumer.stop()
    return out


def recount(events: list[RunEvent]) -> dict[RowKey, Row]:
    """The totals of these events: per (dimension, value, window, bucket start), the compared fields."""
    seen: set[tuple[str, int]] = set()
    agents: dict[tuple[str, str], str] = {}
    out: dict[RowKey, Row] = defaultdict(lambda: dict.fromkeys(COMPARED, 0) | {"cost_usd": Decimal(0)})

    def add(dim: str, value: str, at_ms: int, **delta: Any) -> None:
        for w in WINDOWS[dim]:
            row = out[(dim, value, w, bucket_start(at_ms, w))]
            for f, x in delta.items():
                row[f] += x

    for e in events:
        if e.type in ("step.scheduled", "step.compensation_scheduled") and e.step and "agent" in e.data:
            kind = "run" if e.type == "step.scheduled" else "compensate"
            agents[(e.run_id, f"{kind}:{e.step}")] = e.data["agent"]
        if e.seq <= 0 or (e.run_id, e.seq) in seen:
            continue
        if e.type == "step.escalated":
            seen.add((e.run_id, e.seq))
            add("step", f"{e.workflow}/{e.step}/{e.data.get('from') or '-'}", e.at_ms, escalated=1)
            continue
        if e.type not in ("step.succeeded", "step.failed") or e.cost is None:
            continue
        seen.add((e.run_id, e.seq))
        c = e.cost
        kind = str(e.data.get("kind", "run"))
        model = c.model or "-"
        delta = {
            "attempts": 1,
            "succeeded": int(e.type == "step.succeeded"),
            "failed": int(e.type == "step.failed"),
            "tokens_in": c.tokens_in,
            "tokens_out": c.tokens_out,
            "api_calls": c.api_calls,
            "cost_usd": c.cost_usd,
        }
        agent = c.agent or agents.get((e.run_id, f"{kind}:{e.step}")) or f"?{e.step}"
        add("run", e.run_id, e.at_ms, **delta)
        add("workflow", e.workflow, e.at_ms, **delta)
        add("agent", agent, e.at_ms, **delta)
        add("model", model, e.at_ms, **delta)
        add("tenant", e.tenant, e.at_ms, **delta)
        if kind == "run":
            add("step", f"{e.workflow}/{e.step}/{model}", e.at_ms, **delta)
    return dict(out)


def counted(table: CostTable) -> dict[RowKey, Row]:
    """The aggregator's totals in the oracle's shape."""
    got: dict[RowKey, Row] = {}
    for w in (ALL, *WINDOW_MS):
        for r in table.rows(None, w):
            got[(r.dim, r.value, r.window, r.start_ms)] = {f: getattr(r, f) for f in COMPARED}
    return got


def differences(got: dict[RowKey, Row], want: dict[RowKey, Row]) -> list[str]:
    """Human-readable differences (empty: equal)."""
    out = [f"{k}: got {got.get(k)}, want {v}" for k, v in sorted(want.items()) if got.get(k) != v]
    out += [f"{k}: got {got[k]}, want nothing" for k in sorted(set(got) - set(want))]
    return out


async def until_recount(settings: Settings, wait_s: float = 90.0) -> CostTable:
    """Poll the totals until they equal the recount of the whole events topic (read once, now).

    Raises:
        AssertionError: not equal by the deadline; the message lists the first differences.
    """
    want = recount(await read_events(settings))
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while True:
        table = await read_totals(settings)
        diff = differences(counted(table), want)
        if not diff:
            return table
        if loop.time() > end:
            raise AssertionError(
                f"{len(diff)} totals differ from the recount: " + json.dumps(diff[:8], default=str)
            )
        await asyncio.sleep(0.3)
