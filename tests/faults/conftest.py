"""The fault tests' cluster: three KRaft nodes on 127.0.0.1 (``calmrun.devkafka.cluster``), one per session.

Replication factor 3, ``min.insync.replicas`` 2, the transaction and offsets logs replicated the same way.
A test that kills or stops a node restarts it and waits for the cluster to be whole again
(``healed``), so the next test starts on three nodes with full ISRs.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from calmrun.devkafka.cluster import DevCluster

SMALL_DISK_NODE = 3
"""The node whose log directory is a filesystem of its own (tmpfs), for the full-disk scenario."""


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    data = Path(tempfile.mkdtemp(prefix="calmrun-test-cluster-"))
    disk = data / f"node-{SMALL_DISK_NODE}-logs"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(disk)], check=True)
    c = DevCluster(data, brokers=3, log_dirs={SMALL_DISK_NODE: disk})
    try:
        c.start()
        yield c
    finally:
        c.stop()
        subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture
def healed(cluster: DevCluster) -> Iterator[DevCluster]:
    """The cluster, with every node running and every partition fully in sync again after the test."""
    try:
        yield cluster
    finally:
        for node in cluster.ids:
            if cluster.pid(node) is None:
                cluster.restart(node)
        cluster.wait_healthy(180)
