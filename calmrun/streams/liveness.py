"""Liveness: a worker killed outright leaves the group in about a second, not after its session timeout.

The classic group protocol notices a dead member only when its session times out
(``worker.session_timeout_s``, at least 6 s): until then nobody decides its partitions. Here each worker
beats on the liveness topic (``<prefix>.workers.liveness``, one partition per group, no transactions)
every ``interval_s`` and reads its peers' beats. A peer is judged dead when, for ``dead_after_s``, it has
not beaten while this worker's own beats kept coming back (at least ``dead_after_s / interval_s - 1`` of
them after the peer's last: a reader or a broker that stalls judges nobody). This worker then removes the
peer's member from the group with a LeaveGroup (v3: member id and ``group.instance.id``; nothing ties a
LeaveGroup to the connection that joined), and rejoins at once: the rebalance gives the dead member's
partitions to the survivors, whose new writers fence its transactions as after a session timeout.

A peer whose beats come late (a lossy link, a starved host) is given more time, as a phi-accrual detector
would: after a gap over half of ``dead_after_s`` it is judged dead only after three times its longest
recent gap. Not when this worker's own beats came back late across the same gap: then the stall was the
broker's, the machine's or this reader's, shared by every beat, not the peer's. A removed process that
beats again was alive (a killed one never beats again under its key): each such removal, false or of a
link cut and healed, doubles its threshold. Both are forgotten after ``FORGET_S`` and never exceed the
session timeout, which removes a silent member anyway. A killed worker whose beats were regular is still
removed after ``dead_after_s``.

Beats are written and read by a thread with an event loop of its own, so a worker whose event loop is busy
(a large batch of decisions, a long commit) still beats; only a stopped process (kill -9, SIGSTOP, a
frozen host) or a cut link falls silent. A live worker removed this way anyway is a zombie like any other:
its writers are fenced, its consumer rejoins; the cost is a rebalance.

A worker that stops cleanly (SIGTERM) writes a last beat that says so: a dynamic member leaves the group
itself, a static one is left to its session timeout: a planned restart under the same
``group.instance.id`` keeps its partitions without a rebalance (KIP-345). A LeaveGroup naming a static
member's old member id, after a restart has replaced it, is refused by the broker
(``FENCED_INSTANCE_ID``): the restarted worker is never removed by its predecessor's silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String
from aiokafka.structs import TopicPartition

from calmrun.kafka.connect import client_kwargs
from calmrun.kafka.topics import Topics, create_topics, partition_for
from calmrun.settings import LivenessSettings, Settings

log = logging.getLogger("calmrun.liveness")

RETENTION = {"retention.ms": "300000", "segment.ms": "60000"}
"""Beats matter for seconds: the topic keeps five minutes of them."""


class LeaveGroupResponse_v3(Response):  # type: ignore[misc]
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(
                ("member_id", String("utf-8")), ("group_instance_id", String("utf-8")), ("error_code", Int16)
            ),
        ),
    )


class LeaveGroupRequest_v3(RequestStruct):  # type: ignore[misc]
    """LeaveGroup naming members (KIP-345); aiokafka 0.14 has only v0-v1, which name one member id."""

    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = LeaveGroupResponse_v3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class LeaveMembers(Request[LeaveGroupRequest_v3]):  # type: ignore[misc]
    API_KEY = 13

    def __init__(self, group: str, members: list[tuple[str, str | None]]) -> None:
        self._group, self._members = group, members

    def build(self, request_struct_class: type[LeaveGroupRequest_v3]) -> LeaveGroupRequest_v3:
        return request_struct_class(self._group, self._members)


LATE_FRACTION = 0.5
"""A peer's beat is *late* when it comes more than this part of ``dead_after_s`` after its last: 0.5 s at
1 s. Under CPU load alone the longest gaps measured were 0.49-0.69 s (load 8.5-9.6 on 2 cores,
``python -m bench.liveness_gaps``); on a lossy link they came at 0.5-7 s (TCP retransmissions back off)."""
LATE_FACTOR = 3.0
"""After a late beat of ``g`` s, the peer is judged dead only after ``LATE_FACTOR * g`` s of silence (never
less than ``dead_after_s``): a peer whose beats come late is given the margin its own gaps ask for. Three,
not two: on a lossy link TCP's retransmission timeouts double, and a packet-loss run with liveness on
removed a live peer 1.11 s after its last beat, whose gaps had been 0.51 and 0.52 s."""
FORGET_S = 30.0
"""How long a late beat, or a removal its peer survived, keeps its threshold raised (a bad link's late
beats come every few seconds, each one keeping it raised)."""


@dataclass
class Peer:
    """What this worker knows of one peer process, from its beats (times on this worker's monotonic clock)."""

    member: str
    instance: str | None
    seen: float
    echoes: int = 0  # this worker's own beats read back since the peer's last
    leaving: bool = False
    longest_gap_s: float = 0.0
    late_gap_s: float = 0.0  # its longest late gap within FORGET_S of the last late one
    late_at: float = 0.0
    survived: int = 0  # removals this process beat again after (false ones), within FORGET_S of the last
    survived_at: float = 0.0

    def dead_after(self, base_s: float, cap_s: float, now: float) -> float:
        """The silence after which this peer is judged dead: ``base_s``, doubled for each removal it
        survived and at least ``LATE_FACTOR`` times a recent late gap, never over ``cap_s``."""
        limit = base_s
        if self.survived and now - self.survived_at < FORGET_S:
            limit *= 2.0**self.survived
        if self.late_gap_s and now - self.late_at < FORGET_S:
            limit = max(limit, LATE_FACTOR * self.late_gap_s)
        return min(limit, cap_s)


@dataclass
class LivenessCounts:
    beats: int = 0
    removed: int = 0
    refused: int = 0  # LeaveGroups the broker refused (the member was gone or replaced)
    survived: int = 0  # removed peers that beat again: false removals, or links cut and healed
    late: int = 0  # peer beats that came late (LATE_FRACTION of dead_after_s)
    shared: int = 0  # peer beats that came late together with this worker's own: not counted late
    longest_peer_gap_s: float = 0.0  # the longest silence of a peer that beat again


class Liveness:
    """Beats for this worker and removes peers that fell silent; a thread of its own (see the module).

    Args:
        settings: the worker's settings (``worker.liveness``, the group, the connection).
        member: this worker's current member id in the group ("" while it has none).
        rejoin: called on the worker's event loop after a peer was removed: rejoin the group now, rather
            than at the next heartbeat.
        group_id: the group (the worker's by default).
    """

    NAME: ClassVar[str] = "calmrun-liveness"

    def __init__(
        self,
        settings: Settings,
        member: Callable[[], str],
        rejoin: Callable[[], None],
        group_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.conf: LivenessSettings = settings.worker.liveness
        self.group = group_id or settings.group_id
        self.topic = f"{Topics(settings.kafka.prefix).prefix}.workers.liveness"
        self.partition = partition_for(self.group, settings.kafka.partitions)
        self.key = uuid.uuid4().hex  # this process's beats
        self.member, self.rejoin = member, rejoin
        self.instance = settings.worker.instance_id
        self.counts = LivenessCounts()
        self.peers: dict[str, Peer] = {}
        self._removed: set[tuple[str, str]] = set()  # (process, member) already removed or refused
        self._gone: dict[str, Peer] = {}  # processes removed, by key: one that beats again was alive
        self._own_seen = 0.0
        self._own_late_at = -1.0  # when this worker's own beats last came back late
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()

    @classmethod
    def of(cls, settings: Settings, consumer: AIOKafkaConsumer) -> Liveness:
        """The liveness of the worker whose group consumer (started) is ``consumer``."""

        def member() -> str:  # read from the liveness thread: one attribute
            coordinator = getattr(consumer, "_coordinator", None)  # aiokafka: no public member id
            return str(getattr(coordinator, "member_id", "") or "")

        def rejoin() -> None:
            coordinator = getattr(consumer, "_coordinator", None)
            if coordinator is not None:
                coordinator.request_rejoin()

        return cls(settings, member, rejoin)

    async def start(self) -> None:
        """Create the liveness topic if missing, then start beating and watching in the thread."""
        await create_topics(self.settings.kafka, {self.topic: RETENTION}, "liveness")
        self._main_loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self.NAME, daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._started.wait, 30)

    async def stop(self) -> None:
        """Write a last beat that says this worker is leaving, then stop the thread."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the thread's loop has ended already
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)

    # -- the thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        k = self.settings.kafka
        producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap,
            client_id=f"{k.client_id}-liveness",
            acks=1,
            linger_ms=0,
            enable_idempotence=False,
            request_timeout_ms=max(2_000, round(self.conf.dead_after_s * 2_000)),
            **client_kwargs(k),
        )
        reader = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            client_id=f"{k.client_id}-liveness",
            enable_auto_commit=False,
            **client_kwargs(k),
        )
        tp = TopicPartition(self.topic, self.partition)
        try:
            await producer.start()
            await reader.start()
            reader.assign([tp])
            await reader.seek_to_end(tp)
            self._started.set()
            tasks = [asyncio.create_task(self._beat(producer)), asyncio.create_task(self._watch(reader, tp))]
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
            for t in [*tasks, stopping]:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t  # a loop that failed raises here: the worker goes on, its peers' session applies
            # a clean stop: a dynamic member leaves the group itself; a static one is left to its session
            # timeout (a restart under the same name keeps its partitions)
            with contextlib.suppress(KafkaError, asyncio.TimeoutError):
                await asyncio.wait_for(self._send(producer, leaving=True), 2)
        except KafkaError as exc:  # liveness only hastens a rebalance; the session timeout still applies
            log.warning("liveness stopped: %r; a dead peer now waits for its session timeout", exc)
        finally:
            await asyncio.gather(producer.stop(), reader.stop(), return_exceptions=True)
            c = self.counts
            log.info(
                "liveness stopped: %d beats written, peers' longest silence %.3f s, %d late beats "
                "(and %d late with this worker's own), %d removed, %d refused, %d beat again after "
                "their removal",
                c.beats,
                c.longest_peer_gap_s,
                c.late,
                c.shared,
                c.removed,
                c.refused,
                c.survived,
            )

    async def _send(self, producer: AIOKafkaProducer, *, leaving: bool = False) -> None:
        value = {"group": self.group, "member": self.member(), "instance": self.instance, "leaving": leaving}
        await producer.send_and_wait(
            self.topic, json.dumps(value).encode(), key=self.key.encode(), partition=self.partition
        )

    async def _beat(self, producer: AIOKafkaProducer) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._send(producer)
                self.counts.beats += 1
            except KafkaError as exc:
                log.warning("liveness beat failed: %r", exc)
            await asyncio.sleep(max(0.0, self.conf.interval_s - (time.monotonic() - started)))

    async def _watch(self, reader: AIOKafkaConsumer, tp: TopicPartition) -> None:
        while True:
            try:
                batches = await reader.getmany(tp, timeout_ms=round(self.conf.interval_s * 400))
            except KafkaError as exc:  # judges nobody meanwhile: its own beats are not read either
                log.warning("liveness: reading beats failed: %r", exc)
                await asyncio.sleep(self.conf.interval_s)
                continue
            now = time.monotonic()
            records = batches.get(tp, [])
            if any(rec.key == self.key.encode() for rec in records):  # before the peers' beats read with them
                self._own_arrived(now)
            for rec in records:
                self._read(rec.key, rec.value, now)
            for key, peer in self._dead(now):
                await self._remove(reader, key, peer, now)
            self._forget(now)

    def _read(self, key: bytes | None, value: bytes | None, now: float) -> None:
        if key is None or value is None:
            return
        with contextlib.suppress(ValueError):
            beat: dict[str, Any] = json.loads(value)
            if beat.get("group") != self.group:
                return
            who = key.decode()
            if who == self.key:
                self._own_arrived(now)
                self._own_seen = now
                for other in self.peers.values():
                    other.echoes += 1
                return
            peer = self.peers.get(who)
            if peer is None and (gone := self._gone.pop(who, None)) is not None:
                peer = self.peers[who] = self._survived(who, gone, now)
            if peer is None:
                peer = self.peers[who] = Peer(beat.get("member") or "", beat.get("instance"), now)
            else:
                gap = now - peer.seen
                peer.longest_gap_s = max(peer.longest_gap_s, gap)
                self.counts.longest_peer_gap_s = max(self.counts.longest_peer_gap_s, gap)
                if gap > 2 * self.conf.interval_s:  # a late beat: the margin to dead_after_s, measured
                    log.info("liveness: peer %s beat again after %.2f s", peer.member or who, gap)
                # its link or host is slow: more margin. Not while it has no member id (starting, or
                # rejoining): a worker joining its group and restoring is busy, its link may be fine
                member = beat.get("member") or ""
                late = gap > LATE_FRACTION * self.conf.dead_after_s and peer.member and member
                if late and self._own_late_at >= peer.seen:  # this worker's beats were late with it
                    self.counts.shared += 1
                elif late:
                    fresh = now - peer.late_at < FORGET_S
                    peer.late_gap_s = max(peer.late_gap_s, gap) if fresh else gap
                    peer.late_at = now
                    self.counts.late += 1
            peer.member, peer.instance, peer.seen, peer.echoes = (
                beat.get("member") or "",
                beat.get("instance"),
                now,
                0,
            )
            peer.leaving = bool(beat.get("leaving"))

    def _own_arrived(self, now: float) -> None:
        """This worker's own beat read back at ``now``: late, if over ``LATE_FRACTION`` of ``dead_after_s``
        after the last one (a stall every beat shared)."""
        if self._own_seen and now - self._own_seen > LATE_FRACTION * self.conf.dead_after_s:
            self._own_late_at = now

    def _survived(self, key: str, gone: Peer, now: float) -> Peer:
        """A removed process beat again: it was alive (the removal false, or its link cut and healed); its
        threshold doubles."""
        fresh = now - gone.survived_at < FORGET_S
        gone.survived = (gone.survived if fresh else 0) + 1
        gone.survived_at = now
        gap = now - gone.seen
        gone.late_gap_s = max(gone.late_gap_s, gap) if now - gone.late_at < FORGET_S else gap
        gone.late_at = now
        self.counts.survived += 1
        log.warning(
            "liveness: removed member %s beat again after %.2f s (it was alive: slow, or cut off and back; "
            "%d within %.0f s): it is judged dead after %.2f s of silence now",
            gone.member or key,
            gap,
            gone.survived,
            FORGET_S,
            gone.dead_after(self.conf.dead_after_s, self._cap_s, now),
        )
        return gone

    def _forget(self, now: float) -> None:
        """Drop what can no longer matter: a removed process silent past its session timeout and
        ``FORGET_S`` (dead, or a member no more), a peer that left as long ago."""
        horizon = self._cap_s + FORGET_S
        for key in [k for k, p in self._gone.items() if now - p.seen > horizon]:
            del self._gone[key]
        for key in [k for k, p in self.peers.items() if p.leaving and now - p.seen > horizon]:
            del self.peers[key]

    @property
    def _cap_s(self) -> float:
        """No threshold goes past the session timeout: the broker removes a silent member then anyway."""
        return max(self.conf.dead_after_s, self.settings.worker.session_timeout_s)

    def _dead(self, now: float) -> list[tuple[str, Peer]]:
        """Peers silent for their threshold (``Peer.dead_after``) while this worker's own beats kept
        arriving: at least ``threshold / interval_s - 1`` of them since the peer's last, the last within
        two intervals."""
        conf = self.conf
        if now - self._own_seen > 2 * conf.interval_s + 0.1:  # this side's beats are late too: judge nobody
            return []
        dead = []
        for key, p in self.peers.items():
            limit = p.dead_after(conf.dead_after_s, self._cap_s, now)
            if (
                now - p.seen >= limit
                and p.echoes >= max(2, int(limit / conf.interval_s) - 1)
                and p.member
                and not p.leaving
                and (key, p.member) not in self._removed
            ):
                dead.append((key, p))
        return dead

    async def _remove(self, reader: AIOKafkaConsumer, key: str, peer: Peer, now: float) -> None:
        client = reader._client  # the reader's connections; aiokafka has no public LeaveGroup for others
        try:
            node = await client.coordinator_lookup(CoordinationType.GROUP, self.group)
            resp = await client.send(node, LeaveMembers(self.group, [(peer.member, peer.instance)]))
        except KafkaError as exc:
            log.warning("liveness: could not remove silent member %s: %r", peer.member, exc)
            return
        self._removed.add((key, peer.member))
        errors = [for_code(resp.error_code), *(for_code(m[2]) for m in resp.members)]
        failed = [e for e in errors if e.errno != 0]
        silent = now - peer.seen
        if failed:
            self.counts.refused += 1
            log.info(
                "liveness: member %s silent %.2f s not removed: %s", peer.member, silent, failed[0].__name__
            )
            return
        self.counts.removed += 1
        log.warning(
            "liveness: removed member %s (instance %s) of group %s: silent %.2f s",
            peer.member,
            peer.instance,
            self.group,
            silent,
        )
        self._gone[key] = self.peers.pop(key)
        if self._main_loop is not None:
            self._main_loop.call_soon_threadsafe(self.rejoin)
