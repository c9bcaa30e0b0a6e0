"""The in-process benches (no broker) still run against the worker's current classes and report their keys.

They are the yardsticks performance.md quotes; a refactor of the worker's rooms must not leave them broken.
Speed is never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
