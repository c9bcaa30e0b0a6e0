"""``bench.pairs`` drives one worker of each of two trees in turn and prints the pairs and their summary.

Two copies of this checkout stand for the trees. Speed is never asserted; only that each pair measured
both trees and that the summary counts every pair."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _copy(dst: Path) -> Path:
    """The checkout's code a bench worker imports (its calmrun, bench and tests packages)."""
    for pkg in ("calmrun", "bench", "tests", "examples"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return dst


@pytest.mark.timeout(300)
def test_pairs_measure_both_trees_in_each_pair(broker: str, tmp_path: Path) -> None:
    a, b = _copy(tmp_path / "a"), _copy(tmp_path / "b")
    args = ["--bootstrap", broker, "--pairs", "2", "--runs", "30", "--warmup", "10", "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "bench.pairs", *args, str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    pairs, summary = lines[:-1], lines[-1]
    assert [p["pair"] for p in pairs] == [0, 1]
    for p in pairs:
        for tree in ("a", "b"):
            assert p[tree]["runs/s"] > 0 and p[tree]["worker us/run"] > 0, p
    assert summary["pairs"] == 2, summary
    assert 0 <= summary["pairs where b was ahead"] <= 2, summary
    assert summary["median ratio of runs/s, b / a"] > 0, summary
