"""``calmrun dlq``, ``check``, ``topics``, ``acls`` and ``ui``: the operator's verbs around the runs."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

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
from calmrun.client import Client
from calmrun.errors import CalmrunError
from calmrun.kafka.topics import ensure_topics


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
                    when = "-" if isinstance(rec, RawEntry) else clock_text(rec.at_ms)
                    out.print(escape(entry_line(rec, c.codec, when)), soft_wrap=True)

    with contextlib.suppress(KeyboardInterrupt):
        run_command(main())


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
    wfs = load_workflows(workflow or [])
    report = run_command(check_history(settings.kafka, wfs, run_ids=run_id))
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

    runs_n, records = run_command(main())
    out.print(f"re-driven: {runs_n} runs, {records} poison records re-injected")


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
    pool_metrics: Annotated[
        list[str] | None,
        typer.Option("--pool-metrics", help="A step-pool executor's /metrics URL, for Workers (repeatable)."),
    ] = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Serve the operator page: runs, a run and its actions, the Inbox, dead letters, costs, workers."""
    from calmrun.ui.cli import serve  # here, not at the top: `calmrun --help` stays quick

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = cli_settings(config, bootstrap, prefix)
    ui_over = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = base.model_copy(update={"ui": base.ui.model_copy(update=ui_over)}) if ui_over else base
    with contextlib.suppress(KeyboardInterrupt):
        from calmrun.errors import UiAccessError

        run_command(
            serve(settings, load_workflows(workflow or []), token, ready_file, pool_metrics or []),
            usage_errors=(UiAccessError,),
        )


def topics_create(
    workflow: WorkflowFiles,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Create every topic of these workflows (idempotent)."""
    settings = cli_settings(config, bootstrap, prefix)
    workflows = load_workflows(workflow)
    created = run_command(ensure_topics(settings.kafka, workflows))
    out.print(f"created {len(created)} topics" + (": " + ", ".join(created) if created else " (all existed)"))
    if settings.wire.registry.url is not None:
        from calmrun.cli.registry import check_registry

        check_registry(settings, workflows)


def topics_check(
    workflow: WorkflowFiles,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Report every calmrun topic's partitions, replication factor and min ISR, and Kafka's
    __transaction_state and __consumer_offsets; exit 1 on what cannot keep an acknowledged write
    (a warning only, with kafka.replication_check: warn)."""
    import dataclasses

    from calmrun.kafka.topics import check_topics

    settings = cli_settings(config, bootstrap, prefix)
    report = run_command(check_topics(settings.kafka, load_workflows(workflow)))
    if as_json:
        print(json.dumps(dataclasses.asdict(report)))
    else:
        out.print(f"{report.brokers} brokers")
        for t in report.topics:
            out.print(escape(t.line()))
        for name in report.missing:
            out.print(f"{escape(name)}  missing: calmrun topics create")
        for f in report.findings:
            colour = "red" if f.level == "error" else "yellow"
            out.print(f"[{colour}]{f.level}[/{colour}]: {escape(f.topic)}: {escape(f.problem)}")
            out.print(f"  fix: {escape(f.fix)}", soft_wrap=True)
        if not report.findings and not report.missing:
            out.print(
                "ok: every topic can keep an acknowledged write through the loss of one broker"
                if report.brokers >= 3
                else "ok"
            )
    if report.errors or report.missing:
        raise typer.Exit(1)


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
        n = run_command(apply_acls(settings, bindings))
        out.print(f"created {n} ACLs for {bindings[0].principal} on prefix {settings.kafka.prefix!r}")
        return
    print(f"# prefix {settings.kafka.prefix!r}, roles {', '.join(wanted)}")
    for a in bindings:
        print(a.line())
    print("# the same with kafka-acls.sh --bootstrap-server ... --command-config admin.properties:")
    for a in bindings:
        print(f"#   kafka-acls.sh {a.kafka_acls_args()}")
