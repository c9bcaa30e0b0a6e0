"""A full disk under one node's log directory, and poison at 1% of a batch, on the three-node cluster.

Full disk: node 3's log directory is a 1 GiB tmpfs of its own (``tests/faults/conftest.py``); a file fills
it while 2,000 runs are in flight. The node fails its log directory and stops; the other two keep the
writes going (min ISR 2 of 3); space returns, the node starts again and catches up. Nothing acknowledged is
lost: every run completes and the history checker passes.

Poison: every kind of poison record the isolation tests know (``tests/streams/test_isolation_e2e.py``,
those a plain producer can send), about 1% of the batch, each parked in a dead-letter topic while every
valid run completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from calmrun.client import Client
from calmrun.devkafka.cluster import DevCluster
from calmrun.kafka.topics import INVALID, Topics
from calmrun.settings import Settings
from tests.faults.conftest import SMALL_DISK_NODE
from tests.faults.support import RUNS, scenario
from tests.runtime_support import WorkerProcs
from tests.streams.test_isolation_e2e import MB2, poison_records

pytestmark = [pytest.mark.fault, pytest.mark.timeout(900)]


@pytest.fixture
def procs(healed: DevCluster, prefix: str, tmp_path: Path) -> Iterator[WorkerProcs]:
    p = WorkerProcs(healed.bootstrap, prefix, tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


async def fill_disk(
    cluster: DevCluster, settings: Settings, procs: WorkerProcs
) -> tuple[float, set[int], Any]:
    disk = cluster.log_dirs[SMALL_DISK_NODE]
    filler = disk / "filler"
    filled = await asyncio.to_thread(_fill, filler)
    at = time.time()
    # the node fails its only log directory and stops; a node that has not within 30 s is left running
    await asyncio.to_thread(wait_gone_or, cluster, SMALL_DISK_NODE, 30)
    stopped = cluster.pid(SMALL_DISK_NODE) is None
    full_s = round(time.time() - at, 1)
    filler.unlink()
    if stopped:
        await asyncio.to_thread(cluster.restart, SMALL_DISK_NODE)
    return (
        at,
        set(),
        {"node": SMALL_DISK_NODE, "filled_mib": filled >> 20, "node_stopped": stopped, "full_for_s": full_s},
    )


def _fill(filler: Path) -> int:
    """Write ``filler`` until the filesystem is full (tmpfs undoes a failed fallocate, so: writes)."""
    written = 0
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (bytes(4 << 20), bytes(4096)):
            with contextlib.suppress(OSError):  # ENOSPC: on to the smaller chunk, then done
                while True:
                    written += os.write(fd, chunk)
    finally:
        os.close(fd)
    return written


def wait_gone_or(cluster: DevCluster, node: int, wait_s: float) -> None:
    end = time.monotonic() + wait_s
    while cluster.pid(node) is not None and time.monotonic() < end:
        time.sleep(0.5)


async def test_a_full_disk_under_one_node_loses_nothing_acknowledged(
    healed: DevCluster, procs: WorkerProcs, prefix: str
) -> None:
    outcome = await scenario("full-disk", healed, procs, prefix, fill_disk)
    assert outcome.statuses == {"completed": RUNS}


async def test_poison_at_one_percent_is_parked_and_every_valid_run_completes(
    healed: DevCluster, procs: WorkerProcs, prefix: str
) -> None:
    kinds = [p for p in poison_records() if p.header_name is None]
    sent: list[Any] = []

    async def poison(
        cluster: DevCluster, settings: Settings, procs: WorkerProcs
    ) -> tuple[float, set[int], Any]:
        struck = time.time()  # the fault is the poison's arrival: from its first record on
        topics = Topics(settings.kafka.prefix)
        producer = AIOKafkaProducer(
            bootstrap_servers=cluster.bootstrap, acks="all", compression_type="gzip", max_request_size=8 * MB2
        )
        await producer.start()
        try:
            for p in kinds:
                topic = topics.requests if p.topic == "requests" else topics.step("lin", "s1")
                sent.append(await producer.send_and_wait(topic, p.value, key=p.key, headers=list(p.headers)))
        finally:
            await producer.stop()
        return struck, set(), {"poison": len(kinds), "share": round(len(kinds) / RUNS, 4)}

    outcome = await scenario("poison", healed, procs, prefix, poison, among=True)
    assert outcome.statuses == {"completed": RUNS}
    async with Client(outcome_settings := _settings(healed, prefix)) as client:
        parked = [*(await client.read_dlq(INVALID)), *(await client.read_dlq("lin"))]
    sources = {(d.source_topic, d.source_partition, d.source_offset) for d in parked}
    assert {(m.topic, m.partition, m.offset) for m in sent} <= sources, outcome_settings.kafka.prefix


def _settings(cluster: DevCluster, prefix: str) -> Settings:
    from tests.faults.support import settings_on

    return settings_on(cluster, prefix)
