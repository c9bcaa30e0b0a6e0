"""What the planner learns from the cost table: per (workflow, step, alias) figures, and cost forecasts.

* ``StepStats`` follows ``<prefix>.costs.totals`` (its ``step`` dimension, one-minute buckets) and gives a
  worker the figures of each ``choose`` step's aliases over the step's window: attempts, accepted attempts
  (succeeded and not escalated for low confidence), escalations, mean cost and latency. The worker stamps
  them on the run request; the decider picks the starting rung from them (``decider.choose_rung``), so a
  replay of the recorded request makes the same choice.
* ``forecast`` turns the table's run records (each run's cost and the ``step/alias`` it ran on) into the
  expected cost per run of a workflow, with a range, and the path frequencies behind it. A step in a loop's
  body or a map step runs more than once per run: the run records say how often (``iterations`` of each
  body step, from ``step.looped``; ``elements`` of each map step, from ``step.mapped``), so each path line
  has its visits per run (mean iterations or elements) and attempts per visit, the forecast lists each
  loop body step's and map step's mean and max, and ``visits`` asks "what if": a step's path cost scaled
  to a given number of iterations or elements, the expected cost moved by the difference.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from calmrun.costs.costtopics import CostTopics, ensure_cost_topics
from calmrun.costs.fold import ALL, bucket_start
from calmrun.costs.table import CostTable
from calmrun.costs.totals import CompactedTail
from calmrun.settings import Settings
from calmrun.workflow.definition import AgentStep, WorkflowDef

Figures = dict[str, dict[str, Any]]


def _sum_figures(values: Iterable[dict[str, Any]], window_s: int) -> dict[str, Any]:
    attempts = accepted = escalated = 0
    cost, latency = Decimal(0), 0.0
    for v in values:
        attempts += int(v.get("attempts", 0))
        accepted += int(v.get("succeeded", 0)) - int(v.get("rejected", 0))
        escalated += int(v.get("escalated", 0))
        cost += Decimal(v.get("cost_usd", "0"))
        latency += float(v.get("latency_ms", 0.0))
    return {
        "attempts": attempts,
        "accepted": accepted,
        "escalated": escalated,
        "mean_cost_usd": str(cost / attempts) if attempts else "0",
        "mean_latency_ms": round(latency / attempts, 3) if attempts else 0.0,
        "window_s": window_s,
    }


class StepStats:
    """Per (workflow, step, alias) figures over a window, from the ``step`` rows of the cost table.

    ``async with StepStats(settings)``; then ``figures(wf, at_ms)``. The figures lag the events by the
    aggregator's lag, like tenant spend.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._rows: dict[tuple[str, str, str], dict[bytes, dict[str, Any]]] = {}
        self._tail = CompactedTail(settings, CostTopics(settings.kafka.prefix).totals, self.apply)

    def apply(self, key: bytes, value: bytes | None) -> None:
        """One totals record (the others are ignored)."""
        if value is None:
            for rows in self._rows.values():
                rows.pop(key, None)
            return
        if not value.startswith(b'{"dim": "step"'):
            return
        v = json.loads(value)
        if v["window"] != "1m":
            return
        workflow, step, alias = str(v["value"]).split("/", 2)
        self._rows.setdefault((workflow, step, alias), {})[key] = v

    def alias_figures(
        self, workflow: str, step: str, alias: str, at_ms: int, window_s: int
    ) -> dict[str, Any]:
        """The figures of one alias of one step over the ``window_s`` before ``at_ms`` (whole minutes)."""
        first = bucket_start(at_ms - window_s * 1000, "1m") + 60_000
        rows = self._rows.get((workflow, step, alias), {})
        return _sum_figures((v for v in rows.values() if first <= v["start_ms"] <= at_ms), window_s)

    def figures(self, wf: WorkflowDef, at_ms: int) -> dict[str, Figures] | None:
        """For each step of ``wf`` with ``choose``: alias -> figures; None when no step chooses."""
        out: dict[str, Figures] = {}
        for sd in wf.steps:
            if not isinstance(sd, AgentStep) or sd.choose is None:
                continue
            window = sd.choose.cheapest_meeting.window_s
            out[sd.name] = {a: self.alias_figures(wf.name, sd.name, a, at_ms, window) for a in sd.models}
        return out or None

    async def start(self) -> None:
        await ensure_cost_topics(self.settings)
        await self._tail.start()

    async def caught_up(self, wait_s: float = 30.0) -> None:
        await self._tail.caught_up(wait_s)

    async def stop(self) -> None:
        await self._tail.stop()

    async def __aenter__(self) -> StepStats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass
class PathLine:
    """One ``step/alias`` of a workflow: how often runs reach it and what it adds per run."""

    path: str
    share: float
    attempts_per_run: float
    cost_per_run: Decimal
    visits_per_run: float = 1.0
    """Mean iterations (a loop body's step) or elements (a map step) of the runs that took it; else 1."""

    @property
    def attempts_per_visit(self) -> float:
        return self.attempts_per_run / self.visits_per_run if self.visits_per_run else 0.0


@dataclass
class ShapeLine:
    """A loop body's step (``loop``: iterations) or a map step (``map``: elements), over the runs that
    ran it: their mean and most."""

    step: str
    kind: str
    runs: int
    mean: float
    most: int


@dataclass
class Forecast:
    """The expected cost per run of a workflow from its observed runs, with a range.

    ``expected`` is the mean; ``low``/``high`` the 10th and 90th percentile run; ``paths`` the steps and
    aliases runs took, with the share of runs that took each and its cost per run (they add to ``expected``).
    """

    workflow: str
    runs: int
    expected: Decimal = Decimal(0)
    low: Decimal = Decimal(0)
    high: Decimal = Decimal(0)
    cheapest: Decimal = Decimal(0)
    dearest: Decimal = Decimal(0)
    paths: list[PathLine] = field(default_factory=list)
    shapes: list[ShapeLine] = field(default_factory=list)
    assumed: dict[str, float] = field(default_factory=dict)
    """Step -> the iterations or elements asked for (``visits``); ``expected`` is moved to them."""

    def as_json(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "runs": self.runs,
            "expected_usd": str(self.expected),
            "p10_usd": str(self.low),
            "p90_usd": str(self.high),
            "min_usd": str(self.cheapest),
            "max_usd": str(self.dearest),
            "paths": [
                {
                    "path": p.path,
                    "share": p.share,
                    "attempts_per_run": p.attempts_per_run,
                    "cost_per_run_usd": str(p.cost_per_run),
                    "visits_per_run": p.visits_per_run,
                    "attempts_per_visit": p.attempts_per_visit,
                }
                for p in self.paths
            ],
            "shapes": [
                {"step": x.step, "kind": x.kind, "runs": x.runs, "mean": x.mean, "max": x.most}
                for x in self.shapes
            ],
            "assumed": self.assumed,
        }


def forecast(
    table: CostTable,
    workflow: str,
    since_ms: int | None = None,
    visits: dict[str, float] | None = None,
) -> Forecast:
    """The forecast of ``workflow`` from its runs in ``table`` (first attempt at or after ``since_ms``).

    ``visits``: step -> iterations (a loop body's step) or elements (a map step) to forecast for instead of
    the observed mean: that step's path lines are scaled by ``visits[step] / visits_per_run`` and
    ``expected`` (and the range) move by what that adds or removes.
    """
    runs = [
        v
        for v in table.records.values()
        if v["dim"] == "run"
        and v["window"] == ALL
        and v.get("workflow") == workflow
        and v.get("attempts", 0)
        and (since_ms is None or int(v.get("first_ms", 0)) >= since_ms)
    ]
    out = Forecast(workflow, len(runs))
    if not runs:
        return out
    costs = sorted(Decimal(v["cost_usd"]) for v in runs)
    n = len(costs)
    out.expected = sum(costs, Decimal(0)) / n
    out.low, out.high = costs[int(0.1 * (n - 1))], costs[int(0.9 * (n - 1))]
    out.cheapest, out.dearest = costs[0], costs[-1]
    reached: dict[str, int] = {}
    attempts: dict[str, int] = {}
    visited: dict[str, int] = {}
    shapes: dict[str, tuple[str, list[int]]] = {}
    maps = {s for v in runs for s in v.get("elements") or {}}
    looped = {s for v in runs for s in v.get("iterations") or {}}
    for v in runs:
        for path, k in (v.get("paths") or {}).items():
            reached[path] = reached.get(path, 0) + 1
            attempts[path] = attempts.get(path, 0) + int(k)
            visited[path] = visited.get(path, 0) + _visits(v, path.partition("/")[0], maps)
        steps = {p.partition("/")[0] for p in v.get("paths") or {}} | set(v.get("elements") or {})
        for step in sorted(steps & (maps | looped)):
            kind = "map" if step in maps else "loop"
            shapes.setdefault(step, (kind, []))[1].append(_visits(v, step, maps))
    per_attempt = _cost_per_attempt(table, workflow)
    delta = Decimal(0)
    for path in sorted(reached):
        cost = per_attempt.get(path, Decimal(0)) * attempts[path] / n
        line = PathLine(path, reached[path] / n, attempts[path] / reached[path], cost)
        line.visits_per_run = visited[path] / reached[path]
        step = path.partition("/")[0]
        if visits and step in visits:
            scaled = cost * Decimal(str(visits[step])) / Decimal(str(line.visits_per_run))
            delta += scaled - cost
            line.cost_per_run = scaled
        out.paths.append(line)
    for step, (kind, counts) in sorted(shapes.items()):
        out.shapes.append(ShapeLine(step, kind, len(counts), sum(counts) / len(counts), max(counts)))
    if visits:
        out.assumed = dict(visits)
        out.expected, out.low, out.high = out.expected + delta, out.low + delta, out.high + delta
        out.cheapest, out.dearest = out.cheapest + delta, out.dearest + delta
    return out


def _visits(run: dict[str, Any], step: str, maps: set[str]) -> int:
    """How often ``run`` visited ``step``: its elements (a map step), its iterations (a loop's body), or 1."""
    if step in maps:
        return int((run.get("elements") or {}).get(step, 0)) or 1
    return int((run.get("iterations") or {}).get(step, 1))


def _cost_per_attempt(table: CostTable, workflow: str) -> dict[str, Decimal]:
    """``step/alias`` -> mean cost of one attempt over all time, from the ``step`` rows."""
    out: dict[str, Decimal] = {}
    for r in table.rows("step", ALL):
        wf, _, path = r.value.partition("/")
        if wf == workflow and r.attempts:
            out[path] = r.cost_usd / r.attempts
    return out
