"""Broker loss you can see: which broker is missing, which of this worker's partitions wait on it, until when.

When a broker dies, its partitions keep it as leader until the controller fences it (the broker session
timeout, 9 s by default), and a coordinator on it (the group's, the worker's writer's transactions) answers
nobody. aiokafka retries all of that on its own and logs a connection error per attempt (thousands per
outage) while calmrun's own loggers are silent: a waiting worker looks like a broken one.

:class:`BrokerWatch` asks each broker once a second whether it answers (an ApiVersions request on a
connection of its own, :class:`~calmrun.kafka.liveness.Liveness`) and judges the answers four times a
second; it reads the cluster's metadata (brokers, the leaders of this worker's topics) and the group and
transaction coordinators every 10 s, at once when a broker is lost or back, and every second while one is.
A broker is lost when nothing listens at its address (a refused or closed connection: at once) or when it
is silent past its own deadline (2 s, longer for a broker that has been answering slowly) while another
broker answers; every broker silent or gone is a cut-off. It logs one line when owned partitions stall on a
lost broker (which node, which partitions and why, since when) and one when they resume, and exports
``calmrun_stalled_partitions``.

:class:`RateLimit` lets one of aiokafka's repeated warnings and errors through per message per window and
counts the rest (the resume line says how many).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.coordination import FindCoordinatorRequest
from aiokafka.protocol.metadata import MetadataRequest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.liveness import Liveness
from calmrun.settings import Settings
from calmrun.streams.ports import Owned
from calmrun.streams.txn import on_lane

if TYPE_CHECKING:
    from calmrun.streams.metrics import WorkerMetrics
    from calmrun.streams.shared import Shared

log = logging.getLogger("calmrun.brokers")

EVERY = -2
"""The outage of every broker at once (this worker cut off from the cluster), as a node ID."""

TICK_S = 0.25
"""How often the watch judges the brokers' answers (local work only: no request is sent for it)."""
METADATA_S = 10.0
"""How often the brokers, leaders and coordinators are read while every broker answers (every interval
while one is lost or an outage is open, and at once when the lost brokers change)."""
READ_S = 5.0
"""How long one read of the metadata and coordinators may take."""


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
        ownership: the partitions this worker owns now (``streams.ownership.Ownership``).
        group: the consumer group (its coordinator).
        writer: the transactional id of the worker's writer (its coordinator; "": none looked up).
        interval_s: how often each broker is asked whether it answers (one ApiVersions request).
    """

    def __init__(
        self,
        settings: Settings,
        topics: list[str],
        ownership: Owned,
        group: str,
        writer: str = "",
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.topics, self.ownership, self.group = settings, topics, ownership, group
        self.writer = writer
        self.interval_s, self.clock = interval_s, clock
        self.outages: dict[int, Outage] = {}
        self.stalled: set[int] = set()
        self.probes: dict[int, Liveness] = {}
        self.lost: set[int] = set()
        self._coordinators: dict[str, int] = {}
        self._leaders: dict[int, dict[str, int]] = {}  # partition -> topic -> leader, as last read
        self._brokers: dict[int, tuple[str, int]] = {}  # as the last metadata named them
        self._looked_up: set[int] | None = None  # the owned partitions whose coordinators were looked up
        self._late = 0.0  # how late the last judgment ran
        self._ssl: Any = None  # the TLS context of the clients (set by run)
        self._fresh_each = settings.kafka.security.protocol.startswith("SASL_")

    @classmethod
    def of(cls, shared: Shared, inputs: list[str], writer: str, metrics: WorkerMetrics | None) -> BrokerWatch:
        """The watch of a worker: its inputs, events and state; its group and writer; its metrics (if any)."""
        t, settings = shared.topics, shared.settings
        topics = list(dict.fromkeys([*inputs, t.events, t.state]))
        watch = cls(settings, topics, shared.ownership, settings.group_id, writer)
        if metrics is not None:
            with contextlib.suppress(ValueError):  # registered already (a restarted worker object)
                metrics.registry.register(_Stalled(watch))
        return watch

    async def run(self) -> None:
        """Judge every :data:`TICK_S` from the brokers' answers; read the metadata (brokers, leaders,
        coordinators) every :data:`METADATA_S`, and every interval while a broker is lost or an outage is
        open. Runs until cancelled; nothing the cluster does makes it raise."""
        limit_client_logs()
        k = self.settings.kafka
        auth = client_kwargs(k)
        self._ssl = auth.get("ssl_context")
        admin = AIOKafkaAdminClient(
            bootstrap_servers=k.bootstrap, client_id=f"{k.client_id}-watch", request_timeout_ms=5_000, **auth
        )
        tasks: dict[int, asyncio.Task[None]] = {}
        try:
            read_at = next_read = float("-inf")
            while True:
                now = self.clock()
                owned_moved = self.ownership.owned != self._looked_up
                due = now >= next_read or (owned_moved and now - read_at >= self.interval_s)
                if due and self.lost != {EVERY}:  # cut off: no broker to read from (it would only wait)
                    read_at = now
                    await self._read(admin)
                    self._sync(tasks)
                    busy = self.lost or any(not o.resumed for o in self.outages.values())
                    next_read = read_at + (self.interval_s if busy or not self._brokers else METADATA_S)
                before = self.clock()
                await asyncio.sleep(TICK_S)
                lost = self.judge(self.clock(), late=self.clock() - before - TICK_S)
                if lost is None:  # no broker known yet
                    continue
                if lost != self.lost:
                    self.lost = lost
                    if lost != {EVERY}:  # the leaders and coordinators as of now, from a broker that answers
                        read_at = self.clock()
                        await self._read(admin)
                    next_read = read_at + self.interval_s
                self._judged(lost)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            with contextlib.suppress(Exception):
                await admin.close()

    def _sync(self, tasks: dict[int, asyncio.Task[None]]) -> None:
        """One :class:`Liveness` per broker the metadata names (a moved address gets a new one)."""
        for node, (host, port) in self._brokers.items():
            p = self.probes.get(node)
            if p is None or (p.host, p.port) != (host, port):
                if node in tasks:
                    tasks.pop(node).cancel()
                self.probes[node] = Liveness(
                    host,
                    port,
                    ssl_context=self._ssl,
                    fresh_each=self._fresh_each,
                    interval_s=self.interval_s,
                    clock=self.clock,
                )
                tasks[node] = asyncio.create_task(self.probes[node].run(), name=f"calmrun-liveness-{node}")

    def judge(self, now: float, late: float = 0.0) -> set[int] | None:
        """The lost brokers (``{EVERY}``: none answers), or None before any broker is known.

        A broker silent past its deadline is lost once another broker answered a request sent after the
        silent one's (this side works); when every broker is silent or gone, this worker is cut off. A gone
        broker (nothing listens) is lost at once. ``late``: how late this judgment runs (this process was
        busy, and an answer may be waiting unread for as long): the silence must be longer by as much (the
        most of this judgment's and the last one's lateness).
        """
        slack, self._late = max(late, self._late, 0.0), late
        if not self.probes:
            return None
        probes = self.probes
        lost_each = {n for n, p in probes.items() if p.lost(now, slack)}
        if lost_each and lost_each == set(probes):
            return {EVERY}
        lost = set()
        for n in lost_each:
            p = probes[n]
            since = p.waiting_since if p.waiting_since is not None else now
            if p.gone or any(m.answered_sent >= since for k, m in probes.items() if k != n):
                lost.add(n)
        return lost

    def _judged(self, lost: set[int]) -> None:
        """Report what ``lost`` means for the owned partitions (the stall and resume lines)."""
        owned = set(self.ownership.owned)
        waits: dict[int, tuple[set[int], set[str]]] = {}  # node -> (partitions, roles)
        if lost == {EVERY}:
            waits = {n: (o.partitions, o.roles) for n, o in self.outages.items() if not o.resumed}
            if owned:
                waits[EVERY] = (owned, {"no broker answers"})
            self._report({EVERY, *self.outages}, waits)
            self.stalled = set(owned)
            return
        for p, by_topic in self._leaders.items():
            if p not in owned:
                continue
            for topic, node in by_topic.items():
                if node in lost or node < 0:
                    waits.setdefault(node, (set(), set()))[0].add(p)
                    waits[node][1].add(f"leader of {topic.rsplit('.', 1)[-1]}")
        for what, node in self._coordinators.items():
            if node in lost:
                entry = waits.setdefault(node, (set(), set()))
                if what == "group":
                    entry[0].update(owned)
                    entry[1].add("group coordinator")
                else:  # a lane of the writer, which writes for every owned partition
                    entry[0].update(owned)
                    entry[1].add("transaction coordinator of the worker's writer")
        self._report(lost, waits)
        self.stalled = {p for parts, _ in waits.values() for p in parts} & owned

    async def _read(self, admin: Any) -> None:
        """The brokers and the leaders of the watched topics (one Metadata request), then the group's and
        the owned partitions' transaction coordinators, from a broker that answers; nothing changes when
        none does."""
        live = [n for n, p in self.probes.items() if not p.lost(self.clock())]
        try:
            async with asyncio.timeout(READ_S):
                await admin.start()
                node = live[0] if live else admin._client.get_random_node()
                if node is None:  # no broker known to the client yet
                    return
                meta = (await admin._client.send(node, MetadataRequest(self.topics))).to_object()
                self._brokers = {b["node_id"]: (b["host"], b["port"]) for b in meta["brokers"]}
                self._leaders = {}
                for t in meta["topics"]:
                    for part in t.get("partitions", ()):
                        self._leaders.setdefault(part["partition"], {})[t["topic"]] = part["leader"]
                owned = set(self.ownership.owned)
                keys = {"group": (self.group, 0)}
                lanes = range(self.settings.kafka.txn_lanes)  # each lane's id has its own coordinator
                if self.writer:
                    keys |= {f"tx.{lane}": (on_lane(self.writer, lane), 1) for lane in lanes}
                found: dict[str, int] = {}
                for what, (key, kind) in keys.items():
                    answer = await admin._client.send(node, FindCoordinatorRequest(key, kind))
                    if not answer.error_code:
                        found[what] = int(answer.coordinator_id)
                self._coordinators, self._looked_up = found, owned
        except (TimeoutError, KafkaError, OSError) as exc:  # tried again at the next read
            log.debug("broker watch: metadata not read (%r)", exc)

    def _report(self, down: set[int], waits: dict[int, tuple[set[int], set[str]]]) -> None:
        now, wall = self.clock(), time.time()
        active = down | set(waits)  # unreachable, or named as a leader it cannot be (-1: none elected)
        for node in active - set(self.outages):
            if node == EVERY:  # dated from when the first broker fell silent
                began = [p.waiting_since for p in self.probes.values() if p.waiting_since is not None]
                since = min(began, default=now)
                self.outages[node] = Outage(node, "no broker answers", wall - (now - since), since)
            else:
                p = self.probes.get(node)
                since = p.waiting_since if p is not None and p.waiting_since is not None else now
                address = (
                    ":".join(map(str, self._brokers[node])) if node in self._brokers else "no leader elected"
                )
                self.outages[node] = Outage(node, address, wall - (now - since), since)
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
                    _why_resumed(node, outage, down, set(self.ownership.owned)),
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
