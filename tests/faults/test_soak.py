"""The soak's CI version: three minutes of steady triage load on the three-node cluster (``bench.soak``;
``make soak`` runs twenty), a few percent failing and slow model calls, approvals answered by a script.

Every run ends, the history checker passes; the samples (RSS, open descriptors, lag) are printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import markdown, soak
from calmrun.devkafka.cluster import DevCluster

pytestmark = [pytest.mark.fault, pytest.mark.timeout(900)]


async def test_three_minutes_of_steady_load_end_with_every_run_done_and_one_history(
    healed: DevCluster, tmp_path: Path
) -> None:
    pids = [pid for i in healed.ids if (pid := healed.pid(i)) is not None]
    fig = await soak(healed.bootstrap, 3, 5, 30, pids, tmp_path)
    print(markdown(fig))
    print(f"SOAK {json.dumps(fig)}")
    assert fig["checker_ok"], fig["checker"]
    assert fig["runs"] > 0 and sum(fig["ends"].values()) == fig["runs"]
    asked = fig["approved_by_script"]
    assert asked > 0 and fig["ends"].get("completed:refunded", 0) >= asked, "approvals were not answered"
