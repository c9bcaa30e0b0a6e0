"""The fault tests' cluster: three KRaft nodes on 127.0.0.1 (``calmrun.devkafka.cluster``), one per session.

Replication factor 3, ``min.insync.replicas`` 2, the transaction and offsets logs replicated the same way.
A test that kills or stops a node restarts it and waits for the cluster to be whole again
(``healed``), so the next test starts on three nodes with full ISRs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from calmrun.devkafka.cluster import DevCluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    data = Path(tempfile.mkdtemp(prefix="calmrun-test-cluster-"))
    c = DevCluster(data, brokers=3)
    c.start()
    try:
        yield c
    finally:
        c.stop()


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
