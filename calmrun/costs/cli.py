"""``calmrun costs`` (the cost table from the aggregator's output) and ``calmrun costs-aggregator``.

The lead's ``calmrun/cli.py`` registers them: ``app.command("costs")(costs)`` and
``app.command("costs-aggregator")(aggregator)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from calmrun.cli_common import BootstrapOpt, ConfigOpt, PrefixOpt, cli_settings, run_command
from calmrun.costs.aggregator import ALL, CostTopics, ensure_cost_topics
from calmrun.costs.totals import (
    CompactedTail,
    CostRow,
    CostTable,
    fold_locally,
    read_events,
    read_totals,
    wait_totals,
)
from calmrun.settings import Settings
from calmrun.workflow.events import RunEvent

By = Literal["run", "workflow", "agent", "model", "tenant"]
WindowOpt = Literal["1m", "1h", "all"]
err = Console(stderr=True)


def parse_since(text: str | None, now_ms: int) -> int | None:
    """``30m``, ``2h``, ``1d``, ``90s`` before now, or an ISO time (UTC when it names no zone)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now_ms - n * {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[unit]
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"--since takes 30m, 2h, 1d or an ISO time, not {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _bucket(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def cost_table(rows: list[CostRow], by: str, window: str) -> Table:
    """The cost table for people: one row per value (and bucket), a total row."""
    cols = [by]
    if window != ALL:
        cols.append(f"{window} from (UTC)")
    cols += [
        "attempts",
        "ok",
        "failed",
        "tokens in",
        "tokens out",
        "api calls",
        "cost $",
        "avg ms",
        "avg wait ms",
    ]
    title = f"cost by {by}" + ("" if window == ALL else f" per {window}")
    table = Table(*cols, title=title)
    total = CostRow("total", "", window, 0)
    for r in rows:
        cells = [r.value]
        if window != ALL:
            cells.append(_bucket(r.start_ms))
        table.add_row(*cells, *_cells(r))
        total.add({**r.as_json(), "cost_usd": str(r.cost_usd)})
    cells = ["[bold]total[/bold]"] + ([""] if window != ALL else [])
    table.add_row(*cells, *_cells(total))
    return table


def _cells(r: CostRow) -> list[str]:
    avg = r.latency_ms / r.attempts if r.attempts else 0.0
    wait = r.queue_wait_ms / r.attempts if r.attempts else 0.0
    return [
        str(r.attempts),
        str(r.succeeded),
        str(r.failed),
        str(r.tokens_in),
        str(r.tokens_out),
        str(r.api_calls),
        f"{r.cost_usd:.6f}",
        f"{avg:.1f}",
        f"{wait:.1f}",
    ]


async def batch_costs(settings: Settings, wait_s: float = 120.0) -> CostTable:
    """The aggregator's totals once they cover every event now on ``<prefix>.runs.events``.

    The aggregator must be running (``costs-aggregator``, or ``AggregatorProcess`` in a demo).

    Raises:
        AssertionError: the totals did not catch up within ``wait_s``.
    """
    return await wait_totals(settings, fold_locally(await read_events(settings)), wait_s)


def print_costs(table: CostTable, by: str = "workflow", window: str = ALL) -> None:
    """Print the cost table of one dimension (what ``calmrun costs --by BY --window WINDOW`` prints)."""
    _print(table.rows(by, window), by, window, as_json=False)


def _print(rows: list[CostRow], by: str, window: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"by": by, "window": window, "rows": [r.as_json() for r in rows]}))
    else:
        Console().print(cost_table(rows, by, window))  # per call: honours COLUMNS


def costs(
    by: Annotated[
        By, typer.Option("--by", help="Dimension: run, workflow, agent, model or tenant.")
    ] = "workflow",
    window: Annotated[WindowOpt, typer.Option("--window", help="1m, 1h (tumbling buckets) or all.")] = "all",
    since: Annotated[
        str | None, typer.Option("--since", help="Only buckets from then on: 30m, 2h, 1d or an ISO time.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as totals change.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Cost per run, workflow, agent, model or tenant, from the aggregator's totals (``costs-aggregator``).

    Figures lag the events by the aggregator's lag (usually about a second).
    """
    settings = cli_settings(config, bootstrap, prefix)
    since_ms = parse_since(since, time.time_ns() // 1_000_000)
    if not follow:
        table = run_command(read_totals(settings))
        _print(table.rows(by, window, since_ms), by, window, as_json)
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_command(_follow(settings, by, window, since_ms, as_json))


async def _follow(settings: Settings, by: str, window: str, since_ms: int | None, as_json: bool) -> None:
    table = CostTable()
    await ensure_cost_topics(settings)
    async with CompactedTail(settings, CostTopics(settings.kafka.prefix).totals, table.apply) as tail:
        await tail.caught_up()
        shown = -1
        while True:
            if tail.records != shown:
                shown = tail.records
                _print(table.rows(by, window, since_ms), by, window, as_json)
            await asyncio.sleep(1.0)


def aggregator(
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="faust data directory.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Run the cost aggregator (a faust app over <prefix>.runs.events) until SIGINT/SIGTERM."""
    from calmrun.costs.aggregator import run_aggregator

    settings = cli_settings(config, bootstrap, prefix)
    run_aggregator(settings, loglevel=log_level.lower(), data_dir=data_dir)


def step_costs(events: list[RunEvent]) -> dict[str, CostRow]:
    """Per step, the cost of a run's attempts from its events (the first copy of each seq; Decimal money)."""
    seen: set[int] = set()
    rows: dict[str, CostRow] = {}
    for e in events:
        if e.cost is None or e.step is None or e.seq <= 0 or e.seq in seen:
            continue
        if e.type not in ("step.succeeded", "step.failed"):
            continue
        seen.add(e.seq)
        row = rows.setdefault(e.step, CostRow("step", e.step, ALL, 0))
        c = e.cost
        row.add(
            {
                "attempts": 1,
                "succeeded": int(e.type == "step.succeeded"),
                "failed": int(e.type == "step.failed"),
                "tokens_in": c.tokens_in,
                "tokens_out": c.tokens_out,
                "requests": c.requests,
                "api_calls": c.api_calls,
                "cost_usd": str(c.cost_usd or Decimal(0)),
                "latency_ms": c.latency_ms,
                "queue_wait_ms": c.queue_wait_ms,
            }
        )
    return rows
