"""Runs pinned to a version this worker does not serve: they wait, and their partition moves to one that does.

A run is decided only with the definition it is pinned to (``calmrun.workflow.registry``). A worker that
owns a partition holding a run whose version it lacks does not guess: it decides none of that run's inputs.
Commands for it (redrive, migrate, ...) are held durably in its state record (``RunState.held``, in order)
and decided by the first owner that serves the version; its step tasks are not executed (the attempt's
deadline re-issues them under the same idempotency key later) and its timers do not fire.

The partition moves through the group's assignment: ``VersionAssignor`` keeps the range assignor's
co-partitioning (partition N of every topic goes to one member) and publishes, in each member's metadata,
the versions the member serves and the versions the runs of the partitions it owns are pinned to. The
leader gives a partition to the member serving most of what it needs (the range owner, then the current
owner, on a tie), else by range as before. A member that finds, after an assignment, runs it cannot decide
asks the group to rebalance once so that its needs are published; a member that joins later (the old
worker brought back) causes a rebalance itself. The number of waiting runs is the metric
``calmrun_runs_waiting_version`` and ``calmrun status RUN`` says which version a run waits for.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

from aiokafka import AIOKafkaConsumer
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from calmrun.streams.checkpoint import Pending
from calmrun.streams.deciding import Deciding
from calmrun.streams.records import StateOut
from calmrun.streams.shared import Shared
from calmrun.workflow.decider import decide
from calmrun.workflow.events import CommandHeld, HeldReleased, RunCommand, RunEvent
from calmrun.workflow.registry import Pin
from calmrun.workflow.state import RunState

log = logging.getLogger("calmrun.worker")

ASSIGNOR = "calmrun-versions"


def pin(state: RunState) -> Pin:
    return Pin(state.workflow, state.version, state.digest)


def member_data(
    serves: Iterable[Pin], needs: Mapping[int, Iterable[Pin]], resumes: bool = False, txn: str = ""
) -> bytes:
    """A member's metadata: the versions it serves, those its partitions' runs need, whether it resumes
    the attempts a restored state awaits (``streams.local.Recording``; older workers say nothing: no), and
    its writer's transactional id (``txn``; older workers have one per partition, and say none)."""
    body: dict[str, Any] = {
        "serves": [p.key for p in serves],
        "needs": {str(p): [x.key for x in v] for p, v in needs.items()},
    }
    if resumes:
        body["resumes"] = True
    if txn:
        body["txn"] = txn
    return json.dumps(body, sort_keys=True).encode()


def says_txns(data: bytes, key: str = "txns") -> frozenset[str] | None:
    """The transactional ids an assignment says the group's members write under (``key`` ``"txn"``: the one
    a member's metadata says it writes under); None if it says nothing (an older leader or member)."""
    try:
        body = json.loads(data or b"{}")
        said = body.get(key) if isinstance(body, dict) else None
    except ValueError:
        return None
    if isinstance(said, str):
        return frozenset([said])
    if isinstance(said, list) and all(isinstance(t, str) for t in said):
        return frozenset(said)
    return None


def says_resumes(data: bytes) -> bool:
    """Does a member's metadata say it resumes attempts from restored states, or an assignment that every
    member of the group does (only a leader of this version says so)?"""
    try:
        body = json.loads(data or b"{}")
        return isinstance(body, dict) and body.get("resumes") is True
    except ValueError:
        return False


def read_member_data(data: bytes) -> tuple[list[Pin], dict[int, set[Pin]]]:
    """A member's (serves, needs); an unreadable or empty one serves and needs nothing known."""
    try:
        body = json.loads(data or b"{}")
        serves = [Pin.parse(k) for k in body.get("serves", [])]
        needs = {int(p): {Pin.parse(k) for k in v} for p, v in body.get("needs", {}).items()}
    except (ValueError, AttributeError, TypeError):
        return [], {}
    return serves, needs


def place(
    n: int, serves: Mapping[str, list[Pin]], needs: Mapping[str, Mapping[int, set[Pin]]]
) -> dict[int, str]:
    """Partition -> member: by range over the sorted members, moved where the partition's needs are served."""
    ids = sorted(serves)
    owner: dict[int, str] = {}
    if not ids:
        return owner
    each, extra = divmod(n, len(ids))
    p = 0
    for i, m in enumerate(ids):
        for _ in range(each + (1 if i < extra else 0)):
            owner[p] = m
            p += 1
    load = collections.Counter(owner.values())
    wanted: dict[int, set[Pin]] = collections.defaultdict(set)
    current: dict[int, str] = {}
    for m, by_part in needs.items():
        for part, pins in by_part.items():
            if 0 <= part < n and pins:
                wanted[part] |= pins
                current[part] = m

    def covered(m: str, pins: set[Pin]) -> int:
        return sum(1 for x in pins if any(x.served_by(s) for s in serves[m]))

    for part in sorted(wanted):
        pins, ranged = wanted[part], owner[part]
        best = max(covered(m, pins) for m in ids)
        if covered(ranged, pins) == best:
            continue
        here = current.get(part, "")
        chosen = (
            here
            if here in serves and covered(here, pins) == best
            else min((m for m in ids if covered(m, pins) == best), key=lambda m: (load[m], m))
        )
        load[ranged] -= 1
        load[chosen] += 1
        owner[part] = chosen
    # a member that gave partitions up takes as many back, of those it serves as well as their owner does
    share = {m: each + (1 if i < extra else 0) for i, m in enumerate(ids)}
    for m in ids:
        for part in range(n):
            if load[m] >= share[m]:
                break
            held_by = owner[part]
            if load[held_by] > share[held_by] and covered(m, wanted[part]) >= covered(held_by, wanted[part]):
                load[held_by] -= 1
                load[m] += 1
                owner[part] = m
    return owner


class VersionAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """The group's assignor; see the module docstring. ``for_worker`` makes one class per worker (aiokafka
    asks the class for the member's metadata), which carries what that worker serves and needs."""

    name = ASSIGNOR
    version = 0
    serves: ClassVar[tuple[Pin, ...]] = ()
    needs: ClassVar[dict[int, set[Pin]]] = {}
    resumes: ClassVar[bool] = False
    """This member resumes the attempts its restored states await (published in its metadata)."""
    group_resumes: ClassVar[bool] = False
    """Every member of the group does, as the last assignment said (False until one says so)."""
    txn: ClassVar[str] = ""
    """This member's writer's transactional id (published in its metadata)."""
    group_txns: ClassVar[frozenset[str] | None] = None
    """The transactional ids the members of the group write under, as the last assignment said (None: it
    said nothing, its leader is of an earlier calmrun)."""

    @classmethod
    def for_worker(cls, serves: Iterable[Pin], resumes: bool = False, txn: str = "") -> type[VersionAssignor]:
        body = {
            "serves": tuple(serves),
            "needs": {},
            "resumes": resumes,
            "group_resumes": False,
            "txn": txn,
            "group_txns": None,
        }
        return cast(type[VersionAssignor], type(cls.__name__, (cls,), body))

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        data = member_data(cls.serves, cls.needs, cls.resumes, cls.txn)
        return ConsumerProtocolMemberMetadata(cls.version, sorted(topics), data)

    @classmethod
    def assign(
        cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        serves: dict[str, list[Pin]] = {}
        needs: dict[str, dict[int, set[Pin]]] = {}
        topics: set[str] = set()
        for m, md in members.items():
            serves[m], needs[m] = read_member_data(md.user_data)
            topics |= set(md.subscription)
        every = all(says_resumes(md.user_data) for md in members.values())
        txns = sorted(t for md in members.values() for t in says_txns(md.user_data, "txn") or ())
        told = json.dumps({"resumes": True, "txns": txns} if every else {"txns": txns}).encode()
        sizes = {t: sorted(cluster.partitions_for_topic(t) or ()) for t in topics}
        n = max((len(ps) for ps in sizes.values()), default=0)
        owner = place(n, serves, needs)
        out: dict[str, dict[str, list[int]]] = {m: {} for m in members}
        for t, parts in sorted(sizes.items()):
            for part in parts:
                held_by = owner.get(part)
                # partition N of a topic its owner does not read is left unassigned: its tasks are of a
                # version that owner lacks, so they would not run anyway (the co-partitioning holds)
                if held_by is not None and t in members[held_by].subscription:
                    out[held_by].setdefault(t, []).append(part)
        return {
            m: ConsumerProtocolMemberAssignment(cls.version, sorted(by_topic.items()), told)
            for m, by_topic in out.items()
        }

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        cls.group_resumes = says_resumes(assignment.user_data)
        cls.group_txns = says_txns(assignment.user_data)


@dataclass
class PinningCounts:
    held: int = 0  # commands held for a version not served here
    released: int = 0  # held commands decided by this worker
    rejoins: int = 0  # rebalances asked for to publish needs


class Commands(Protocol):
    """Decides an operator's command for a run (the intake's path, so a held command released takes it)."""

    def command(self, p: int, run_id: str, body: RunCommand, state: RunState | None, at_ms: int) -> None: ...


class Pinning:
    """Holds what cannot be decided here and releases it when it can; see the module docstring."""

    def __init__(self, shared: Shared, decisions: Deciding, assignor: type[VersionAssignor]) -> None:
        self.definitions, self.topics = shared.workflows, shared.topics
        self._own, self._decisions = shared.ownership, decisions
        self._assignor = assignor
        self.counts = PinningCounts()

    def serves(self, state: RunState) -> bool:
        return self.definitions.serves(pin(state))

    def waiting(self) -> dict[Pin, int]:
        """The live runs of the owned partitions pinned to a version not served here, per version, now."""
        counts: collections.Counter[Pin] = collections.Counter()
        for p in sorted(self._own.owned):
            table = self._own.runs.get(p)
            for _, state in table.live() if table is not None else ():
                if not self.serves(state):
                    counts[pin(state)] += 1
        return dict(counts)

    def hold(self, p: int, state: RunState, body: RunCommand, at_ms: int, pending: Pending | None) -> None:
        """Keep ``body`` in the run's state record (with its input, in one transaction) for a later owner."""
        why = f"{body.command} held: no worker here serves {pin(state)}"
        d = decide(None, state, CommandHeld(state.run_id, at_ms, body.model_dump(mode="json"), why))
        assert d.state is not None
        self._write(p, d.state, pending, d.events)
        self.counts.held += 1
        log.info(
            "run %s: %s command held, version %s is not served here", state.run_id, body.command, pin(state)
        )

    def _write(self, p: int, state: RunState, pending: Pending | None, notes: tuple[RunEvent, ...]) -> None:
        table, codec = self._own.runs[p], self._decisions.codec
        encoded = table.put(state.run_id, state)
        encode = (lambda: encoded) if encoded is not None else (lambda: codec.encode(state))
        out = StateOut(self.topics.state, p, state.run_id.encode(), encode)
        events = [self._decisions.event_out(p, n) for n in notes]
        done = (pending,) if pending is not None else ()
        self._decisions.submit(p, events, done, notes, out, run_id=state.run_id)  # counted till committed

    def after_assignment(self, commands: Commands) -> None:
        """Decide the held commands this worker can, count the waiting runs, publish needs if new."""
        needs: dict[int, set[Pin]] = {}
        for p in sorted(self._own.owned):
            table = self._own.runs.get(p)
            for run_id, state in table.live() if table is not None else ():
                needs.setdefault(p, set()).add(pin(state))
                if state.held and self.serves(state):
                    self._release(p, run_id, commands)
        waiting = self.waiting()
        published = self._assignor.needs
        self._assignor.needs = needs
        if waiting and needs != published:
            log.warning(
                "runs waiting for versions no worker here serves: %s; asking the group to rebalance",
                {str(k): v for k, v in waiting.items()},
            )
            self.counts.rejoins += 1
            request_rejoin(self._own.consumer)

    def _release(self, p: int, run_id: str, commands: Commands) -> None:
        table = self._own.runs[p]
        while True:
            state = table.get(run_id)
            if state is None or not state.held:
                return
            entry: dict[str, Any] = json.loads(state.held[0])
            d = decide(None, state, HeldReleased(run_id, int(entry["at_ms"])))
            popped = d.state
            assert popped is not None and d.ignored is None
            self._write(p, popped, None, d.events)  # the pop is recorded even when the command is ignored
            self.counts.released += 1
            command = RunCommand.model_validate(entry["command"])
            commands.command(p, run_id, command, popped, int(entry["at_ms"]))


class Released:
    """After each assignment: the held commands this worker can decide now go the intake's way (a
    ``Takeover`` of ``streams.partitions``)."""

    def __init__(self, pins: Pinning, commands: Commands) -> None:
        self._pins, self._commands = pins, commands

    def taken(self, new: set[int]) -> None:
        self._pins.after_assignment(self._commands)


def request_rejoin(consumer: AIOKafkaConsumer | None) -> None:
    """Ask the group to rebalance (aiokafka has no public call for it; its coordinator has one)."""
    coordinator = getattr(consumer, "_coordinator", None)
    rejoin = getattr(coordinator, "request_rejoin", None)
    if rejoin is not None:
        rejoin()
