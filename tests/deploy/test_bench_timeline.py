"""``bench.timeline`` still follows a run through the worker's current classes (its hooks wrap the writer's
methods by name: a refactor that renames them broke it once, unnoticed), one at a time and in flight.

Speed is never asserted; only that every stage the docs quote is timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
@pytest.mark.parametrize("in_flight", [1, 10])
def test_the_timeline_times_each_stage_of_a_run(broker: str, tmp_path: Path, in_flight: int) -> None:
    args = ["--bootstrap", broker, "--runs", "30", "--warmup", "10", "--in-flight", str(in_flight)]
    out = subprocess.run(
        [sys.executable, "-m", "bench.timeline", *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    stages = ("decided RunRequested", "step start s1", "txn1 begin", "txn1 committed", "client read the end")
    for stage in stages:
        assert f"\n{stage} " in table, (stage, table)
    assert "txn1 EndTxn answered" in table, table  # the writer's own requests are seen
    assert "transactions while the runs ran" in table and "begin -> next begin" in table, table
