"""``calmrun costs`` (the cost table, how current it is, ``forecast``) and ``calmrun costs-aggregator``.

``calmrun/cli.py`` registers them: ``app.add_typer(costs_app, name="costs")`` and
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
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from calmrun.cli.common import BootstrapOpt, ConfigOpt, PrefixOpt, cli_settings, run_command
from calmrun.costs.costtopics import CostTopics, ensure_cost_topics
from calmrun.costs.fold import ALL
from calmrun.costs.table import CostRow, CostTable, Coverage
from calmrun.costs.totals import CompactedTail, events_end, read_current
from calmrun.settings import Settings
from calmrun.workflow.events import RunEvent

By = Literal["run", "workflow", "agent", "model", "tenant", "step"]
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
        *(["escalated"] if by == "step" else []),
        "tokens in",
        "tokens out",
        "api calls",
        "cost $",
        *(["children $", "with children $"] if by == "run" else []),
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
        table.add_row(*cells, *_cells(r, by))
        total.add({**r.as_json(), "cost_usd": str(r.cost_usd)})
    cells = ["[bold]total[/bold]"] + ([""] if window != ALL else [])
    table.add_row(*cells, *_cells(total, by))
    return table


def _cells(r: CostRow, by: str) -> list[str]:
    avg = r.latency_ms / r.attempts if r.attempts else 0.0
    wait = r.queue_wait_ms / r.attempts if r.attempts else 0.0
    return [
        str(r.attempts),
        str(r.succeeded),
        str(r.failed),
        *([str(r.escalated)] if by == "step" else []),
        str(r.tokens_in),
        str(r.tokens_out),
        str(r.api_calls),
        f"{r.cost_usd:.6f}",
        *(_family_cells(r) if by == "run" else []),
        f"{avg:.1f}",
        f"{wait:.1f}",
    ]


def _family_cells(r: CostRow) -> list[str]:
    """A run's children's spend and its own with theirs; the total row has neither (the child runs are
    rows of their own, so the total of ``cost $`` already holds their spend once)."""
    if r.dim == "total":
        return ["-", "-"]
    return [f"{r.children_usd:.6f}", f"{r.cost_usd + r.children_usd:.6f}"]


async def batch_costs(settings: Settings, wait_s: float = 120.0) -> CostTable:
    """The aggregator's totals once they cover every event now on ``<prefix>.runs.events``.

    The aggregator must be running (``costs-aggregator``, or ``AggregatorProcess`` in a demo).

    Raises:
        CostsNotCurrentError: the totals did not cover the events within ``wait_s``.
    """
    table, _ = await read_current(settings, wait=True, wait_s=wait_s)
    return table


def print_costs(table: CostTable, by: str = "workflow", window: str = ALL) -> None:
    """Print the cost table of one dimension (what ``calmrun costs --by BY --window WINDOW`` prints)."""
    _print(table.rows(by, window), by, window, None, as_json=False)


def coverage_line(cov: Coverage) -> str:
    parts = " ".join(f"p{p}:{cov.covered.get(p, 0)}/{e}" for p, e in sorted(cov.end.items()))
    return f"covers events offsets (covered/end) {parts}; lag {cov.lag} events"


def _print(rows: list[CostRow], by: str, window: str, cov: Coverage | None, as_json: bool) -> None:
    if as_json:
        body: dict[str, Any] = {"by": by, "window": window, "rows": [r.as_json() for r in rows]}
        if cov is not None:
            body["coverage"] = cov.as_json()
        print(json.dumps(body))
        return
    console = Console()  # per call: honours COLUMNS
    console.print(cost_table(rows, by, window))
    if cov is not None:
        console.print(coverage_line(cov))


costs_app = typer.Typer(help="The cost table from the aggregator's totals, and forecasts.")


@costs_app.callback(invoke_without_command=True)
def costs(
    ctx: typer.Context,
    by: Annotated[
        By, typer.Option("--by", help="Dimension: run, workflow, agent, model, tenant or step.")
    ] = "workflow",
    window: Annotated[WindowOpt, typer.Option("--window", help="1m, 1h (tumbling buckets) or all.")] = "all",
    since: Annotated[
        str | None, typer.Option("--since", help="Only buckets from then on: 30m, 2h, 1d or an ISO time.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as totals change.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="First wait until the totals cover the events topic's end now.")
    ] = False,
    wait_s: Annotated[float, typer.Option("--wait-s", help="How long --wait waits.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Cost per run, workflow, agent, model, tenant or step (workflow/step/alias), from the aggregator.

    Below the table: the events offsets the totals cover per partition, and the lag (events not yet in
    them). ``--wait`` first waits until they cover the events topic's end as of the call.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = cli_settings(config, bootstrap, prefix)
    since_ms = parse_since(since, time.time_ns() // 1_000_000)
    if not follow:
        table, cov = run_command(read_current(settings, wait=wait, wait_s=wait_s))
        _print(table.rows(by, window, since_ms), by, window, cov, as_json)
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
                end = await events_end(settings)
                cov = Coverage({p: table.covered.get(p, 0) for p in end}, end)
                _print(table.rows(by, window, since_ms), by, window, cov, as_json)
            await asyncio.sleep(1.0)


def aggregator(
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve /metrics here (default metrics.port; 0: off).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Run the cost aggregator over <prefix>.runs.events (one transaction per batch) until SIGTERM."""
    import logging

    from calmrun.costs.__main__ import run_aggregator

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    settings = cli_settings(config, bootstrap, prefix)
    run_aggregator(settings, metrics_port=metrics_port)


def request_table(rows: list[Any]) -> Table:
    """The cost per request of a run (``agents.requestcosts.RequestCost``), totals per step and attempt."""
    from calmrun.agents.requestcosts import totals

    table = Table("step", "attempt", "#", "request", "model", "tokens in", "tokens out", "ms", "cost $")
    table.title = "agent requests"
    for r in rows:
        what = "model request" if r.kind == "model" else f"delegated by {r.label}"[:60]
        table.add_row(
            r.step, str(r.attempt), str(r.position), what, r.model or "-", str(r.tokens_in),
            str(r.tokens_out), f"{r.latency_ms:.1f}", f"{r.cost_usd:.6f}",
        )  # fmt: skip
    for key, t in totals(rows, "attempt").items():
        step, attempt = key.rsplit("/", 1)
        table.add_row(
            f"[bold]{step}[/bold]", attempt, "", f"total ({t.requests} requests)", "", str(t.tokens_in),
            str(t.tokens_out), f"{t.latency_ms:.1f}", f"{t.cost_usd:.6f}",
        )  # fmt: skip
    return table


def journal_table(entries: list[Any]) -> Table:
    """A run's agent journal (``agents.journal.Entry``): one row per model request or tool call."""
    table = Table(
        "step", "attempt", "#", "call", "model", "tokens in/out", "ms", "bytes", title="agent journal"
    )
    for e in entries:
        tokens = f"{e.usage.input_tokens}/{e.usage.output_tokens}" if e.call.op == "model" else ""
        table.add_row(
            e.step, str(e.attempt), str(e.position), e.call.label[:70], e.model or "", tokens,
            f"{e.latency_ms:.1f}", str(len(e.model_dump_json())),
        )  # fmt: skip
    return table


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


@costs_app.command("forecast")
def forecast_cmd(
    workflow: Annotated[str, typer.Option("--workflow", "-w", help="The workflow to forecast.")],
    since: Annotated[
        str | None, typer.Option("--since", help="Only runs that started then or later: 30m, 2h, 1d, ISO.")
    ] = None,
    visits: Annotated[
        list[str] | None,
        typer.Option(
            "--visits",
            help="STEP=N: forecast N iterations (a loop body's step) or N elements (a map step) of STEP "
            "instead of the observed mean (repeatable).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Expected cost per run of a workflow, with a range, from its observed runs and their paths.

    Loops and maps: each path line has its visits per run (mean iterations of a loop body's step, mean
    elements of a map step) and attempts per visit, and the loops and maps table their mean and max;
    ``--visits STEP=N`` scales STEP's cost to N visits and moves the expected cost by the difference.

    Expected: the mean cost of the runs in the table; range: their 10th and 90th percentile (and min, max).
    Below: each step/alias the runs took, the share of runs that took it, attempts per such run and what it
    adds to the expected cost (compensations are in the run's cost but on no path).
    """
    from calmrun.costs.planner import forecast

    settings = cli_settings(config, bootstrap, prefix)
    since_ms = parse_since(since, time.time_ns() // 1_000_000)
    table, cov = run_command(read_current(settings))
    asked: dict[str, float] = {}
    for v in visits or []:
        step, _, n = v.partition("=")
        try:
            count = float(n)
        except ValueError:
            count = 0.0
        if not step or not count > 0:
            err.print(f"[red]error:[/red] --visits {v!r}: expected STEP=N with N > 0")
            raise typer.Exit(2)
        asked[step] = count
    f = forecast(table, workflow, since_ms, asked or None)
    if as_json:
        print(json.dumps({**f.as_json(), "coverage": cov.as_json()}))
        return
    console = Console()
    if not f.runs:
        console.print(
            f"no priced runs of {workflow!r} in the cost table" + (f" since {since}" if since else "")
        )
        console.print(coverage_line(cov))
        raise typer.Exit(1)
    console.print(
        f"[bold]{workflow}[/bold]: expected ${f.expected:.6f} per run "
        f"(p10 ${f.low:.6f}, p90 ${f.high:.6f}; min ${f.cheapest:.6f}, max ${f.dearest:.6f}) "
        f"from {f.runs} runs"
    )
    if f.assumed:
        console.print("assuming " + ", ".join(f"{k}: {v:g} visits" for k, v in f.assumed.items()))
    table_out = Table(
        "step/alias",
        "share of runs",
        "attempts per run on it",
        "visits per run",
        "attempts per visit",
        "adds $ per run",
        title="paths",
    )
    for p in f.paths:
        table_out.add_row(
            p.path,
            f"{p.share:.1%}",
            f"{p.attempts_per_run:.2f}",
            f"{p.visits_per_run:.2f}",
            f"{p.attempts_per_visit:.2f}",
            f"{p.cost_per_run:.6f}",
        )
    console.print(table_out)
    if f.shapes:
        shapes = Table("step", "kind", "runs", "mean", "max", title="loops (iterations) and maps (elements)")
        for x in f.shapes:
            shapes.add_row(x.step, x.kind, str(x.runs), f"{x.mean:.2f}", str(x.most))
        console.print(shapes)
    console.print(coverage_line(cov))
