"""Rendering replay results for people (rich tables); ``--json`` output is built from ``to_dict``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from calmrun.replay.recorded import BatchRecorded, RecordedReplay
from calmrun.replay.reproduce import OffsetReplay

if TYPE_CHECKING:  # live replay imports the agents: only its types are needed to print it
    from calmrun.replay.live import LiveReplay, Side


def print_offsets(out: Console, r: OffsetReplay) -> None:
    table = Table(
        "partition", "from", "to (excl.)", "selected", "replayed", title=f"{r.source} -> {r.target}"
    )
    for s in r.spans:
        table.add_row(
            str(s.partition), str(s.start), str(s.end), str(s.size), str(r.by_partition.get(s.partition, 0))
        )
    out.print(table)
    skipped = f", {r.filtered} skipped by --run-id" if r.filtered else ""
    out.print(
        f"replayed {r.replayed} of {r.selected} records into {r.target} ({r.into}{skipped}) "
        f"in {r.elapsed_s:.2f}s = {r.rate:,.0f} records/s; each carries header calmrun-replayed-from"
    )


def print_recorded(out: Console, r: RecordedReplay) -> None:
    colour = "green" if r.verdict == "converged" else "red"
    out.print(
        f"[bold]{r.run_id}[/bold]  {r.workflow} recorded v{r.recorded_version}, replayed against "
        f"v{r.replay_version}: {r.decisions} decisions, {r.events} events  "
        f"verdict [bold {colour}]{r.verdict}[/bold {colour}]"
    )
    out.print(f"  path     {' -> '.join(r.original_path)}  ({r.original_status or 'no state'})")
    if r.divergence is None:
        return
    d = r.divergence
    out.print(f"  replay   {' -> '.join(r.replay_path)}")
    out.print(f"  first divergent decision #{d.decision}: {d.input}")
    out.print(f"  [red]{d.reason}[/red]")
    if d.original or d.replay:
        table = Table("recorded", "replay", title=f"decision #{d.decision}")
        n = max(len(d.original), len(d.replay))
        for i in range(n):
            table.add_row(
                _event(d.original[i]) if i < len(d.original) else "",
                _event(d.replay[i]) if i < len(d.replay) else "",
            )
        out.print(table)


def print_agents(out: Console, agents: Sequence[Any]) -> None:
    """The agent-level verdicts of ``replay run --agents recorded`` (``replay.agents.AgentReplay``)."""
    if not agents:
        out.print("  agents   no journaled agent in this run")
        return
    table = Table("step", "attempt", "agent", "calls", "model requests", "verdict", title="agents")
    for a in agents:
        colour = "green" if a.verdict == "converged" else "red"
        table.add_row(
            a.step,
            str(a.attempt),
            a.agent,
            f"{a.answered}/{a.units}",
            str(a.model_requests),
            f"[{colour}]{a.verdict}[/{colour}]",
        )
    out.print(table)
    for a in agents:
        if a.reason:
            out.print(f"  [red]{a.step} attempt {a.attempt}: {a.reason}[/red]")


def print_batch_recorded(out: Console, b: BatchRecorded) -> None:
    out.print(
        f"recorded replay of {b.runs} runs: [green]{b.converged} converged[/green], "
        f"[red]{b.diverged} diverged[/red], {b.errors} not replayable, in {b.elapsed_s:.2f}s "
        f"= {b.runs_per_s:,.0f} runs/s"
    )
    if b.divergent:
        table = Table("run", "decision", "divergence", title="diverged runs")
        for r in b.divergent[:20]:
            assert r.divergence is not None
            table.add_row(r.run_id, str(r.divergence.decision), r.divergence.reason[:110])
        out.print(table)
    for run_id, why in list(b.failed.items())[:10]:
        out.print(f"  {run_id}: {why}")


def print_live(out: Console, r: LiveReplay) -> None:
    out.print(
        f"[bold]{r.run_id}[/bold]  original {r.original_status} ({r.original_outcome or '-'})  "
        f"replay in {r.shadow}: {r.replay_status} ({r.replay_outcome or '-'})"
    )
    out.print(f"  path original {' -> '.join(r.original_path)}")
    out.print(
        f"  path replay   {' -> '.join(r.replay_path)}"
        + ("  (same)" if r.same_path else "  [red](differs)[/red]")
    )
    table = Table(title="per step")
    for name in ("step", "", "status", "try", "model", "latency ms", "tokens", "cost $"):
        table.add_column(name, no_wrap=True)
    table.add_column("output", no_wrap=True, overflow="ellipsis", max_width=30)
    table.add_column("", no_wrap=True)
    for s in r.steps:
        for label, side in (("orig", s.original), ("replay", s.replay)):
            table.add_row(
                s.step if label == "orig" else "",
                label,
                *_side(side),
                "" if label == "orig" or s.same_output else "[red]differs[/red]",
            )
    out.print(table)
    a, b = r.original_total, r.replay_total
    out.print(
        f"  totals   original {a.latency_ms:.1f} ms, {a.tokens} tokens, ${a.cost_usd:.6f}   "
        f"replay {b.latency_ms:.1f} ms, {b.tokens} tokens, ${b.cost_usd:.6f}   "
        f"delta {r.latency_delta_ms:+.1f} ms, {r.tokens_delta:+d} tokens, ${_signed(r.cost_delta_usd)}"
    )


def print_batch_live(out: Console, runs: Sequence[LiveReplay]) -> None:
    same_outcome = sum(
        1 for r in runs if (r.original_status, r.original_outcome) == (r.replay_status, r.replay_outcome)
    )
    same_path = sum(1 for r in runs if r.same_path)
    cost = sum((r.cost_delta_usd for r in runs), Decimal(0))
    tokens = sum(r.tokens_delta for r in runs)
    out.print(
        f"live replay of {len(runs)} runs: {same_path} same path, {len(runs) - same_path} different path; "
        f"{same_outcome} same outcome, {len(runs) - same_outcome} different; "
        f"delta {tokens:+d} tokens, ${_signed(cost)}"
    )
    changes: dict[str, int] = {}
    for r in runs:
        key = f"{r.original_outcome or r.original_status} -> {r.replay_outcome or r.replay_status}"
        changes[key] = changes.get(key, 0) + 1
    table = Table("outcome original -> replay", "runs", title="outcomes")
    for k, n in sorted(changes.items()):
        table.add_row(k, str(n))
    out.print(table)


def dumps(data: Any) -> str:
    return json.dumps(data, default=str)


def _side(s: Side | None) -> list[str]:
    if s is None:
        return ["not run", "", "", "", "", "", ""]
    shown = json.dumps(s.output, separators=(",", ":")) if s.output is not None else (s.error or "-")
    return [
        s.status,
        str(s.attempts),
        s.model or "-",
        f"{s.latency_ms:.1f}",
        str(s.tokens),
        f"{s.cost_usd:.6f}",
        shown,
    ]


def _event(e: dict[str, Any]) -> str:
    data = {k: v for k, v in (e.get("data") or {}).items() if k not in ("output", "outputs", "input")}
    step = f" {e['step']}" if e.get("step") else ""
    attempt = f" #{e['attempt']}" if e.get("attempt") else ""
    return f"{e['seq']} {e['type']}{step}{attempt} {json.dumps(data, default=str)[:70]}"


def _signed(d: Decimal) -> str:
    return f"+{d:.6f}" if d >= 0 else f"-{-d:.6f}"
