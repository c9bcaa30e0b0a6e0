"""``calmrun deploy check`` and ``calmrun versions``: deploying a new version with runs in flight."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from calmrun.cli.common import (
    BootstrapOpt,
    ConfigOpt,
    JsonOpt,
    PrefixOpt,
    cli_settings,
    err,
    load_workflows,
    out,
    run_command,
)

if TYPE_CHECKING:
    from calmrun.check.takeover import Takeover
    from calmrun.workflow.registry import Pin

deploy_app = typer.Typer(help="Deploying a new workflow version with runs in flight.", no_args_is_help=True)


@deploy_app.command("check")
def deploy_check(
    new: Annotated[Path, typer.Argument(help="The new workflow definition (YAML).")],
    finished: Annotated[
        int, typer.Option("--finished", help="Also re-decide the last N finished runs of the workflow.")
    ] = 0,
    migrate: Annotated[
        bool, typer.Option("--migrate", help="Move the runs in flight that converge to the new version.")
    ] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-decide the recorded history of the runs in flight against NEW: can it take each over?

    Exit 1 when a run would diverge (it must stay pinned to its version); 0 when every run converges.
    With --migrate, a ``migrate`` command is sent for each converging run in flight (a worker serving
    NEW decides it as ``run.migrated``); runs that diverge stay where they are.
    """
    (wf,) = load_workflows([new])
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> tuple[list[Takeover], list[str]]:
        from calmrun.check.takeover import group_members, send_migrations, takeover, unready_for
        from calmrun.replay.snapshot import scan_runs

        why = unready_for(wf, await group_members(settings)) if migrate else None
        if why is not None:
            err.print(f"[red]error:[/red] not migrating: {why}")
            raise typer.Exit(2)
        snaps = await scan_runs(settings)
        verdicts = takeover(wf, snaps.values(), finished=finished)
        sent = await send_migrations(settings, wf, verdicts, by=_who()) if migrate else []
        return verdicts, sent

    from calmrun.check.takeover import MUST_STAY

    verdicts, sent = run_command(main())
    diverging = [v for v in verdicts if v.verdict == MUST_STAY]
    if as_json:
        report = {
            "workflow": wf.name,
            "version": wf.version,
            "digest": wf.digest,
            "runs": [v.to_dict() for v in verdicts],
            "diverging": len(diverging),
            "migrated": sent,
        }
        print(json.dumps(report))
    else:
        table = Table(
            "run", "pinned to", "status", "verdict", "first divergent decision",
            title=f"{wf.name} v{wf.version} ({wf.digest}) against {len(verdicts)} runs",
        )  # fmt: skip
        for v in verdicts:
            colour = "red" if v.verdict == MUST_STAY else "green"
            table.add_row(
                v.run_id, f"v{v.pinned.version} ({v.pinned.digest or '-'})", v.status,
                f"[{colour}]{v.verdict}[/{colour}]", v.why(),
            )  # fmt: skip
        out.print(table)
        out.print(f"{len(diverging)} of {len(verdicts)} runs must stay pinned to their version")
        if migrate:
            out.print(f"migrate sent for {len(sent)} runs in flight")
    if diverging:
        raise typer.Exit(1)


def versions(
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per workflow, the versions with runs in flight (and how many), and what the group's workers serve.

    A version with no run in flight needs no worker any more: the workers serving only it may be stopped.
    """
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> tuple[dict[str, dict[Pin, int]], list[Pin]]:
        from calmrun.check.takeover import group_serves, versions_in_flight
        from calmrun.client import Client

        async with Client(settings) as c:
            states = await c.read_states()
        return versions_in_flight(states.values()), await group_serves(settings) or []

    flying, served = run_command(main())
    rows = []
    for wf, pins in flying.items():
        for p, n in pins.items():
            rows.append((wf, p, n, any(p.served_by(s) for s in served)))
    if as_json:
        print(
            json.dumps(
                {
                    "in_flight": [
                        {"workflow": w, "version": p.version, "digest": p.digest, "runs": n, "served": ok}
                        for w, p, n, ok in rows
                    ],
                    "served": [
                        {"workflow": p.workflow, "version": p.version, "digest": p.digest} for p in served
                    ],
                }
            )
        )
        return
    table = Table(
        "workflow", "version", "digest", "runs in flight", "served by a worker", title="versions in flight"
    )
    for w, p, n, ok in rows:
        table.add_row(w, p.version, p.digest or "-", str(n), "yes" if ok else "[red]no[/red]")
    out.print(table)
    if served:
        out.print("workers of the group serve: " + ", ".join(str(p) for p in served))
    else:
        err.print("no worker of the group publishes what it serves (none running?)")


def _who() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"
