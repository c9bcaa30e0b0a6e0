"""A local KRaft cluster of several nodes on 127.0.0.1, replicated as production should be.

Each node is a combined broker+controller (:class:`~calmrun.devkafka.DevKafka`); the controllers form one
quorum, so a majority must run for the cluster to answer. With three nodes: replication factor 3 and
``min.insync.replicas`` 2 by default, and the transaction and offsets logs replicated the same way, so a
node can be lost (kill -9, SIGTERM, a full disk) without losing an acknowledged write or stopping writes.

The fault tests (``tests/faults``) drive it from Python: :meth:`DevCluster.kill9`,
:meth:`DevCluster.terminate`, :meth:`DevCluster.restart` of one node, and :meth:`DevCluster.leaders`,
:meth:`DevCluster.txn_coordinator`, :meth:`DevCluster.group_coordinator` to pick the node whose loss hurts
most.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calmrun.devkafka import DevKafka, answers_metadata, new_cluster_id
from calmrun.errors import DevKafkaError
from calmrun.localproc import free_port, wait_gone


def cluster_properties(brokers: int) -> dict[str, str]:
    """Replication settings of a cluster of ``brokers`` nodes: three copies and two in sync where there are
    three nodes (one copy on one node), for the run topics and Kafka's own logs alike."""
    rf = min(brokers, 3)
    isr = 2 if rf >= 3 else 1
    return {
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(isr),
        "offsets.topic.replication.factor": str(rf),
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(isr),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(isr),
        "unclean.leader.election.enable": "false",
    }


@dataclass
class DevCluster:
    """``brokers`` KRaft nodes on 127.0.0.1 under ``data_dir/node-<id>``; node IDs start at 1.

    Attributes:
        data_dir: one directory per node and ``cluster.json`` (ports and cluster ID, for ``stop``/``status``).
        extra: broker properties for every node (override the replication defaults, shorten timeouts).
        log_dirs: node ID -> a log directory of its own (a small filesystem for the full-disk scenario).
    """

    data_dir: Path
    brokers: int = 3
    heap: str = "384m"
    extra: dict[str, str] = field(default_factory=dict)
    log_dirs: dict[int, Path] = field(default_factory=dict)
    base_port: int = 0
    """Client ports ``base_port``, ``base_port + 1``...; free ports when 0."""
    nodes: dict[int, DevKafka] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.brokers < 1:
            raise DevKafkaError("a cluster needs at least one node")
        saved = self._load()
        ports = saved.get("ports") or {
            str(i): [self.base_port + i - 1 if self.base_port else free_port(), free_port()] for i in self.ids
        }
        cluster_id = saved.get("cluster_id") or new_cluster_id().lstrip("-") or new_cluster_id()
        voters = ",".join(f"{i}@127.0.0.1:{ports[str(i)][1]}" for i in self.ids)
        for i in self.ids:
            port, controller = ports[str(i)]
            extra = {
                **cluster_properties(self.brokers),
                "node.id": str(i),
                "controller.quorum.voters": voters,
                "num.partitions": "4",
                **self.extra,
            }
            if i in self.log_dirs:
                extra["log.dirs"] = str(self.log_dirs[i])
            self.nodes[i] = DevKafka(
                data_dir=self.data_dir / f"node-{i}",
                port=port,
                controller_port=controller,
                heap=self.heap,
                extra=extra,
                cluster_id=cluster_id,
            )
        self._state = {"cluster_id": cluster_id, "ports": ports}

    @property
    def ids(self) -> list[int]:
        return list(range(1, self.brokers + 1))

    @property
    def bootstrap(self) -> str:
        """Every node's client address, comma-separated (what ``-b`` and ``kafka.bootstrap`` take)."""
        return ",".join(n.bootstrap for n in self.nodes.values())

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.data_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            return {}
        if len(data.get("ports", {})) != self.brokers:
            return {}
        return data

    def start(self, *, timeout: float = 120.0, fresh: bool = False) -> None:
        """Start every node that is not running and wait until each answers.

        Raises:
            DevKafkaError: a node exited or did not answer within ``timeout``.
        """
        if fresh and self.data_dir.exists():
            import shutil

            self.stop()
            shutil.rmtree(self.data_dir)
            self.__post_init__()  # new ports and cluster ID
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "cluster.json").write_text(json.dumps(self._state))
        procs = {i: n.launch() for i, n in self.nodes.items() if n.running_pid() is None}
        try:
            for i, proc in procs.items():
                self.nodes[i].wait_ready(proc, timeout=timeout)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, *, timeout: float = 30.0) -> bool:
        """Stop every node (SIGTERM to all at once, then -9 after ``timeout``). True when one was running.

        All at once: stopped one by one, the last nodes wait for a quorum that has already gone.
        """
        pids = {i: pid for i, n in self.nodes.items() if (pid := n.running_pid()) is not None}
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for i, pid in pids.items():
            if not wait_gone(pid, max(0.1, deadline - time.monotonic())):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 10)
            self.nodes[i].pid_file.unlink(missing_ok=True)
        return bool(pids)

    def pid(self, node: int) -> int | None:
        return self.nodes[node].running_pid()

    def kill9(self, node: int) -> None:
        """Kill one node with SIGKILL, as a crash or an OOM kill would, and wait until it is gone."""
        pid = self.pid(node)
        if pid is None:
            raise DevKafkaError(f"node {node} is not running")
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 30)

    def terminate(self, node: int, *, timeout: float = 60.0) -> None:
        """Stop one node with SIGTERM (a controlled shutdown: it hands its leaderships over first)."""
        if not self.nodes[node].stop(timeout=timeout):
            raise DevKafkaError(f"node {node} is not running")

    def restart(self, node: int, *, timeout: float = 120.0) -> None:
        """Start one stopped node again and wait until it answers."""
        n = self.nodes[node]
        n.wait_ready(n.launch(), timeout=timeout)

    def wait_healthy(self, timeout: float = 120.0, topics: Sequence[str] = ()) -> None:
        """Wait until every node answers and every partition (of ``topics``, or of all) has its full ISR.

        Raises:
            DevKafkaError: not healthy within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(answers_metadata(n.bootstrap) for n in self.nodes.values()):
                short = asyncio.run(self._under_replicated(list(topics)))
                if not short:
                    return
            time.sleep(0.5)
        raise DevKafkaError(f"cluster not healthy within {timeout:.0f}s")

    async def _under_replicated(self, topics: list[str]) -> list[str]:
        async with self._admin() as admin:
            found = await admin.describe_topics(topics or None)
        return [
            f"{t['topic']}[{p['partition']}]"
            for t in found
            for p in t["partitions"]
            if len(p["isr"]) < len(p["replicas"]) or p["leader"] < 0
        ]

    def _admin(self) -> Any:
        import contextlib

        from aiokafka.admin import AIOKafkaAdminClient

        @contextlib.asynccontextmanager
        async def opened() -> Any:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.live_bootstrap(), request_timeout_ms=10_000)
            await admin.start()
            try:
                yield admin
            finally:
                await admin.close()

        return opened()

    def live_bootstrap(self) -> str:
        """The client addresses of the nodes running now."""
        live = [n.bootstrap for n in self.nodes.values() if n.running_pid() is not None]
        return ",".join(live) or self.bootstrap

    async def leaders(self, topics: Sequence[str]) -> dict[int, list[tuple[str, int]]]:
        """Node ID -> the (topic, partition) pairs it leads, of ``topics``."""
        async with self._admin() as admin:
            found = await admin.describe_topics(list(topics))
        out: dict[int, list[tuple[str, int]]] = {}
        for t in found:
            for p in t["partitions"]:
                out.setdefault(p["leader"], []).append((t["topic"], p["partition"]))
        return out

    async def busiest_leader(self, topics: Sequence[str]) -> int:
        """The node leading most partitions of ``topics``."""
        led = await self.leaders(topics)
        counts = Counter({node: len(parts) for node, parts in led.items() if node >= 0})
        return counts.most_common(1)[0][0]

    async def txn_coordinator(self, transactional_id: str) -> int:
        """The node coordinating the transactions of ``transactional_id`` (the leader of its partition of
        ``__transaction_state``)."""
        return await self._coordinator(transactional_id, 1)

    async def writers(self, group: str) -> dict[int, str]:
        """Partition -> the transactional id of the writer that committed group ``group``'s offsets there
        last (their metadata: ``streams.partitions``); partitions whose offsets name none are left out."""
        async with self._admin() as admin:
            found = await admin.list_consumer_group_offsets(group)
        return {tp.partition: om.metadata for tp, om in found.items() if om.metadata}

    async def group_coordinator(self, group: str) -> int:
        """The node coordinating consumer group ``group`` (the leader of its ``__consumer_offsets``
        partition)."""
        return await self._coordinator(group, 0)

    async def _coordinator(self, key: str, kind: int) -> int:
        async with self._admin() as admin:
            return int(await admin.find_coordinator(key, kind))
