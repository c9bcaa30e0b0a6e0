"""The in-process benches (no broker) still run against the worker's current classes and report their keys.

They are the yardsticks performance.md quotes; a refactor of the worker's rooms must not leave them broken.
Speed is never asserted here; ``bench.speed``, the machine's own, is checked for what it records.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.speed import during, medians


def _bench(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=240, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(300)
def test_worker_cpu_pushes_runs_through_the_workers_classes() -> None:
    r = _bench("bench.worker_cpu", "--runs", "20", "--repeat", "1")
    assert r["completed per run"] == 1.0 and r["decisions per run"] == 4.0
    for stage in ("request", "decide", "commit", "attempt", "total"):
        low, median = r[f"{stage} us/run (min, median)"]  # type: ignore[misc]
        assert 0 < low <= median


@pytest.mark.timeout(300)
def test_avro_encode_compares_the_compiled_writers_with_fastavro() -> None:
    r = _bench("bench.avro_encode", "--runs", "5", "--best-of", "1")
    assert r["bytes per run"] and r["compiled us/run"] and r["fastavro us/run"]  # type: ignore[truthy-bool]


def test_speed_samples_the_machine_and_takes_the_median_of_a_window(tmp_path: Path) -> None:
    out = tmp_path / "speed.txt"
    done = subprocess.run(
        [sys.executable, "-m", "bench.speed", "--out", str(out), "--every", "0.05", "--seconds", "1"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    samples = [tuple(map(float, ln.split())) for ln in out.read_text().splitlines()]
    assert len(samples) >= 2 and all(us > 0 for _, us in samples)
    first, last = samples[0][0], samples[-1][0]
    assert during(out, first, last) == statistics.median(us for _, us in samples)
    assert during(out, last + 1, last + 2) is None  # no sample in the window: no figure
    assert during(tmp_path / "absent.txt", first, last) is None
    assert medians(out, [(first, last), (last + 1, last + 2)]) == [during(out, first, last)]
    assert medians(None, [(first, last)]) == []  # the machine was not sampled
