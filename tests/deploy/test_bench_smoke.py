"""Every benchmark workload still runs end to end (tiny sizes) and reports the expected structure.

Speed is never asserted here: the numbers are ``make bench``'s business. confluent-kafka, pyinstrument and
psutil are bench-only extras, so the floor runs with ``--skip-confluent`` and RSS comes from /proc.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import WORKLOADS, main


# every workload at tiny sizes, and a dozen worker processes started one after the other (two at a time for
# `processes` and `triage`): about 3 minutes on 2 busy cores, so more than the default 300 s per test
@pytest.mark.timeout(600)
def test_every_workload_runs(broker: str, tmp_path: Path) -> None:
    report = main(["--quick", "--skip-confluent", "--bootstrap", broker, "--out", str(tmp_path)])

    assert set(report["results"]) == set(WORKLOADS)
    for name, result in report["results"].items():
        assert result["metrics"], f"{name} reported no metric"
        for metric, s in result["metrics"].items():
            assert {"median", "min", "max", "spread_pct", "rounds"} <= set(s), (name, metric)
            assert s["rounds"] >= 1, (name, metric)
    floor = report["results"]["floor"]["metrics"]
    assert "aiokafka records/s" in floor and not any(k.startswith("confluent") for k in floor)
    thru = report["results"]["throughput"]["metrics"]
    assert thru["runs/s"]["median"] > 0 and thru["records moved per run"]["median"] > 0
    assert report["results"]["latency"]["metrics"]["run p50 ms, light (1 in flight)"]["median"] > 0
    assert report["results"]["memory"]["metrics"]["peak RSS MiB"]["median"] > 0
    for name in ("processes", "triage"):  # one, then two worker processes in one group
        m = report["results"][name]["metrics"]
        assert m["runs/s (1 process)"]["median"] > 0 and m["runs/s (2 processes)"]["median"] > 0
        assert m["cores busy: worker 2 (2 processes)"]["median"] > 0, name
        assert f"{name}: runs/s with 2 worker processes / with 1" in report["ratios"]
    triage = report["results"]["triage"]["metrics"]
    assert triage["steps per run (1 process)"]["median"] >= 5  # classify, extract, sentiment, decide, ...
    assert triage["runs quarantined or refused (2 processes)"]["median"] == 0
    assert "workflow step hops/s / aiokafka forwarder records/s" in report["ratios"]
    assert (tmp_path / "results.json").exists()
    table = (tmp_path / "results.md").read_text()
    assert "| throughput | runs/s |" in table
