"""The ``calmrun`` command: workers, run requests, status, dead letters and topics.

Settings are built once here (``--config`` file < ``CALMRUN_*`` environment < flags) and passed down.
Human-readable output by default; ``--json`` for scripts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.cli_common import BootstrapOpt, ConfigOpt, JsonOpt, PrefixOpt, cli_settings, run_command
from calmrun.client import Client, summarize
from calmrun.costs.cli import aggregator, costs_app, step_costs
from calmrun.errors import CalmrunError
from calmrun.kafka.topics import ensure_topics
from calmrun.replay.cli import replay_app, snapshot
from calmrun.workflow.definition import WorkflowDef, load_workflow
from calmrun.workflow.events import RunEvent, RunRequest
from calmrun.workflow.state import RunState

T = TypeVar("T")
app = typer.Typer(help="calmrun: a Kafka-native runtime for AI-agent workflows.", no_args_is_help=True)
dlq_app = typer.Typer(help="The quarantine: dead-letter topics.", no_args_is_help=True)
topics_app = typer.Typer(help="calmrun's Kafka topics.", no_args_is_help=True)
check_app = typer.Typer(help="Checks over what calmrun has written.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(topics_app, name="topics")
app.add_typer(check_app, name="check")
app.add_typer(replay_app, name="replay")
app.command("snapshot")(snapshot)
app.add_typer(costs_app, name="costs")
app.command("costs-aggregator")(aggregator)
out = Console()
err = Console(stderr=True)

WorkflowFiles = Annotated[
    list[Path], typer.Option("--workflow", "-w", help="Workflow YAML file (repeatable).")
]


_run = run_command


def _workflows(files: list[Path]) -> list[WorkflowDef]:
    try:
        return [load_workflow(f) for f in files]
    except CalmrunError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _ms(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]


@app.command()
def worker(
    workflow: WorkflowFiles,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Step tasks run at once.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Run the given workflows until SIGINT/SIGTERM. Agent references resolve from the current directory."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    sys.path.insert(0, os.getcwd())
    settings = cli_settings(config, bootstrap, prefix, max_in_flight=max_in_flight)
    wfs = _workflows(workflow)

    async def main() -> None:
        from prometheus_client import CollectorRegistry

        from calmrun.streams.metrics import WorkerMetrics
        from calmrun.streams.worker import Worker

        metrics = WorkerMetrics(CollectorRegistry()) if settings.metrics.port else None
        w = Worker(settings, wfs, AgentRegistry(), ModelRegistry(settings.models), metrics=metrics)
        await w.run(
            lambda: err.print(
                f"worker running {[wf.name for wf in wfs]} on {settings.kafka.bootstrap}; Ctrl-C stops it"
            )
        )

    _run(main())


@app.command()
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
            rid = await c.submit(RunRequest(workflow=workflow, input=data, run_id=run_id, tenant=tenant))
            state = (await c.wait_terminal([rid], wait_s=wait_s))[rid] if wait else None
            return rid, state

    rid, state = _run(main())
    if as_json:
        print(json.dumps({"run_id": rid, "state": state.model_dump(mode="json") if state else None}))
    else:
        out.print(
            f"submitted {rid}" + (f": {state.status} ({state.outcome or state.error})" if state else "")
        )


@app.command()
def status(
    run_id: str,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A run's state, its steps and its event history."""
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> tuple[RunState | None, list[RunEvent]]:
        async with Client(settings) as c:
            state = await c.state(run_id)
            return state, (await c.run_events(state) if state is not None else [])

    state, events = _run(main())
    if state is None:
        err.print(f"[red]error:[/red] no run {run_id!r} in {settings.kafka.prefix}.runs.state")
        raise typer.Exit(1)
    if as_json:
        print(
            json.dumps(
                {
                    "state": state.model_dump(mode="json"),
                    "events": [e.model_dump(mode="json") for e in events],
                }
            )
        )
        return
    print_status(state, events)


def print_status(state: RunState, events: list[RunEvent]) -> None:
    """Render one run for people: header, steps with cost, then the event history."""
    out.print(
        f"[bold]{state.run_id}[/bold]  workflow {state.workflow} v{state.version}  tenant {state.tenant}  "
        f"status [bold]{state.status}[/bold]  outcome {state.outcome or '-'}"
    )
    if state.error:
        out.print(f"  error: {state.error_type}: {state.error}")
    costs = step_costs(events)
    steps = Table("step", "status", "attempts", "latency ms", "tokens", "api calls", "cost $", title="steps")
    for name, st in state.steps.items():
        c = costs.get(name)
        steps.add_row(
            name,
            st.status,
            str(st.attempt),
            f"{c.latency_ms:.1f}" if c else "0.0",
            str(c.tokens_in + c.tokens_out) if c else "0",
            str(c.api_calls) if c else "0",
            f"{c.cost_usd:.6f}" if c else "0.000000",
        )
    out.print(steps)
    history = Table("seq", "at", "event", "step", "attempt", "detail", title="history")
    for e in events:
        detail = {k: v for k, v in e.data.items() if k not in ("output", "input", "outputs")}
        history.add_row(
            str(e.seq), _ms(e.at_ms), e.type, e.step or "", str(e.attempt or ""), json.dumps(detail)[:90]
        )
    out.print(history)


@app.command()
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

    states = _run(main())
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
            _ms(s.created_ms),
        )
    out.print(table)
    out.print(summarize(states))


@dlq_app.command("tail")
def dlq_tail(
    workflow: Annotated[str, typer.Option("--workflow", "-w", help="Workflow (or _invalid).")] = "_invalid",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records.")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the quarantined records of a workflow's dead-letter topic, with their cause."""
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> None:
        from calmrun.wire.dlqview import RawEntry, entry_json, entry_line

        async with Client(settings) as c:
            async for rec in c.dlq_entries(workflow, follow=follow):
                if as_json:
                    print(json.dumps(entry_json(rec, c.codec)), flush=True)
                else:
                    when = "-" if isinstance(rec, RawEntry) else _ms(rec.at_ms)
                    out.print(escape(entry_line(rec, c.codec, when)), soft_wrap=True)

    with contextlib.suppress(KeyboardInterrupt):
        _run(main())


@check_app.command("history")
def check_history_cmd(
    workflow: Annotated[
        list[Path] | None,
        typer.Option("--workflow", "-w", help="Definitions to re-decide each run against (repeatable)."),
    ] = None,
    run_id: Annotated[
        list[str] | None, typer.Option("--run-id", help="Only these runs (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Violations to print at most.")] = 20,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check that every run has one history (events, state, dead letters); exit 1 on any violation."""
    from calmrun.check import check_history

    settings = cli_settings(config, bootstrap, prefix)
    wfs = _workflows(workflow or [])
    report = _run(check_history(settings.kafka, wfs, run_ids=run_id))
    if as_json:
        print(json.dumps(report.to_dict(limit)))
    else:
        out.print(escape(report.summary()))
        if not wfs:
            out.print("(no --workflow given: states were not re-decided from the events)")
        for v in report.violations[:limit]:
            out.print(f"  {v.run_id}  [bold]{v.rule}[/bold]  {escape(v.detail)}  {'; '.join(v.events)}")
    if not report.ok:
        raise typer.Exit(1)


@dlq_app.command("redrive")
def dlq_redrive(
    workflow: Annotated[str, typer.Option("--workflow", "-w", help="Workflow whose DLQ to re-drive.")],
    run_id: Annotated[
        list[str] | None, typer.Option("--run-id", help="Only these runs (repeatable).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every quarantined run and poison record.")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Re-inject quarantined runs (after a fix) so they continue from the failed step."""
    if not run_id and not all_:
        err.print("[red]error:[/red] name runs with --run-id, or re-drive everything with --all")
        raise typer.Exit(2)
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> tuple[int, int]:
        async with Client(settings) as c:
            import getpass

            by = f"cli:{getpass.getuser()}"
            return await c.redrive(workflow, set(run_id) if run_id else None, by=by)

    runs_n, records = _run(main())
    out.print(f"re-driven: {runs_n} runs, {records} poison records re-injected")


@app.command()
def ui(
    workflow: Annotated[
        list[Path] | None,
        typer.Option("--workflow", "-w", help="Workflow YAML, for 'replay this run' (repeatable)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default ui.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default ui.port, 8765; 0: any free port).")] = None,
    token: Annotated[
        str | None, typer.Option(envvar="CALMRUN_UI_TOKEN", help="Bearer token of one operator.")
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(hidden=True, help="Write the address here.")] = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Serve the operator page: runs, a run's timeline, dead letters (redrive), costs, workers; live."""
    from calmrun.ui.cli import serve  # here, not at the top: `calmrun --help` stays quick

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = cli_settings(config, bootstrap, prefix)
    ui_over = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = base.model_copy(update={"ui": base.ui.model_copy(update=ui_over)}) if ui_over else base
    with contextlib.suppress(KeyboardInterrupt):
        from calmrun.errors import UiAccessError

        _run(serve(settings, _workflows(workflow or []), token, ready_file), usage_errors=(UiAccessError,))


@topics_app.command("create")
def topics_create(
    workflow: WorkflowFiles,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Create every topic of these workflows (idempotent)."""
    settings = cli_settings(config, bootstrap, prefix)
    created = _run(ensure_topics(settings.kafka, _workflows(workflow)))
    out.print(f"created {len(created)} topics" + (": " + ", ".join(created) if created else " (all existed)"))


@app.command()
def acls(
    principal: Annotated[str, typer.Option("--principal", help="User name or principal (User:alice).")],
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role", help="worker, costs, operator, viewer or ui (repeatable; default the first four)."
        ),
    ] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Create them (needs a super user's settings).")
    ] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Print (or apply) the prefixed ACLs that confine a principal to one prefix, per role.

    Without --apply it prints one line per ACL and the same as kafka-acls.sh arguments.
    """
    from calmrun.acls import DEFAULT_ROLES, acls_for, apply_acls

    settings = cli_settings(config, bootstrap, prefix)
    wanted = role or list(DEFAULT_ROLES)
    try:
        bindings = [a for r in wanted for a in acls_for(settings, principal, r)]  # type: ignore[arg-type]
    except CalmrunError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    bindings = list(dict.fromkeys(bindings))
    if apply:
        n = _run(apply_acls(settings, bindings))
        out.print(f"created {n} ACLs for {bindings[0].principal} on prefix {settings.kafka.prefix!r}")
        return
    print(f"# prefix {settings.kafka.prefix!r}, roles {', '.join(wanted)}")
    for a in bindings:
        print(a.line())
    print("# the same with kafka-acls.sh --bootstrap-server ... --command-config admin.properties:")
    for a in bindings:
        print(f"#   kafka-acls.sh {a.kafka_acls_args()}")


@app.command()
def models(
    config: ConfigOpt = None,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Ask each model if it answers.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each health probe.")] = 5.0,
) -> None:
    """List the model aliases, what each resolves to and whether it answers (exit 1 when one does not).

    The probe spends no tokens: an OpenAI-compatible server must list the model on ``GET /models``.
    """
    settings = cli_settings(config, None, None)
    registry = ModelRegistry(settings.models)
    health = _run(registry.probe_all(timeout_s=timeout)) if probe else {}
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
