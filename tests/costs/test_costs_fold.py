"""The pure cost fold: each (run_id, seq) once whatever the order, and a restore from its own changelog
records continues exactly where the fold left off."""

from __future__ import annotations

from decimal import Decimal

from calmrun.costs.fold import ALL, PartitionFold
from calmrun.costs.peek import wire_dict
from calmrun.costs.table import CostTable
from calmrun.workflow.events import RunEvent, StepCost


def attempt(seq: int, usd: str, run: str = "r1", step: str = "s") -> RunEvent:
    return RunEvent(
        run_id=run,
        seq=seq,
        type="step.succeeded",
        at_ms=1_000_000 + seq,
        workflow="wf",
        step=step,
        attempt=1,
        data={"kind": "run"},
        cost=StepCost(model="m", tokens_in=10, cost_usd=Decimal(usd)),
    )


def cost_of(fold: PartitionFold, run: str = "r1") -> tuple[int, Decimal]:
    fold.flush()
    v = fold.totals[("run", run, ALL, 0)]
    return v[0], v[9]


def test_each_seq_counts_once_in_any_order() -> None:
    fold = PartitionFold(0, {})
    events = [attempt(8, "0.5"), attempt(7, "0.25"), attempt(7, "9"), attempt(8, "9")]
    counted = [fold.apply(wire_dict(e), off) for off, e in enumerate(events)]
    assert counted == [True, True, False, False]
    assert cost_of(fold) == (2, Decimal("0.75"))
    assert (fold.counted, fold.duplicates) == (2, 2)


def test_restore_from_drained_records_continues_exactly() -> None:
    events = [attempt(s, f"0.0{s}", run=f"r{s % 3}", step=f"s{s % 2}") for s in range(1, 30)]
    events += [attempt(4, "7", run="r1", step="s0")]  # a copy after the restore point
    one = PartitionFold(2, {})
    for off, e in enumerate(events):
        one.apply(wire_dict(e), off)
    one.drain()

    first = PartitionFold(2, {})
    changelog: list[tuple[bytes, bytes | None]] = []
    for off, e in enumerate(events[:17]):
        first.apply(wire_dict(e), off)
    changelog += first.drain()[0]
    restored = PartitionFold(2, {})
    for key, value in changelog:
        restored.restore(key, value)
    assert restored.next_offset == 17
    for off, e in enumerate(events):
        restored.apply(wire_dict(e), off)  # offsets below the coverage are ignored
    restored.drain()
    assert restored.totals == one.totals
    assert (restored.counted, restored.duplicates) == (one.counted, one.duplicates)


def started(seq: int, run: str, child: str) -> RunEvent:
    return RunEvent(
        run_id=run,
        seq=seq,
        type="step.child_started",
        at_ms=1_000_000 + seq,
        workflow="wf",
        step="fraud",
        attempt=1,
        data={"child_run_id": child, "workflow": "wf"},
    )


def test_a_parents_run_row_adds_its_childrens_spend_once() -> None:
    """Parent, child and grandchild fold in different partitions; the table adds the children's spend to
    the parent's run row (``children_usd``) and nowhere else: the workflow total counts each attempt once."""
    p0, p1 = PartitionFold(0, {}), PartitionFold(1, {})
    parent = [attempt(1, "0.5", run="p"), started(2, "p", "p.fraud"), started(2, "p", "p.fraud")]
    child = [attempt(1, "0.25", run="p.fraud"), started(2, "p.fraud", "p.fraud.deep")]
    child += [attempt(1, "0.125", run="p.fraud.deep")]
    for off, e in enumerate(parent):
        p0.apply(wire_dict(e), off)
    for off, e in enumerate(child):
        p1.apply(wire_dict(e), off)
    log0 = p0.drain()[0]
    table = CostTable()
    for key, value in [*log0, *p1.drain()[0]]:
        table.apply(key, value)
    runs = {r.value: r for r in table.rows("run")}
    assert {k: (r.cost_usd, r.children_usd) for k, r in runs.items()} == {
        "p": (Decimal("0.5"), Decimal("0.375")),
        "p.fraud": (Decimal("0.25"), Decimal("0.125")),
        "p.fraud.deep": (Decimal("0.125"), Decimal(0)),
    }
    assert runs["p"].as_json()["children_usd"] == "0.375"
    assert table.row("workflow", "wf").cost_usd == Decimal("0.875")  # not 0.875 + 0.5 of children
    restored = PartitionFold(0, {})
    for key, value in log0:
        restored.restore(key, value)
    assert restored.runs["p"].children == ["p.fraud"]
