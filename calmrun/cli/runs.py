"""``calmrun worker``, ``submit``, ``status``, ``runs`` and ``models``: running workflows and their runs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from calmrun.cli.common import (
    BootstrapOpt,
    ConfigOpt,
    JsonOpt,
    PrefixOpt,
    WorkflowFiles,
    cli_settings,
    clock_text,
    err,
    load_workflows,
    out,
    run_command,
)
from calmrun.client import Client, summarize
from calmrun.eventloop import loop_name
from calmrun.workflow.definition import DEFAULT_POOL
from calmrun.workflow.events import RunEvent, RunRequest
from calmrun.workflow.state import RunState, StepState


def worker(
    workflow: WorkflowFiles,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Step tasks run at once.")] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Execute only the steps of this pool (an executor: no deciding); 'none': decide only, "
            "execute nothing. Default: decide, and execute the steps that name no pool."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes in the group on this machine (restarted on death).")
    ] = 1,
) -> None:
    """Run the given workflows until SIGINT/SIGTERM. Agent references resolve from the current directory.

    With ``--processes N`` (N > 1) this process supervises N children, each this same command without
    ``--processes`` (see calmrun.supervisor).
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    sys.path.insert(0, os.getcwd())
    settings = cli_settings(config, bootstrap, prefix, max_in_flight=max_in_flight)
    wfs = load_workflows(workflow)
    names = [wf.name for wf in wfs]
    if processes > 1:
        from calmrun.supervisor import supervise

        raise typer.Exit(supervise(settings, processes, sys.argv[1:]))

    async def main() -> None:
        from calmrun.agents import AgentRegistry, ModelRegistry
        from calmrun.supervisor import report_ready

        if pool is not None and pool != "none":
            from calmrun.streams.pool import PoolExecutor

            ex = PoolExecutor(settings, wfs, pool, AgentRegistry(), ModelRegistry(settings.models))

            def executing() -> None:
                where = f"{ex.inputs} on {settings.kafka.bootstrap}"
                on = loop_name(asyncio.get_running_loop())
                err.print(f"executor of pool {pool!r} running {where} ({on}); Ctrl-C stops it")
                report_ready()

            await ex.run(executing)
            return
        from prometheus_client import CollectorRegistry

        from calmrun.streams.metrics import WorkerMetrics
        from calmrun.streams.readiness import wait_ready
        from calmrun.streams.worker import Worker

        metrics = WorkerMetrics(CollectorRegistry()) if settings.metrics.port else None
        w = Worker(
            settings,
            wfs,
            AgentRegistry(),
            ModelRegistry(settings.models),
            metrics=metrics,
            pool=None if pool == "none" else DEFAULT_POOL,
        )
        what = "deciding only" if pool == "none" else "deciding and executing the default pool"
        what += f", {loop_name(asyncio.get_running_loop())}"
        announcing: list[asyncio.Task[None]] = []

        async def announce() -> None:
            now = await wait_ready(w, w.parts)  # the group assigned its partitions and they are restored
            if now.ready:
                err.print(f"worker {now.why}")

        def started() -> None:
            err.print(f"worker running {names} ({what}) on {settings.kafka.bootstrap}; Ctrl-C stops it")
            report_ready()
            announcing.append(asyncio.get_running_loop().create_task(announce()))

        await w.run(started)

    run_command(main(), loop=settings.worker.event_loop)


def submit(
    workflow: Annotated[str, typer.Argument(help="Workflow name.")],
    input: Annotated[str, typer.Option("--input", "-i", help="JSON object, or @file.json.")] = "{}",
    run_id: Annotated[str | None, typer.Option(help="Run ID (default: generated).")] = None,
    tenant: Annotated[str, typer.Option(help="Tenant of the run.")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the run finishes.")] = False,
    wait_s: Annotated[float, typer.Option(help="How long --wait waits.")] = 120.0,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a run by producing a run request."""
    text = Path(input[1:]).read_text() if input.startswith("@") else input
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/red] --input is not JSON: {exc}")
        raise typer.Exit(2) from None
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> tuple[str, RunState | None]:
        async with Client(settings) as c:
            sent_ms = int(time.time() * 1000)  # the request's timestamp is at least this (CreateTime)
            rid = await c.submit(RunRequest(workflow=workflow, input=data, run_id=run_id, tenant=tenant))
            state = (await c.wait_terminal([rid], wait_s=wait_s, since_ms=sent_ms))[rid] if wait else None
            return rid, state

    rid, state = run_command(main())
    if as_json:
        print(json.dumps({"run_id": rid, "state": state.model_dump(mode="json") if state else None}))
    else:
        out.print(
            f"submitted {rid}" + (f": {state.status} ({state.outcome or state.error})" if state else "")
        )


def status(
    run_id: str,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A run's state, its steps and its event history."""
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> tuple[RunState | None, list[RunEvent], str | None, list[Any]]:
        from calmrun.check.takeover import group_serves, waiting_for
        from calmrun.streams.journal import read_request_costs

        async with Client(settings) as c:
            state = await c.state(run_id)
            events = await c.run_events(state) if state is not None else []
        live = state is not None and not state.is_terminal()
        waiting = waiting_for(state, await group_serves(settings)) if state is not None and live else None
        return (
            state,
            events,
            waiting,
            await read_request_costs(settings, run_id, state.created_ms) if state else [],
        )

    state, events, waiting, requests = run_command(main())
    if state is None:
        err.print(f"[red]error:[/red] no run {run_id!r} in {settings.kafka.prefix}.runs.state")
        raise typer.Exit(1)
    if as_json:
        print(
            json.dumps(
                {
                    "state": state.model_dump(mode="json"),
                    "events": [e.model_dump(mode="json") for e in events],
                    "waiting": waiting,
                    "requests": [dataclasses.asdict(r) for r in requests],
                },
                default=str,
            )
        )
        return
    print_status(state, events, waiting, requests)


def step_status(st: StepState) -> str:
    """A step's status for people: with its loop iteration and, for a map, its elements done."""
    text = st.status + (f" (iteration {st.iteration})" if st.iteration else "")
    if st.map is not None:
        m = st.map
        failed = f", {len(m.errors)} failed" if m.errors else ""
        text += f" ({m.done}/{m.size} elements, {len(m.running)} in flight{failed})"
    return text


def family_lines(state: RunState, events: list[RunEvent]) -> list[str]:
    """The run's parent and children (``kind: workflow``), for ``calmrun status``."""
    lines = []
    if state.parent:
        p = state.parent
        lines.append(f"child of {p.get('run_id')} ({p.get('workflow')}, step {p.get('step')})")
    children = [f"{e.data.get('child_run_id')} ({e.step})" for e in events if e.type == "step.child_started"]
    if children:
        lines.append(f"children: {', '.join(children)}; spent ${state.spent_usd} with theirs")
    return lines


def print_status(
    state: RunState, events: list[RunEvent], waiting: str | None = None, requests: list[Any] | None = None
) -> None:
    """Render one run for people: header, steps with cost, then the event history."""
    digest = f" ({state.digest})" if state.digest else ""
    out.print(
        f"[bold]{state.run_id}[/bold]  workflow {state.workflow} v{state.version}{digest}  "
        f"tenant {state.tenant}  status [bold]{state.status}[/bold]  outcome {state.outcome or '-'}"
    )
    if waiting:  # pinned to a version no worker of the group serves (calmrun.streams.versions)
        held = f"; {len(state.held)} commands held for it" if state.held else ""
        out.print(f"  [yellow]{waiting}[/yellow]{held}")
    if state.error:  # a cancelled run has no error type: its "error" says who cancelled it and why
        out.print(f"  error: {state.error_type}: {state.error}" if state.error_type else f"  {state.error}")
    for line in family_lines(state, events):
        out.print(f"  {line}")
    from calmrun.cli.costs import step_costs

    costs = step_costs(events)
    steps = Table("step", "status", "attempts", "latency ms", "tokens", "api calls", "cost $", title="steps")
    for name, st in state.steps.items():
        c = costs.get(name)
        steps.add_row(
            name,
            step_status(st),
            str(st.attempt),
            f"{c.latency_ms:.1f}" if c else "0.0",
            str(c.tokens_in + c.tokens_out) if c else "0",
            str(c.api_calls) if c else "0",
            f"{c.cost_usd:.6f}" if c else "0.000000",
        )
    out.print(steps)
    if requests:
        from calmrun.cli.costs import request_table

        out.print(request_table(requests))
    from calmrun.cli.runcommands import waiting_lines

    for line in waiting_lines(state, events):
        out.print(line)
    history = Table("seq", "at", "event", "step", "attempt", "detail", title="history")
    for e in events:
        detail = {k: v for k, v in e.data.items() if k not in ("output", "input", "outputs")}
        history.add_row(
            str(e.seq),
            clock_text(e.at_ms),
            e.type,
            e.step or "",
            str(e.attempt or ""),
            json.dumps(detail)[:90],
        )
    out.print(history)


def runs(
    limit: Annotated[int, typer.Option(help="Most recent N runs.")] = 20,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recent runs and their status."""
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> dict[str, RunState]:
        async with Client(settings) as c:
            return await c.read_states()

    states = run_command(main())
    recent = sorted(states.values(), key=lambda s: s.created_ms, reverse=True)[:limit]
    if as_json:
        print(json.dumps({"summary": summarize(states), "runs": [s.model_dump(mode="json") for s in recent]}))
        return
    print_runs(recent, states)


def print_runs(recent: list[RunState], states: dict[str, RunState]) -> None:
    table = Table("run", "workflow", "status", "outcome", "steps", "created", title=f"{len(states)} runs")
    for s in recent:
        table.add_row(
            s.run_id,
            s.workflow,
            s.status,
            s.outcome or s.error_type or "-",
            str(len(s.steps)),
            clock_text(s.created_ms),
        )
    out.print(table)
    out.print(summarize(states))


def models(
    config: ConfigOpt = None,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Ask each model if it answers.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each health probe.")] = 5.0,
) -> None:
    """List the model aliases, what each resolves to and whether it answers (exit 1 when one does not).

    The probe spends no tokens: an OpenAI-compatible server must list the model on ``GET /models``.
    """
    from calmrun.agents import ModelRegistry

    settings = cli_settings(config, None, None)
    registry = ModelRegistry(settings.models)
    health = run_command(registry.probe_all(timeout_s=timeout)) if probe else {}
    table = Table("alias", "resolves to", *(["answers"] if probe else []))
    for alias in registry.aliases:
        row = [alias, registry.describe(alias)]
        if probe:
            ok, detail = health[alias]
            row.append(("[green]yes[/green] " if ok else "[red]no[/red] ") + escape(detail))
        table.add_row(*row)
    out.print(table)
    if probe and not all(ok for ok, _ in health.values()):
        raise typer.Exit(1)
