"""``calmrun replay ...`` and ``calmrun snapshot``: typer commands (registered by ``calmrun.cli``).

Exit codes: 0 done (recorded replay: converged), 1 an error (unreachable broker, unknown run), 2 bad
arguments (nothing was written), 3 recorded replay diverged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar
from uuid import uuid4

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from calmrun.cli.common import BootstrapOpt, ConfigOpt, JsonOpt, PrefixOpt, cli_settings, run_command
from calmrun.errors import CalmrunError, ReplayArgumentError
from calmrun.replay import report
from calmrun.replay.reproduce import replay_offsets
from calmrun.replay.snapshot import Snapshot, fetch_snapshot, fetch_snapshots, load_snapshot
from calmrun.settings import ModelAlias, Settings, load_settings
from calmrun.workflow.definition import WorkflowDef, load_workflow

T = TypeVar("T")
replay_app = typer.Typer(
    help="Replay past runs: offsets into a shadow namespace, recorded decisions, or live agents.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

DefinitionOpt = Annotated[
    list[Path],
    typer.Option(
        "--workflow",
        "-w",
        help="Workflow YAML to replay against (repeatable: several versions). Definitions are not stored "
        "in Kafka, so replay needs the file.",
    ),
]
VersionOpt = Annotated[
    str | None,
    typer.Option(
        "--workflow-version",
        help="Replay against this version of the given definitions (default: the run's recorded version if "
        "given, else the last file).",
    ),
]
ModeOpt = Annotated[str, typer.Option("--mode", help="recorded (decider only) or live (agents run again).")]
ModelsOpt = Annotated[
    Path | None,
    typer.Option("--models", help="Live: YAML with `models:` aliases that replace the configured ones."),
]
ModelOpt = Annotated[
    list[str] | None, typer.Option("--model", help="Live: ALIAS=SPEC, e.g. smart=openai:gpt-4o (repeatable).")
]
AgentsOpt = Annotated[str | None, typer.Option("--agents", help="recorded: re-run agents from their journal")]
ShadowOpt = Annotated[
    str | None, typer.Option("--shadow", help="Live: shadow prefix (default <prefix>-replay-<random>).")
]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return run_command(coro, usage_errors=(ReplayArgumentError,))


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _time_ms(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(f"{flag} {value!r} is not an ISO time (e.g. 2025-05-01T12:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _definitions(files: list[Path]) -> list[WorkflowDef]:
    if not files:
        raise _fail("give the workflow definition to replay against with --workflow FILE")
    try:
        return [load_workflow(f) for f in files]
    except CalmrunError as exc:
        raise _fail(str(exc)) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


class _Bar:
    """A rich progress task fed with (done, total); shows records or runs per second."""

    def __init__(self, progress: Progress, what: str, unit: str) -> None:
        self.p, self.unit = progress, unit
        self.task = progress.add_task(what, total=None, rate="")

    def __call__(self, done: int, total: int) -> None:
        self.p.update(self.task, completed=done, total=total)
        speed = self.p.tasks[self.task].speed
        self.p.update(self.task, rate=f"{speed:,.0f} {self.unit}/s" if speed else "")


def _models(settings: Settings, models_file: Path | None, model: list[str] | None) -> Settings:
    aliases = dict(settings.models)
    if models_file is not None:
        aliases.update(load_settings(models_file).models)
    for spec in model or []:
        alias, sep, target = spec.partition("=")
        if not sep or not alias or not target:
            raise _fail(f"--model takes ALIAS=SPEC, not {spec!r}")
        aliases[alias] = ModelAlias(model=target)
    return settings.model_copy(update={"models": aliases})


@replay_app.command("offsets")
def offsets(
    topic: Annotated[
        str, typer.Option("--topic", "-t", help="Topic, or its name under the prefix (runs.requests).")
    ],
    into: Annotated[str, typer.Option("--into", help="live, or shadow:NAME (a separate topic prefix).")],
    from_offset: Annotated[
        int | None, typer.Option("--from-offset", help="First offset (every partition).")
    ] = None,
    from_time: Annotated[
        str | None, typer.Option("--from-time", help="First record at/after this ISO time.")
    ] = None,
    to_offset: Annotated[int | None, typer.Option("--to-offset", help="Last offset, inclusive.")] = None,
    to_time: Annotated[str | None, typer.Option("--to-time", help="Records before this ISO time.")] = None,
    partition: Annotated[
        list[int] | None, typer.Option("--partition", "-p", help="Only this partition.")
    ] = None,
    run_id: Annotated[
        list[str] | None, typer.Option("--run-id", help="Only records keyed by this run.")
    ] = None,
    yes_live: Annotated[
        bool, typer.Option("--yes-live", help="Confirm --into live (writes production).")
    ] = False,
    rate: Annotated[
        float | None, typer.Option("--rate", help="At most this many records per second.")
    ] = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-produce a range of a topic (keys, headers and partitions intact) into a shadow namespace or live."""
    settings = cli_settings(config, bootstrap, prefix)
    start_ms, end_ms = _time_ms(from_time, "--from-time"), _time_ms(to_time, "--to-time")

    async def main() -> Any:
        with _progress() as p:
            return await replay_offsets(
                settings,
                topic,
                into=into,
                from_offset=from_offset,
                from_time_ms=start_ms,
                to_offset=to_offset,
                to_time_ms=end_ms,
                partitions=partition,
                run_ids=run_id,
                confirm_live=yes_live,
                rate=rate,
                on_progress=_Bar(p, "replaying", "rec"),
            )

    result = _run(main())
    if as_json:
        print(report.dumps(result.to_dict()))
    else:
        report.print_offsets(out, result)
        if result.into.startswith("shadow:"):
            name = result.into.split(":", 1)[1]
            out.print(f"process them with a worker on that namespace: calmrun worker -w ... --prefix {name}")


def _snapshot_of(run: str, settings: Settings) -> Snapshot:
    path = Path(run)
    if path.suffix == ".json" or path.is_file():
        return _run(_load(path))
    return _run(fetch_snapshot(settings, run))


async def _load(path: Path) -> Snapshot:
    return load_snapshot(path)


@replay_app.command("run")
def run(
    run: Annotated[str, typer.Argument(help="Run ID, or a snapshot file from `calmrun snapshot`.")],
    workflow: DefinitionOpt = [],  # noqa: B006 - typer reads the default
    workflow_version: VersionOpt = None,
    mode: ModeOpt = "recorded",
    agents: AgentsOpt = None,
    models_file: ModelsOpt = None,
    model: ModelOpt = None,
    shadow: ShadowOpt = None,
    wait_s: Annotated[float, typer.Option(help="Live: how long to wait for the replay.")] = 300.0,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay one run against its snapshot: re-decide it (recorded) or run its agents again (live)."""
    if mode not in ("recorded", "live") or agents not in (None, "recorded") or (agents and mode == "live"):
        raise _fail(f"--mode takes recorded or live; --agents recorded needs --mode recorded ({mode!r})")
    defs = _definitions(workflow)
    settings = cli_settings(config, bootstrap, prefix)
    snap = _snapshot_of(run, settings)
    if mode == "recorded":
        from calmrun.errors import ReplayError
        from calmrun.replay.recorded import replay_given

        try:
            result = replay_given(defs, snap, workflow_version)
        except ReplayError as exc:
            raise _fail(str(exc), 1) from None
        replays = None
        if agents == "recorded":
            from calmrun.replay.agents import replay_run_agents

            sys.path.insert(0, os.getcwd())  # agent references resolve from the current directory
            replays = _run(replay_run_agents(settings, snap))
        if as_json:
            data = result.to_dict()
            if replays is not None:
                data["agents"] = [a.to_dict() for a in replays]
            print(report.dumps(data))
        else:
            report.print_recorded(out, result)
            if replays is not None:
                report.print_agents(out, replays)
        if result.verdict != "converged" or any(a.verdict != "converged" for a in replays or ()):
            raise typer.Exit(3)
        return
    lives = _live(settings, [snap], defs, workflow_version, models_file, model, shadow, wait_s)
    if as_json:
        print(report.dumps(lives[0].to_dict()))
    else:
        report.print_live(out, lives[0])


def _live(
    settings: Settings,
    snaps: list[Snapshot],
    defs: list[WorkflowDef],
    version: str | None,
    models_file: Path | None,
    model: list[str] | None,
    shadow: str | None,
    wait_s: float,
) -> list[Any]:
    from calmrun.agents import AgentRegistry, ModelRegistry
    from calmrun.replay.live import replay_live

    sys.path.insert(0, os.getcwd())  # agent references resolve from the current directory, as for `worker`
    settings = _models(settings, models_file, model)
    name = shadow or f"{settings.kafka.prefix}-replay-{uuid4().hex[:8]}"

    async def main() -> Any:
        with _progress() as p:
            return await replay_live(
                settings,
                snaps,
                defs,
                AgentRegistry(),
                ModelRegistry(settings.models),
                shadow=name,
                version=version,
                wait_s=wait_s,
                on_progress=_Bar(p, f"live replay in {name}", "runs"),
            )

    return list(_run(main()))


@replay_app.command("runs")
def runs(
    workflow: DefinitionOpt = [],  # noqa: B006
    since: Annotated[
        str | None, typer.Option("--since", help="Runs requested at/after this ISO time.")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Runs requested before this ISO time.")] = None,
    workflow_version: VersionOpt = None,
    mode: ModeOpt = "recorded",
    limit: Annotated[int | None, typer.Option(help="At most this many runs (the oldest first).")] = None,
    models_file: ModelsOpt = None,
    model: ModelOpt = None,
    shadow: ShadowOpt = None,
    wait_s: Annotated[float, typer.Option(help="Live: how long to wait for the replays.")] = 600.0,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay every run of the given workflow requested in [--since, --until) and summarise."""
    if mode not in ("recorded", "live"):
        raise _fail(f"--mode must be recorded or live, not {mode!r}")
    defs = _definitions(workflow)
    names = sorted({d.name for d in defs})
    if len(names) != 1:
        raise _fail(f"give definitions of one workflow, not {names}")
    since_ms, until_ms = _time_ms(since, "--since"), _time_ms(until, "--until")
    settings = cli_settings(config, bootstrap, prefix)

    async def read() -> list[Snapshot]:
        with _progress() as p:
            bar = _Bar(p, "reading history", "events")
            return await fetch_snapshots(
                settings,
                workflow=names[0],
                since_ms=since_ms,
                until_ms=until_ms,
                on_progress=lambda n: bar(n, n),
            )

    snaps = _run(read())[: limit if limit is not None else None]
    if not snaps:
        raise _fail(
            f"no run of {names[0]!r} was requested in that window under prefix {settings.kafka.prefix!r}", 1
        )
    if mode == "live":
        lives = _live(settings, snaps, defs, workflow_version, models_file, model, shadow, wait_s)
        if as_json:
            print(report.dumps([r.to_dict() for r in lives]))
        else:
            report.print_batch_live(out, lives)
        return
    from calmrun.replay.recorded import replay_recorded_many

    with _progress() as p:
        bar = _Bar(p, "recorded replay", "runs")
        batch = replay_recorded_many(
            defs,
            snaps,
            version=workflow_version,
            on_progress=lambda n: bar(n, len(snaps)) if n % 100 == 0 or n == len(snaps) else None,
        )
    if as_json:
        print(
            report.dumps(
                {
                    "runs": batch.runs,
                    "converged": batch.converged,
                    "diverged": batch.diverged,
                    "errors": batch.errors,
                    "elapsed_s": round(batch.elapsed_s, 3),
                    "runs_per_s": round(batch.runs_per_s, 1),
                    "divergent": [r.to_dict() for r in batch.divergent],
                    "failed": batch.failed,
                }
            )
        )
    else:
        report.print_batch_recorded(out, batch)
    if batch.diverged:
        raise typer.Exit(3)


def snapshot(
    run_id: Annotated[str, typer.Argument(help="Run ID.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default stdout).")
    ] = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Export a run's state and event history as JSON (replayable with `calmrun replay run FILE`)."""
    settings = cli_settings(config, bootstrap, prefix)
    snap = _run(fetch_snapshot(settings, run_id))
    text = snap.to_json()
    if output is None:
        print(text)
    else:
        output.write_text(text + "\n")
        err.print(
            f"wrote {output}: {len(snap.events)} events, status {snap.state.status if snap.state else '-'}"
        )
