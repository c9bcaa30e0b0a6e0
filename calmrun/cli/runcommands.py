"""``calmrun approve``, ``reject``, ``signal`` and ``cancel``: people in the loop of a run.

Each verb reads the run's state first (an unknown run, a finished one, or a step that is not waiting is
a clear error here rather than an ``input.ignored`` later), then produces one ``RunCommand`` to the
requests topic keyed by the run ID, as any Kafka client may (see docs/people.md). The worker decides it.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from calmrun.cli.common import (
    BootstrapOpt,
    ConfigOpt,
    PrefixOpt,
    cli_settings,
    clock_text,
    err,
    out,
    run_command,
)
from calmrun.workflow.events import RunCommand, RunEvent
from calmrun.workflow.state import RunState

StepOpt = Annotated[str, typer.Option("--step", "-s", help="The approval step.")]
ByOpt = Annotated[str, typer.Option("--by", help="Who answers (checked against the step's approvers).")]
CommentOpt = Annotated[str | None, typer.Option("--comment", help="Recorded with the answer.")]
ToolCallOpt = Annotated[
    str | None,
    typer.Option(
        "--tool-call",
        help="An agent step's tool call to answer (default: the one it waits on; all when several).",
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


Check = Callable[[RunState], str | None]


def _send(
    run_id: str,
    make: Callable[[RunState], RunCommand],
    check: Check,
    config: Path | None,
    bootstrap: str | None,
    prefix: str | None,
) -> tuple[RunState, RunCommand]:
    """Read the run, let ``check`` refuse it (a message), then send ``make(state)``."""
    settings = cli_settings(config, bootstrap, prefix)

    async def main() -> tuple[RunState | None, RunCommand | None, str | None]:
        from calmrun.client import Client

        async with Client(settings) as c:
            state = await c.state(run_id)
            if state is None:
                return None, None, f"no run {run_id!r} in {settings.kafka.prefix}.runs.state"
            why = check(state)
            if why:
                return state, None, why
            cmd: RunCommand = make(state)
            await c.command(cmd)
            return state, cmd, None

    state, cmd, why = run_command(main())
    if why is not None or state is None or cmd is None:
        raise _fail(why or "not sent")
    return state, cmd


def _waiting_check(step: str) -> Check:
    def check(state: RunState) -> str | None:
        st = state.steps.get(step)
        if st is None or st.status != "waiting":
            where = st.status if st else "not started"
            return f"step {step!r} of run {state.run_id} is not waiting for an answer (it is {where})"
        return None

    return check


def _answer(
    command: Literal["approve", "reject"],
    run_id: str,
    step: str,
    by: str,
    comment: str | None,
    config: Path | None,
    bootstrap: str | None,
    prefix: str | None,
    tool_call: str | None = None,
) -> None:
    def make(state: RunState) -> RunCommand:
        call = tool_call
        st = state.steps.get(step)
        pending = ((st.tool_approval or {}).get("pending") or []) if st is not None else []
        if call is None and len(pending) == 1:  # name it: a copy of this command answers nothing else
            call = str(pending[0]["tool_call_id"])
        return RunCommand(
            command=command,
            run_id=run_id,
            workflow=state.workflow,
            step=step,
            by=by,
            comment=comment,
            tool_call_id=call,
        )

    _send(run_id, make, _waiting_check(step), config, bootstrap, prefix)
    out.print(f"sent: {command} {run_id} step {step} by {by} (calmrun status {run_id} shows the decision)")


def approve(
    run_id: str,
    step: StepOpt,
    by: ByOpt,
    comment: CommentOpt = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    tool_call: ToolCallOpt = None,
) -> None:
    """Approve a waiting approval step (the run goes on), or an agent step's tool call (it runs)."""
    _answer("approve", run_id, step, by, comment, config, bootstrap, prefix, tool_call)


def reject(
    run_id: str,
    step: StepOpt,
    by: ByOpt,
    comment: CommentOpt = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
    tool_call: ToolCallOpt = None,
) -> None:
    """Reject a waiting approval step (on_reject, or routes on approved=false), or an agent step's tool call
    (the rejection is the tool's answer to the agent)."""
    _answer("reject", run_id, step, by, comment, config, bootstrap, prefix, tool_call)


def load_data(text: str | None) -> dict[str, Any]:
    """A signal's payload from ``--data``: JSON text, or ``@file.json``; it must be a JSON object."""
    if text is None:
        return {}
    source = "--data"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise _fail(f"--data {source}: {exc.strerror or exc}", 2) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"{source} is not JSON: {exc}", 2) from None
    if not isinstance(data, dict):
        raise _fail(f"{source}: a signal's payload must be a JSON object, not {type(data).__name__}", 2)
    return data


def signal(
    run_id: str,
    name: Annotated[str, typer.Argument(help="The signal's name (a wait step's `signal`).")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Payload: JSON text or @file.json (an object).")
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who sends it (default cli:<user>).")] = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Send a named signal with a payload: steps waiting for it resume (one not yet waiting keeps it)."""
    payload = load_data(data)
    sender = by or f"cli:{getpass.getuser()}"

    def make(state: RunState) -> RunCommand:
        return RunCommand(
            command="signal", run_id=run_id, workflow=state.workflow, name=name, data=payload, by=sender
        )

    def check(state: RunState) -> str | None:
        return None if state.status == "running" else f"run {run_id} is {state.status}"

    _send(run_id, make, check, config, bootstrap, prefix)
    out.print(f"sent: signal {name} to {run_id} ({len(json.dumps(payload))} bytes of payload)")


def cancel(
    run_id: str,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded on the run.")],
    by: Annotated[str | None, typer.Option("--by", help="Who cancels (default cli:<user>).")] = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Cancel a run: its active steps stop, its succeeded steps are compensated last first (a quarantined
    run, compensated already, is closed for good: no redrive)."""
    sender = by or f"cli:{getpass.getuser()}"

    def make(state: RunState) -> RunCommand:
        return RunCommand(command="cancel", run_id=run_id, workflow=state.workflow, reason=reason, by=sender)

    def check(state: RunState) -> str | None:
        if state.status in ("running", "quarantined", "over_budget"):
            return None
        return f"run {run_id} is {state.status}: nothing to cancel"

    _send(run_id, make, check, config, bootstrap, prefix)
    out.print(f"sent: cancel {run_id} by {sender} (calmrun status {run_id} shows the compensations)")


def waiting_lines(state: RunState, events: list[RunEvent]) -> list[str]:
    """For ``calmrun status``: what each waiting step waits for, and until when."""
    last: dict[str, RunEvent] = {}
    for e in events:
        if e.type == "step.waiting" and e.step is not None:
            last[e.step] = e
    lines = []
    for name, st in sorted(state.steps.items()):
        if st.status != "waiting":
            continue
        seen = last.get(name)
        d = seen.data if seen is not None else {}
        calls = ((st.tool_approval or {}).get("pending") or []) if d.get("kind") == "tool_approval" else []
        if calls:
            who = ", ".join(d.get("approvers") or []) or "anyone"
            shown = "; ".join(
                f"{c.get('tool')}({json.dumps(c.get('args'), sort_keys=True)[:200]}) "
                f"(id {c.get('tool_call_id')})"
                for c in calls
            )
            what = (
                f"approval of tool call {shown} by {who} "
                f"(calmrun approve|reject {state.run_id} --step {name} --by NAME)"
            )
        elif d.get("kind") == "wait":
            what = f"signal {d.get('signal')!r} (calmrun signal {state.run_id} {d.get('signal')} --data ...)"
        else:
            who = ", ".join(d.get("approvers") or []) or "anyone"
            what = f"an approval by {who} (calmrun approve|reject {state.run_id} --step {name} --by NAME)"
        until = f"until {clock_text(st.due_ms)} UTC" if st.due_ms else "with no timeout"
        lines.append(f"  waiting: {name} for {what}, {until}")
    return lines
