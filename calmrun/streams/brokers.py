"""Broker loss you can see: which broker is missing, which of this worker's partitions wait on it, until when.

When a broker dies, its partitions keep it as leader until the controller fences it (the broker session
timeout, 9 s by default), and a coordinator on it (the group's, a partition writer's transactions) answers
nobody. aiokafka retries all of that on its own and logs a connection error per attempt (thousands per
outage) while calmrun's own loggers are silent: a waiting worker looks like a broken one.

:class:`BrokerWatch` polls once a second: the cluster's metadata (brokers, the leaders of this worker's
topics) through its own admin client, one TCP connect per broker, and the group and transaction
coordinators. It logs one line when owned partitions stall on a missing broker (which node, which
partitions and why, since when) and one when they resume, and exports ``calmrun_stalled_partitions``.
:class:`RateLimit` lets one of aiokafka's repeated warnings and errors through per message per window and
counts the rest (the resume line says how many).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from calmrun.kafka.connect import client_kwargs
from calmrun.settings import Settings
from calmrun.streams.txn import transactional_id

if TYPE_CHECKING:
    from calmrun.streams.worker import Worker

log = logging.getLogger("calmrun.brokers")

EVERY = -2
"""The outage of every broker at once (this worker cut off from the cluster), as a node ID."""

PROBE_S = 2.0
"""How long one TCP connect to a broker may take before the broker counts as unreachable."""


class RateLimit(logging.Filter):
    """Lets the first record of each (logger, message, level) through per ``window_s``; counts the rest.

    The next record let through says how many were held back (``(and N more like this in Ns)``).
    """

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = window_s, clock
        self._last: dict[tuple[str, str, int], tuple[float, int]] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg), record.levelno)
        now = self.clock()
        since, held = self._last.get(key, (float("-inf"), 0))
        if now - since < self.window_s:
            self._last[key] = (since, held + 1)
            self.suppressed += 1
            return False
        self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like this in {now - since:.0f}s)"
        return True


_FILTER = RateLimit()


def limit_client_logs(names: Iterable[str] | None = None) -> RateLimit:
    """Attach the one :class:`RateLimit` to aiokafka's loggers (idempotent); returns it."""
    found = names or [n for n in logging.Logger.manager.loggerDict if n.startswith("aiokafka")]
    for name in found:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER


@dataclass
class Outage:
    """One broker seen unreachable: since when, and what of this worker waited on it."""

    node: int
    address: str
    since_wall: float
    since: float
    partitions: set[int] = field(default_factory=set)
    roles: set[str] = field(default_factory=set)
    resumed: bool = False

    @property
    def who(self) -> str:
        return "every broker" if self.node == EVERY else f"broker {self.node} ({self.address})"


class BrokerWatch:
    """Watches the brokers this worker's partitions depend on (see the module docstring).

    Args:
        settings: how to reach the cluster.
        topics: the topics whose partition leaders matter (inputs, events, state).
        owned: the partitions this worker owns now.
        group: the consumer group (its coordinator) and the prefix of the writers' transactional IDs.
        interval_s: how often to look.
    """

    def __init__(
        self,
        settings: Settings,
        topics: list[str],
        owned: Callable[[], set[int]],
        group: str,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.topics, self.owned, self.group = settings, topics, owned, group
        self.interval_s, self.clock = interval_s, clock
        self.outages: dict[int, Outage] = {}
        self.stalled: set[int] = set()
        self._coordinators: dict[str, int] = {}
        self._looked_up = float("-inf")
        self._timeouts: dict[int, int] = {}  # node -> connect timeouts in a row
        self._brokers: dict[int, tuple[str, int]] = {}  # as the last metadata named them
        self._tls = settings.kafka.security.protocol in ("SSL", "SASL_SSL")
        self._failed_since: tuple[float, float] | None = None  # (wall, clock) the first failed poll began

    @classmethod
    def of(cls, worker: Worker) -> BrokerWatch:
        """The watch of ``worker``: its inputs, events and state; its group; its metrics (if any)."""
        t = worker.topics
        watch = cls(
            worker.settings,
            list(dict.fromkeys([*worker.input_topics, t.events, t.state])),
            lambda: set(worker.owned),
            worker.settings.group_id,
        )
        if worker.metrics is not None:
            with contextlib.suppress(ValueError):  # registered already (a restarted worker object)
                worker.metrics.registry.register(_Stalled(watch))
        return watch

    async def run(self) -> None:
        """Poll until cancelled; a poll that fails (the cluster is away) is tried again next time."""
        limit_client_logs()
        k = self.settings.kafka
        admin = AIOKafkaAdminClient(
            bootstrap_servers=k.bootstrap,
            client_id=f"{k.client_id}-watch",
            request_timeout_ms=5_000,
            **client_kwargs(k),
        )
        try:
            started = False
            while True:
                began = (time.time(), self.clock())  # a failed poll dates a cut-off from here, not its end
                try:
                    if not started:
                        await asyncio.wait_for(admin.start(), 10)
                        started = True
                    await asyncio.wait_for(self.poll(admin), 10)
                    self._failed_since = None
                except (TimeoutError, KafkaError, OSError):  # a request failed: cut off, or one node gone
                    # a request sent to a node just lost fails too: cut off only when no broker answers
                    self._failed_since = self._failed_since or began
                    probes = await asyncio.gather(
                        *(_probe(h, p, self._tls) for h, p in self._brokers.values())
                    )
                    if not any(r == "ok" for r in probes):
                        self._cut_off()
                await asyncio.sleep(self.interval_s)
        finally:
            await admin.close()

    def _cut_off(self) -> None:
        """No broker answered this poll: the owned partitions wait on every broker (outages already
        reported stay as they are)."""
        owned = self.owned()
        waits = {n: (o.partitions, o.roles) for n, o in self.outages.items() if not o.resumed}
        if owned:
            waits[EVERY] = (owned, {"no broker answers"})
        self._report({EVERY, *self.outages}, {}, waits)
        self.stalled = set(owned)

    async def poll(self, admin: Any) -> None:
        """One look: brokers, reachability, leaders, coordinators; logs what changed."""
        meta = await admin.describe_cluster()
        brokers = self._brokers = {b["node_id"]: (b["host"], b["port"]) for b in meta["brokers"]}
        probes = await asyncio.gather(*(_probe(h, p, self._tls) for h, p in brokers.values()))
        down = self._judge_probes(dict(zip(brokers, probes, strict=True)))
        owned = self.owned()
        leaders: dict[int, dict[str, int]] = {}
        for t in await admin.describe_topics(self.topics):
            for part in t.get("partitions", ()):
                if part["partition"] in owned:
                    leaders.setdefault(part["partition"], {})[t["topic"]] = part["leader"]
        if down or self.clock() - self._looked_up > 10:
            await self._lookup_coordinators(admin, owned)
        waits: dict[int, tuple[set[int], set[str]]] = {}  # node -> (partitions, roles)
        for p, by_topic in leaders.items():
            for topic, node in by_topic.items():
                if node in down or node < 0:
                    waits.setdefault(node, (set(), set()))[0].add(p)
                    waits[node][1].add(f"leader of {topic.rsplit('.', 1)[-1]}")
        for what, node in self._coordinators.items():
            if node in down:
                entry = waits.setdefault(node, (set(), set()))
                if what == "group":
                    entry[0].update(owned)
                    entry[1].add("group coordinator")
                else:
                    p = int(what.rsplit(".", 1)[-1])
                    entry[0].add(p)
                    entry[1].add(f"transaction coordinator of partition {p}")
        self._report(down, brokers, waits)
        self.stalled = {p for parts, _ in waits.values() for p in parts} & owned

    def _judge_probes(self, probes: dict[int, str]) -> set[int]:
        """The nodes to count as down: a refused connection at once (nothing listens: the process is gone);
        a connect that timed out twice in a row (a partition, or this process too busy to tell). When every
        probe timed out, this process was stalled (the metadata it just read came from a broker): no
        verdict."""
        if probes and all(r == "timeout" for r in probes.values()):
            return {n for n in self.outages if n in probes}
        for node, result in probes.items():
            self._timeouts[node] = self._timeouts.get(node, 0) + 1 if result in ("timeout", "closed") else 0
        return {n for n, r in probes.items() if r == "refused" or self._timeouts[n] >= 2}

    async def _lookup_coordinators(self, admin: Any, owned: set[int]) -> None:
        self._looked_up = self.clock()
        keys = {"group": (self.group, 0)}
        keys |= {f"tx.{p}": (transactional_id(self.group, p), 1) for p in owned}
        found: dict[str, int] = {}
        for what, (key, kind) in keys.items():
            with contextlib.suppress(KafkaError):
                found[what] = int(await admin.find_coordinator(key, kind))
        self._coordinators = found

    def _report(
        self, down: set[int], brokers: dict[int, tuple[str, int]], waits: dict[int, tuple[set[int], set[str]]]
    ) -> None:
        now, wall = self.clock(), time.time()
        active = down | set(waits)  # unreachable, or named as a leader it cannot be (-1: none elected)
        for node in active - set(self.outages):
            address = ":".join(map(str, brokers[node])) if node in brokers else "no leader elected"
            if node == EVERY:
                since_wall, since = self._failed_since or (wall, now)
                self.outages[node] = Outage(node, "no broker answers", since_wall, since)
            else:
                self.outages[node] = Outage(node, address, wall, now)
        for node, outage in list(self.outages.items()):
            parts, roles = waits.get(node, (set(), set()))
            if parts and not outage.partitions:  # the stall line: once per outage
                outage.partitions, outage.roles = set(parts), set(roles)
                log.warning(
                    "%s unreachable since %s: partitions %s wait on it (%s)",
                    outage.who,
                    time.strftime("%H:%M:%S", time.localtime(outage.since_wall)),
                    sorted(parts),
                    ", ".join(sorted(roles)),
                )
            elif outage.partitions and not parts and not outage.resumed:  # the resume line
                outage.resumed = True
                log.warning(
                    "%s: partitions %s resumed after %.1fs (%s); %d client errors held back",
                    outage.who,
                    sorted(outage.partitions),
                    now - outage.since,
                    _why_resumed(node, outage, down, self.owned()),
                    _FILTER.suppressed,
                )
            if node not in active:
                if not outage.partitions and node >= 0:
                    log.info(
                        "broker %d (%s) reachable again after %.1fs", node, outage.address, now - outage.since
                    )
                del self.outages[node]


def _why_resumed(node: int, outage: Outage, down: set[int], owned: set[int]) -> str:
    if not outage.partitions & owned:
        return "this worker no longer owns them"  # the group moved them while this worker was cut off
    return "leaders and coordinators moved" if node in down else "broker back"


async def _probe(host: str, port: int, tls: bool = False) -> str:
    """``ok`` (a broker reacted), ``refused`` (nothing listens there), ``closed`` (a plaintext listener
    hung up without an answer: a proxy whose broker is out of reach) or ``timeout`` (no reaction within
    :data:`PROBE_S`). It sends an ApiVersions request and waits for any reaction (an answer, or a TLS
    listener closing the connection on it): behind a proxy a bare connect would succeed while the broker
    is out of reach."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_S)
    except TimeoutError:
        return "timeout"
    except OSError:
        return "refused"
    try:
        client = b"calmrun-probe"
        request = struct.pack(">hhih", 18, 0, 1, len(client)) + client  # ApiVersions v0, correlation 1
        writer.write(struct.pack(">i", len(request)) + request)
        await asyncio.wait_for(writer.drain(), PROBE_S)
        answer = await asyncio.wait_for(reader.read(4), PROBE_S)
        # a TLS listener closes the connection on our plaintext: that is its answer; a plaintext one answers
        return "ok" if answer or tls else "closed"
    except TimeoutError:
        return "timeout"
    except OSError:
        return "ok"  # reset on our bytes: something is there and reacted
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class _Stalled(Collector):
    def __init__(self, watch: BrokerWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "calmrun_stalled_partitions",
            "Owned partitions waiting on an unreachable broker (a leader or a coordinator).",
        )
        g.add_metric([], len(self.watch.stalled))
        yield g
