"""The cost table: the aggregator's totals records as rows per dimension and window, and how current they are.

Pure: no Kafka. ``costs.totals`` fills a table from ``<prefix>.costs.totals`` (one record per key and source
partition; ``CostTable.apply`` keeps the latest) and says which events offsets it covers (``Coverage``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from calmrun.costs.fold import ALL, FIELDS, SOURCE, bucket_start

Family = tuple[dict[str, Decimal], dict[str, list[str]]]
"""Run -> its spend, run -> its child runs (``CostTable.family``)."""


@dataclass
class CostRow:
    """One line of the cost table: a dimension value in one window bucket, summed over partitions."""

    dim: str
    value: str
    window: str
    start_ms: int
    attempts: int = 0
    succeeded: int = 0
    failed: int = 0
    escalated: int = 0
    rejected: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0
    api_calls: int = 0
    cost_usd: Decimal = Decimal(0)
    latency_ms: float = 0.0
    queue_wait_ms: float = 0.0
    children_usd: Decimal = Decimal(0)
    """A run's row only: what its child runs (``kind: workflow``, and theirs) spent, not in ``cost_usd``."""

    def add(self, v: dict[str, Any]) -> None:
        for f in FIELDS:
            if f == "cost_usd":
                self.cost_usd += Decimal(v.get(f, "0"))
            else:
                setattr(self, f, getattr(self, f) + v.get(f, 0))

    def as_json(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "value": self.value,
            "window": self.window,
            "start_ms": self.start_ms,
            **{f: (str(self.cost_usd) if f == "cost_usd" else getattr(self, f)) for f in FIELDS},
            **({"children_usd": str(self.children_usd)} if self.dim == "run" else {}),
        }


@dataclass
class CostTable:
    """The latest totals record per key, the rows they add up to, and the source offsets they cover."""

    records: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    covered: dict[int, int] = field(default_factory=dict)
    """Source partition -> offset below which every event is folded into these totals."""
    repairs: dict[int, int] = field(default_factory=dict)

    def apply(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.records.pop(key, None)
            return
        v = json.loads(value)
        if v.get("dim") == SOURCE:
            self.covered[int(v["partition"])] = int(v["next_offset"])
            self.repairs[int(v["partition"])] = int(v["repairs"])
        else:
            self.records[key] = v

    def rows(self, by: str | None = None, window: str = ALL, since_ms: int | None = None) -> list[CostRow]:
        """Rows of dimension ``by`` (all dimensions when None) in ``window``; buckets from ``since_ms`` on."""
        out: dict[tuple[str, str, str, int], CostRow] = {}
        for v in self.records.values():
            if (by is not None and v["dim"] != by) or v["window"] != window:
                continue
            if not (v.get("attempts") or v.get("escalated") or v.get("children")):
                continue  # a run's record of its agents only
            if since_ms is not None and window != ALL and v["start_ms"] < bucket_start(since_ms, window):
                continue
            k = (v["dim"], v["value"], v["window"], v["start_ms"])
            row = out.get(k)
            if row is None:
                row = out[k] = CostRow(v["dim"], v["value"], v["window"], v["start_ms"])
            row.add(v)
        if by in (None, "run") and window == ALL:
            family = self.family()
            for r in out.values():
                if r.dim == "run" and r.value in family[1]:
                    r.children_usd = self.children_usd(r.value, family)
        return sorted(out.values(), key=lambda r: (r.dim, r.start_ms, -r.cost_usd, r.value))

    def children_usd(self, run_id: str, family: Family | None = None) -> Decimal:
        """What the child runs of ``run_id`` spent, their children's included (the run records across
        partitions: a child's ID hashes to its own partition). Each attempt stays counted once in the
        other dimensions (a child's under its own workflow), so this is only ever added to a run's row."""
        spent, children = family if family is not None else self.family()
        total, seen, todo = Decimal(0), {run_id}, list(children.get(run_id, []))
        while todo:
            child = todo.pop()
            if child in seen:
                continue
            seen.add(child)
            total += spent.get(child, Decimal(0))
            todo.extend(children.get(child, []))
        return total

    def family(self) -> Family:
        """Each run's spend and child runs, summed over partitions (one pass over the run records)."""
        spent: dict[str, Decimal] = {}
        children: dict[str, list[str]] = {}
        for v in self.records.values():
            if v["dim"] != "run":
                continue
            spent[v["value"]] = spent.get(v["value"], Decimal(0)) + Decimal(v.get("cost_usd", "0"))
            if v.get("children"):
                children.setdefault(v["value"], []).extend(v["children"])
        return spent, children

    def row(self, dim: str, value: str, window: str = ALL, start_ms: int = 0) -> CostRow:
        """One row (zeros when absent)."""
        for r in self.rows(dim, window):
            if r.value == value and r.start_ms == start_ms:
                return r
        return CostRow(dim, value, window, start_ms)


@dataclass(frozen=True)
class Coverage:
    """How current the totals are: per source partition, the offset covered and the events topic's end."""

    covered: dict[int, int]
    end: dict[int, int]

    @property
    def lag(self) -> int:
        """Events (offsets) on the events topic not yet in the totals."""
        return sum(max(0, e - self.covered.get(p, 0)) for p, e in self.end.items())

    def covers(self, end: dict[int, int]) -> bool:
        return all(self.covered.get(p, 0) >= e for p, e in end.items() if e > 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "lag_events": self.lag,
            "partitions": [
                {"partition": p, "covered": self.covered.get(p, 0), "end": e}
                for p, e in sorted(self.end.items())
            ],
        }
