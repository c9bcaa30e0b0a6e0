"""What every ``calmrun`` sub-command shares: settings from flags; errors as one line and an exit code."""

from __future__ import annotations

from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from calmrun import eventloop
from calmrun.errors import CalmrunError
from calmrun.eventloop import EventLoop
from calmrun.settings import Settings, load_settings
from calmrun.workflow.definition import WorkflowDef, load_workflow

err = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", envvar="CALMRUN_CONFIG", help="YAML settings file.")
]
BootstrapOpt = Annotated[
    str | None, typer.Option("--bootstrap", "-b", help="Kafka brokers: host:port[,host:port...].")
]
PrefixOpt = Annotated[str | None, typer.Option("--prefix", help="Topic prefix (default calmrun).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def cli_settings(config: Path | None, bootstrap: str | None, prefix: str | None, **worker: Any) -> Settings:
    """Settings from ``--config``, the environment and the common flags; a bad source exits with code 2."""
    kafka = {k: v for k, v in {"bootstrap": bootstrap, "prefix": prefix}.items() if v is not None}
    worker = {k: v for k, v in worker.items() if v is not None}
    try:
        return load_settings(
            config, **({"kafka": kafka} if kafka else {}), **({"worker": worker} if worker else {})
        )
    except CalmrunError as exc:  # a bad file or variable: one line that names it, not a traceback
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def run_command(
    coro: Coroutine[Any, Any, T],
    *,
    usage_errors: tuple[type[Exception], ...] = (),
    loop: EventLoop = "asyncio",
) -> T:
    """Run a command's coroutine on ``loop``; a calmrun error is one line, exit 1 (2 for ``usage_errors``)."""
    try:
        return eventloop.run(coro, loop)
    except CalmrunError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2 if isinstance(exc, usage_errors) else 1) from None


out = Console()

WorkflowFiles = Annotated[
    list[Path],
    typer.Option(
        "--workflow",
        "-w",
        help="Workflow YAML file, or a folder of them (repeatable; several versions are fine).",
    ),
]


def load_workflows(files: list[Path]) -> list[WorkflowDef]:
    """The definitions of ``files`` (a folder: its ``*.yaml``/``*.yml``, by name); a bad one, or two
    different definitions under one name and version, is one line on stderr and exit code 2."""
    from calmrun.workflow.registry import Definitions

    paths = [q for f in files for q in (sorted([*f.glob("*.yaml"), *f.glob("*.yml")]) if f.is_dir() else [f])]
    try:
        wfs = [load_workflow(f) for f in paths]
        Definitions(wfs)  # the same name and version twice with different content: refused here
        return wfs
    except CalmrunError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def clock_text(ms: int | None) -> str:
    """An event time as ``HH:MM:SS.mmm`` (UTC), ``-`` for none."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]
