"""The cost fold: run events -> totals per dimension and window, for one source partition. Pure: no Kafka.

Totals per run, workflow, agent, model alias, tenant and step (``workflow/step/alias``), over all time and
in epoch-aligned tumbling windows of the event's time (1m, 1h; tenants also 1d), old buckets deleted after
their retention. Each ``(run_id, seq)`` counts once, the first copy in offset order (a worker crash
re-sends copies, possibly with other tokens): each run keeps the seqs it counted. ``seq <= 0``
(``input.ignored``) and types the fold does not use are skipped.

Events come as the dicts the Avro decoder returns (``data`` a JSON string, ``cost_usd`` a decimal string),
no pydantic on the hot path (``peek.wire_dict`` makes one from a ``RunEvent``). ``next_offset`` is the
source offset up to which the partition is covered; the aggregator writes it with the totals.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from calmrun.costs.costtopics import Key, decode_key, encode_key
from calmrun.costs.peek import (
    CHILD_STARTED,
    COST_EVENTS,
    ESCALATED,
    LOOPED,
    MAPPED,
    SCHEDULED,
    agent_of,
    task_kind,
)

WINDOW_MS: dict[str, int] = {"1m": 60_000, "1h": 3_600_000, "1d": 86_400_000}
ALL = "all"
WINDOWS_OF: dict[str, tuple[str, ...]] = {
    "run": (ALL,),
    "workflow": (ALL, "1m", "1h"),
    "agent": (ALL, "1m", "1h"),
    "model": (ALL, "1m", "1h"),
    "tenant": (ALL, "1m", "1h", "1d"),
    "step": (ALL, "1m", "1h"),
}
DIMENSIONS = tuple(WINDOWS_OF)
NO_MODEL = "-"
SOURCE = "_source"
"""Dimension of the one record per partition that says which source offsets the totals cover."""

FIELDS = (
    "attempts",
    "succeeded",
    "failed",
    "escalated",
    "rejected",
    "tokens_in",
    "tokens_out",
    "requests",
    "api_calls",
    "cost_usd",
    "latency_ms",
    "queue_wait_ms",
)
"""Every total; ``escalated``: escalations away from the alias; ``rejected``: the escalations of a succeeded
attempt (low confidence), so ``succeeded - rejected`` attempts were accepted."""
_ESC, _REJ, _COST = FIELDS.index("escalated"), FIELDS.index("rejected"), FIELDS.index("cost_usd")


def bucket_start(at_ms: int, window: str) -> int:
    """Start of the tumbling ``window`` bucket holding ``at_ms`` (0 for ``all``)."""
    if window == ALL:
        return 0
    return at_ms - at_ms % WINDOW_MS[window]


def step_value(workflow: str, step: str, model: str) -> str:
    """The ``step`` dimension's value: ``workflow/step/alias`` (names never hold a slash)."""
    return f"{workflow}/{step}/{model}"


def _zero() -> list[Any]:
    v: list[Any] = [0] * len(FIELDS)
    v[_COST] = Decimal(0)
    v[-1] = v[-2] = 0.0
    return v


@dataclass
class RunMark:
    """Per run: the seqs counted, the agent of each scheduled step (``kind:step``), its workflow and path,
    its child runs, its loops' iterations and its maps' widths."""

    seqs: set[int] = field(default_factory=set)
    agents: dict[str, str] = field(default_factory=dict)
    workflow: str = ""
    first_ms: int = 0
    paths: dict[str, int] = field(default_factory=dict)
    """``step/alias`` -> attempts of the run on it (what ``calmrun costs forecast`` reads)."""
    children: list[str] = field(default_factory=list)
    """The child runs its ``kind: workflow`` steps started (the table adds their spend: ``children_usd``)."""
    iterations: dict[str, int] = field(default_factory=dict)
    """Each step of a loop's body -> iterations the run made of it (only runs that went back have it)."""
    elements: dict[str, int] = field(default_factory=dict)
    """Map step -> elements the run mapped over (summed over its visits, in a loop)."""


def _mark_fields(mark: RunMark) -> dict[str, Any]:
    return {
        "seqs": sorted(mark.seqs),
        "agents": mark.agents,
        "workflow": mark.workflow,
        "first_ms": mark.first_ms,
        "paths": mark.paths,
        "children": mark.children,
        "iterations": mark.iterations,
        "elements": mark.elements,
    }


class PartitionFold:
    """The totals of one source partition, and what changed since the last ``drain``.

    Args:
        partition: the source partition (every key written carries it; readers add partitions up).
        retention_ms: window -> how long its buckets are kept (event time); missing: kept forever.
    """

    def __init__(self, partition: int, retention_ms: Mapping[str, int]) -> None:
        self.partition = partition
        self.retention_ms = dict(retention_ms)
        self.totals: dict[Key, list[Any]] = {}
        self.runs: dict[str, RunMark] = {}
        self.next_offset = 0
        self.repairs = 0
        self.counted = 0
        self.duplicates = 0
        self._dirty: set[Key] = set()
        self._dirty_runs: set[str] = set()
        self._deleted: set[Key] = set()
        self._swept: dict[str, int] = {}
        self._pending: dict[tuple[str, str, str, str, str | None, int], list[Any]] = {}
        self._tenant_emitted: dict[tuple[str, str], int] = {}

    # -- folding ----------------------------------------------------------------------------------

    def cover(self, offset: int) -> None:
        """Count ``offset`` as folded without an event (a record the fold has no use for)."""
        if offset >= self.next_offset:
            self.next_offset = offset + 1

    def apply(self, ev: Mapping[str, Any], offset: int) -> bool:
        """Fold one event read at ``offset``; True when its cost was counted now.

        ``next_offset`` moves past ``offset``; an event below ``next_offset`` is already covered and ignored.
        """
        if offset < self.next_offset:
            return False
        self.next_offset = offset + 1
        seq = ev["seq"]
        if seq <= 0:
            return False
        kind = ev["type"]
        if kind in COST_EVENTS:
            cost = ev["cost"]
            if cost is None:
                return False
            return self._attempt(ev, cost, seq)
        if kind in SCHEDULED:
            self._remember_agent(ev)
        elif kind == ESCALATED:
            self._escalation(ev, seq)
        elif kind == CHILD_STARTED:
            self._child(ev)
        elif kind in (LOOPED, MAPPED):
            self._shape(ev, seq)
        return False

    def _mark(self, run_id: str) -> RunMark:
        mark = self.runs.get(run_id)
        if mark is None:
            mark = self.runs[run_id] = RunMark()
        return mark

    def _attempt(self, ev: Mapping[str, Any], cost: Mapping[str, Any], seq: int) -> bool:
        run_id = ev["run_id"]
        mark = self._mark(run_id)
        if seq in mark.seqs:
            self.duplicates += 1
            return False
        mark.seqs.add(seq)
        self._dirty_runs.add(run_id)
        ok = ev["type"] == "step.succeeded"
        delta: list[Any] = [
            1,
            int(ok),
            int(not ok),
            0,
            0,
            cost["tokens_in"],
            cost["tokens_out"],
            cost["requests"],
            cost["api_calls"],
            Decimal(cost["cost_usd"]),
            cost["latency_ms"],
            cost["queue_wait_ms"],
        ]
        step = ev["step"] or ""
        kind = task_kind(ev["data"])
        model = cost["model"] or NO_MODEL
        agent = cost.get("agent") or mark.agents.get(f"{kind}:{step}") or f"?{step}"
        at = ev["at_ms"]
        self._add(("run", run_id, ALL, 0), delta)
        if not mark.workflow:
            mark.workflow, mark.first_ms = ev["workflow"], at
        if kind == "run":
            path = f"{step}/{model}"
            mark.paths[path] = mark.paths.get(path, 0) + 1
        # one sum per (workflow, agent, model, tenant, step, minute) until flush() spreads it over the
        # dimensions and windows: 2 additions per attempt here instead of 17
        combo = (
            ev["workflow"],
            agent,
            model,
            ev["tenant"],
            step if kind == "run" else None,
            at - at % 60_000,
        )
        cur = self._pending.get(combo)
        if cur is None:
            self._pending[combo] = delta
        else:
            for i, x in enumerate(delta):
                if x:
                    cur[i] += x
        self.counted += 1
        self._sweep(at)
        return True

    def flush(self) -> None:
        """Spread the pending per-minute sums over every dimension and window (``drain`` does it first)."""
        pending, self._pending = self._pending, {}
        for (workflow, agent, model, tenant, step, minute), delta in pending.items():
            self._add_windows("workflow", workflow, minute, delta)
            self._add_windows("agent", agent, minute, delta)
            self._add_windows("model", model, minute, delta)
            self._add_windows("tenant", tenant, minute, delta)
            if step is not None:
                self._add_windows("step", step_value(workflow, step, model), minute, delta)

    def _escalation(self, ev: Mapping[str, Any], seq: int) -> None:
        mark = self._mark(ev["run_id"])
        if seq in mark.seqs:
            self.duplicates += 1
            return
        mark.seqs.add(seq)
        self._dirty_runs.add(ev["run_id"])
        data = json.loads(ev["data"] or "{}")
        delta = _zero()
        delta[_ESC] = 1
        delta[_REJ] = int(data.get("reason") == "low_confidence")
        model = data.get("from") or NO_MODEL
        self._add_windows(
            "step", step_value(ev["workflow"], ev["step"] or "", str(model)), ev["at_ms"], delta
        )

    def _child(self, ev: Mapping[str, Any]) -> None:
        child = json.loads(ev["data"] or "{}").get("child_run_id")
        mark = self._mark(ev["run_id"])
        if child and child not in mark.children:  # a copy of the event adds nothing
            mark.children.append(str(child))
            self._dirty_runs.add(ev["run_id"])

    def _shape(self, ev: Mapping[str, Any], seq: int) -> None:
        """A loop's iteration (its body's steps visited once more) or a map's width, once per seq."""
        mark = self._mark(ev["run_id"])
        if seq in mark.seqs:
            self.duplicates += 1
            return
        mark.seqs.add(seq)
        self._dirty_runs.add(ev["run_id"])
        data = json.loads(ev["data"] or "{}")
        step = ev["step"] or ""
        if ev["type"] == MAPPED:
            mark.elements[step] = mark.elements.get(step, 0) + int(data.get("size", 0))
            return
        done = int(data.get("iteration", 0)) + 1  # iteration i starts: i + 1 iterations in all
        for s in data.get("body") or []:
            mark.iterations[s] = max(mark.iterations.get(s, 1), done)

    def _add_windows(self, dim: str, value: str, at_ms: int, delta: list[Any]) -> None:
        for window in WINDOWS_OF[dim]:
            self._add((dim, value, window, bucket_start(at_ms, window)), delta)

    def _add(self, key: Key, delta: list[Any]) -> None:
        cur = self.totals.get(key)
        if cur is None:
            self.totals[key] = list(delta)
        else:
            for i, x in enumerate(delta):
                if x:
                    cur[i] += x
        self._dirty.add(key)

    def _remember_agent(self, ev: Mapping[str, Any]) -> None:
        step = ev["step"]
        if step is None:
            return
        agent = agent_of(ev["data"])
        if agent is None:
            return
        kind = "run" if ev["type"] == "step.scheduled" else "compensate"
        mark = self._mark(ev["run_id"])
        if mark.agents.get(f"{kind}:{step}") != agent:
            mark.agents[f"{kind}:{step}"] = agent
            self._dirty_runs.add(ev["run_id"])

    def _sweep(self, at_ms: int) -> None:
        """Delete buckets older than their retention (once per new bucket of each window)."""
        due: dict[str, int] = {}
        for window, size in WINDOW_MS.items():
            start = at_ms - at_ms % size
            if self._swept.get(window, -1) < start:
                self._swept[window] = start
                if window in self.retention_ms:
                    due[window] = start - self.retention_ms[window]
        if not due:
            return
        self.flush()
        for key in [k for k in self.totals if k[2] in due and k[3] < due[k[2]]]:
            del self.totals[key]
            self._dirty.discard(key)
            self._deleted.add(key)

    # -- the changelog ----------------------------------------------------------------------------

    def value(self, key: Key) -> dict[str, Any]:
        """The JSON value of one total (``cost_usd`` as a decimal string)."""
        v = self.totals[key]
        dim, value, window, start = key
        out: dict[str, Any] = {
            "dim": dim,
            "value": value,
            "window": window,
            "start_ms": start,
            "partition": self.partition,
        }
        for name, x in zip(FIELDS, v, strict=True):
            out[name] = str(x) if name == "cost_usd" else x
        if dim == "run":
            mark = self.runs.get(value)
            if mark is not None:
                out.update(_mark_fields(mark))
        return out

    def source_value(self) -> dict[str, Any]:
        """The partition's coverage record: offsets below ``next_offset`` are folded."""
        return {
            "dim": SOURCE,
            "partition": self.partition,
            "next_offset": self.next_offset,
            "counted": self.counted,
            "duplicates": self.duplicates,
            "repairs": self.repairs,
        }

    def drain(self) -> tuple[list[tuple[bytes, bytes | None]], list[tuple[bytes, bytes]]]:
        """Take what changed: (totals records, tenants records) as ``(key, value or None)`` bytes.

        The totals records end with the partition's coverage record; a run touched without a cost change
        (a scheduled step's agent) is written too, so a restore knows its agents and highest seq.
        """
        self.flush()
        p = self.partition
        totals: list[tuple[bytes, bytes | None]] = []
        latest: dict[tuple[str, str], int] = {}
        for run_id in self._dirty_runs:
            key = ("run", run_id, ALL, 0)
            if key not in self._dirty:
                mark = self.runs[run_id]
                body = (
                    self.value(key)
                    if key in self.totals
                    else {"dim": "run", "value": run_id, "window": ALL, "start_ms": 0, "partition": p}
                    | _mark_fields(mark)
                )
                totals.append((encode_key(key, p), json.dumps(body).encode()))
        for key in self._dirty:
            totals.append((encode_key(key, p), json.dumps(self.value(key)).encode()))
            dim, value, window, start = key
            if dim == "tenant" and window != ALL and latest.get((value, window), -1) < start:
                latest[(value, window)] = start
        for key in self._deleted:
            totals.append((encode_key(key, p), None))
        totals.append((encode_key((SOURCE, "events", ALL, 0), p), json.dumps(self.source_value()).encode()))
        tenants: list[tuple[bytes, bytes]] = []
        for (tenant, window), start in latest.items():
            if self._tenant_emitted.get((tenant, window), -1) > start:
                continue  # a late event for an older bucket: the current one stands
            self._tenant_emitted[(tenant, window)] = start
            spent = self.totals[("tenant", tenant, window, start)][_COST]
            tkey = json.dumps([tenant, window, p], separators=(",", ":")).encode()
            body = {
                "tenant": tenant,
                "window": window,
                "start_ms": start,
                "partition": p,
                "spent_usd": str(spent),
            }
            tenants.append((tkey, json.dumps(body).encode()))
        self._dirty, self._dirty_runs, self._deleted = set(), set(), set()
        return totals, tenants

    def restore(self, key: bytes, value: bytes | None) -> None:
        """Apply one record of this partition's changelog (``<prefix>.costs.totals``), in offset order."""
        k, _ = decode_key(key)
        if value is None:
            self.totals.pop(k, None)
            return
        v = json.loads(value)
        if k[0] == SOURCE:
            self.next_offset = int(v["next_offset"])
            self.counted, self.duplicates = int(v["counted"]), int(v["duplicates"])
            self.repairs = int(v["repairs"])
            return
        if k[0] == "run" and "seqs" in v:
            self.runs[k[1]] = RunMark(
                set(v["seqs"]),
                dict(v.get("agents") or {}),
                str(v.get("workflow") or ""),
                int(v.get("first_ms") or 0),
                dict(v.get("paths") or {}),
                list(v.get("children") or []),
                dict(v.get("iterations") or {}),
                dict(v.get("elements") or {}),
            )
        if v.get("attempts", 0) or v.get("escalated", 0):
            row = _zero()
            for i, name in enumerate(FIELDS):
                if name == "cost_usd":
                    row[i] = Decimal(v[name])
                elif name in v:
                    row[i] = v[name]
            self.totals[k] = row
        if k[0] == "tenant" and k[2] != ALL:
            tk = (k[1], k[2])
            self._tenant_emitted[tk] = max(self._tenant_emitted.get(tk, -1), k[3])
