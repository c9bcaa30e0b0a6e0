"""kill -9 of a node of the three-node cluster under load, restarted 10 s later: of the node leading most run
partitions, of the transaction coordinator of the writers of most partitions, of the group coordinator; and a
rolling restart of all three (SIGTERM, one at a time).

2,000 runs in flight on two worker processes; each test ends with every run completed, both workers still
running with their PIDs, the history checker passing, and the workers' one stall line and one resume line
(``calmrun.brokers``) for the lost node. Recovery times are printed (``FAULT ...``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calmrun.devkafka.cluster import DevCluster
from calmrun.kafka.topics import Topics
from calmrun.settings import Settings
from tests.faults.support import PARTITIONS, kill_and_restart, led_by, scenario
from tests.runtime_support import WorkerProcs

pytestmark = [pytest.mark.fault, pytest.mark.timeout(900)]


@pytest.fixture
def procs(healed: DevCluster, prefix: str, tmp_path: Path) -> Iterator[WorkerProcs]:
    p = WorkerProcs(healed.bootstrap, prefix, tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def run_topics(settings: Settings) -> list[str]:
    t = Topics(settings.kafka.prefix)
    return [t.requests, t.events, t.state]


async def leader(cluster: DevCluster, settings: Settings, procs: WorkerProcs) -> tuple[float, set[int], Any]:
    node = await cluster.busiest_leader(run_topics(settings))
    affected = await led_by(cluster, run_topics(settings), node)
    return await kill_and_restart(cluster, node), affected, {"node": node}


async def txn_coordinator(
    cluster: DevCluster, settings: Settings, procs: WorkerProcs
) -> tuple[float, set[int], Any]:
    writers = await cluster.writers(settings.group_id)  # each worker's writer writes all its partitions
    by_node = {p: await cluster.txn_coordinator(tid) for p, tid in writers.items()}
    node = Counter(by_node.values()).most_common(1)[0][0]
    affected = {p for p, n in by_node.items() if n == node}
    return await kill_and_restart(cluster, node), affected, {"node": node, "coordinates": sorted(affected)}


async def group_coordinator(
    cluster: DevCluster, settings: Settings, procs: WorkerProcs
) -> tuple[float, set[int], Any]:
    node = await cluster.group_coordinator(settings.group_id)
    return await kill_and_restart(cluster, node), set(range(PARTITIONS)), {"node": node}


@pytest.mark.parametrize("target", [leader, txn_coordinator, group_coordinator], ids=lambda f: f.__name__)
async def test_kill_9_of_a_node_loses_no_run(
    healed: DevCluster, procs: WorkerProcs, prefix: str, target: Any
) -> None:
    outcome = await scenario(f"kill9-{target.__name__}", healed, procs, prefix, target)
    stalls = [line for line in outcome.stall_lines if "wait on it" in line]
    resumes = [line for line in outcome.stall_lines if "resumed after" in line]
    assert stalls and resumes, f"no stall/resume line in the workers' logs: {outcome.stall_lines}"


async def rolling_restart(
    cluster: DevCluster, settings: Settings, procs: WorkerProcs
) -> tuple[float, set[int], Any]:
    """SIGTERM one node at a time, start it again, wait for full ISRs before the next (as an upgrade)."""
    at = time.time()
    took = {}
    for node in cluster.ids:
        began = time.monotonic()
        await asyncio.to_thread(cluster.terminate, node)
        await asyncio.to_thread(cluster.restart, node)
        await asyncio.to_thread(cluster.wait_healthy, 180, run_topics(settings))
        took[node] = round(time.monotonic() - began, 1)
    return at, set(range(PARTITIONS)), {"seconds_per_node": took}


async def test_a_rolling_restart_of_all_three_nodes_loses_no_run(
    healed: DevCluster, procs: WorkerProcs, prefix: str
) -> None:
    await scenario("rolling-restart", healed, procs, prefix, rolling_restart)
