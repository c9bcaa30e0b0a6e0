"""The worker's per-partition run table, and the garbage-collector settings of a worker process."""

from __future__ import annotations

import subprocess
import sys

from calmrun.streams.runtable import RunTable
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.state import RunState, StepState

CODEC = RecordCodec(wire_models())


def state(run_id: str, status: str, step: str) -> RunState:
    return RunState(
        run_id=run_id,
        workflow="lin",
        version="1",
        status=status,  # type: ignore[arg-type]
        steps={"s1": StepState(status=step, attempt=1, output={"n": 1} if step == "succeeded" else None)},  # type: ignore[arg-type]
        seq=4,
    )


def test_finished_runs_are_kept_as_their_encoded_state_and_read_back_equal() -> None:
    table = RunTable(CODEC)
    live, done = state("a", "running", "scheduled"), state("b", "completed", "succeeded")
    assert table.put("a", live) is None
    encoded = table.put("b", done)
    assert encoded == CODEC.encode(done)
    assert table.get("a") is live and table.get_live("a") is live
    assert table.get("b") == done and table.get("b") is not done  # decoded again
    assert table.get_live("b") is None  # finished: never decoded for timers
    assert [rid for rid, _ in table.live()] == ["a"]
    assert ("a" in table, "b" in table, "c" in table, len(table)) == (True, True, False, 2)
    # the bytes read from the state topic are kept as they are
    table.put("c", state("c", "quarantined", "failed"), b"as-read")
    assert table._done["c"] == b"as-read"
    # a redriven run is live again; a tombstone forgets it
    table.put("b", state("b", "running", "scheduled"))
    assert [rid for rid, _ in table.live()] == ["a", "b"] and len(table) == 3
    table.pop("b")
    assert "b" not in table and table.get("b") is None and len(table) == 2


def test_settle_heap_freezes_the_startup_heap_and_sets_the_young_threshold() -> None:
    code = (
        "import gc; from calmrun.gctune import settle_heap; "
        "before = gc.get_threshold(); assert settle_heap(0) == 0 and gc.get_threshold() == before; "
        "import calmrun.streams.worker; "
        "n = settle_heap(10_000); assert n > 50_000, n; "
        "assert gc.get_threshold() == (10_000, *before[1:]), gc.get_threshold(); print(n)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
