"""The journal of one step attempt: each model request and tool call an agent makes, in order.

An attempt's agent runs through ``agents.durability``, which hands every durable unit (a model request, a tool
call, an MCP call, a toolset listing) to :meth:`AttemptJournal.unit`. A unit at a position the journal already
holds is answered from it (the recorded call must match, else ``NonDeterministicAgentError``); a unit past the
end runs live, and its entry is appended, and acknowledged by the store, before the agent continues.

Zombies are fenced by claims, not by the store: every execution of an attempt (an *incarnation*: the first
run, the run after a crash, a rebalance or a deadline re-issue, or a zombie that still runs) claims the
chain with its first entry (``claim``: the number of entries it read before; no record of its own, so no
extra write). Reading in log order, a claim makes its incarnation the owner and cuts the chain back to what
it read; an entry counts only when its incarnation owns the chain and it extends it by one. A fenced
worker's late entries are therefore never read as the attempt's. (``Claim`` records, a claim without an
entry, are read the same way.)

Entries hold only what is new: a model request's entry holds the messages added since the previous request
and the response, a tool call's entry its arguments and its result, never the whole history. A record that
would pass the store's size limit is written in parts (``part``) and read back whole; nothing is dropped.
This module has no Kafka in it: ``streams.journal`` is the store over Kafka, :class:`MemoryJournal` the one
of tests and of offline replay.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field
from pydantic_core import to_jsonable_python

from calmrun.errors import NonDeterministicAgentError
from calmrun.workflow.events import StepTask

Op = Literal["model", "tool", "mcp", "listing", "other"]

SCHEMA = 1


class Call(BaseModel):
    """What the agent asked for at one position; two calls are the same call when their ``digest`` is.

    Attributes:
        op: the kind of unit.
        name: the durable operation's name (agent, model or toolset) and, for a tool, the tool name.
        label: a short human description (``tool refund(order=1234)``, ``model smart``).
        digest: sha256 of what identifies the call (the operation name, a tool's arguments).
    """

    op: Op
    name: str
    label: str
    digest: str


class Usage(BaseModel):
    """Tokens of one unit: a model request's own, or a tool call's delegated agents'."""

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0


class Entry(BaseModel):
    """One journaled unit of an attempt."""

    type: Literal["entry"] = "entry"
    v: int = SCHEMA
    run_id: str
    step: str
    attempt: int
    attempt_key: str
    incarnation: str
    position: int
    call: Call
    payload: Any = None
    new_messages: list[Any] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    model: str | None = None
    latency_ms: float = 0.0
    at_ms: int = 0
    claim: int | None = None
    """Set on an incarnation's first entry: it read this many entries and owns the chain from here."""
    task: dict[str, Any] | None = None
    """On a first entry: the attempt's task (agent, model alias, input), what an offline replay runs."""


class Claim(BaseModel):
    """An incarnation of the attempt takes the chain over after reading ``base`` entries."""

    type: Literal["claim"] = "claim"
    v: int = SCHEMA
    run_id: str
    attempt_key: str
    incarnation: str
    base: int
    at_ms: int = 0
    task: dict[str, Any] | None = None
    """The attempt's task (agent, model alias, input): an offline replay re-runs the agent from it."""


class Part(BaseModel):
    """One slice of a record too large for the store: ``index`` of ``count``, joined back in order."""

    type: Literal["part"] = "part"
    v: int = SCHEMA
    run_id: str
    attempt_key: str
    incarnation: str
    position: int
    index: int
    count: int
    data: str


def encode(record: Entry | Claim | Part) -> bytes:
    """The bytes of a record (compact JSON)."""
    return record.model_dump_json().encode()


def decode(value: bytes) -> Entry | Claim | Part:
    """A record from its bytes.

    Raises:
        ValueError: not a journal record.
    """
    raw = json.loads(value)
    kind = raw.get("type")
    if kind == "entry":
        return Entry.model_validate(raw)
    if kind == "claim":
        return Claim.model_validate(raw)
    if kind == "part":
        return Part.model_validate(raw)
    raise ValueError(f"not a journal record: type {kind!r}")


def split(entry: Entry, limit: int) -> list[bytes]:
    """``entry`` as one record, or as parts of at most ``limit`` bytes each when it is larger."""
    whole = encode(entry)
    if len(whole) <= limit:
        return [whole]
    text = whole.decode()
    room = max(1024, limit - 512)  # the part's own fields; the JSON escaping of ``data`` is accounted below
    chunks: list[str] = []
    i = 0
    while i < len(text):
        n = room
        while len(json.dumps(text[i : i + n])) > room and n > 64:
            n = n * 3 // 4
        chunks.append(text[i : i + n])
        i += n
    return [
        encode(
            Part(
                run_id=entry.run_id,
                attempt_key=entry.attempt_key,
                incarnation=entry.incarnation,
                position=entry.position,
                index=k,
                count=len(chunks),
                data=chunk,
            )
        )
        for k, chunk in enumerate(chunks)
    ]


def whole(records: Iterable[Entry | Claim | Part]) -> Iterator[Entry | Claim]:
    """``records`` with the parts of each split entry joined: the entry comes where its last part was."""
    parts: dict[tuple[str, str, int], dict[int, str]] = {}
    for rec in records:
        if not isinstance(rec, Part):
            yield rec
            continue
        got = parts.setdefault((rec.attempt_key, rec.incarnation, rec.position), {})
        got[rec.index] = rec.data
        if len(got) == rec.count:
            del parts[(rec.attempt_key, rec.incarnation, rec.position)]
            joined = decode("".join(got[k] for k in range(rec.count)).encode())
            if isinstance(joined, Entry):
                yield joined


def chain(records: Iterable[Entry | Claim | Part], attempt_key: str) -> list[Entry]:
    """The entries of ``attempt_key`` that count, in position order, from its records in log order.

    A claim (an entry's ``claim``, or a ``Claim`` record) makes its incarnation the owner and cuts the chain
    to what it read; an entry (joined from its parts when split) counts when its incarnation owns the chain
    and its position is the chain's length.
    """
    entries: list[Entry] = []
    owner: str | None = None
    for rec in whole(r for r in records if r.attempt_key == attempt_key):
        base = rec.base if isinstance(rec, Claim) else rec.claim
        if base is not None:
            owner = rec.incarnation
            del entries[base:]
        if isinstance(rec, Entry) and rec.incarnation == owner and rec.position == len(entries):
            entries.append(rec)
    return entries


RESUME_MARGIN_MS = 60_000
"""How long before a task's ``issued_ms`` the read of its journal starts (producers' clocks may differ)."""


def since_ms(issued_ms: int, timeout_s: float) -> int:
    """The earliest time a record of an attempt issued at ``issued_ms`` can carry.

    A deadline re-issue carries a later ``issued_ms`` than the first copy; it comes after at least one
    timeout, so ten timeouts and a margin reach back past the first incarnation of any re-issued attempt.
    """
    return max(0, issued_ms - int(10 * timeout_s * 1000) - RESUME_MARGIN_MS)


class JournalStore(Protocol):
    """Where journal records live: ``streams.journal.KafkaJournal``, or ``MemoryJournal`` in memory."""

    async def load(self, run_id: str, attempt_key: str, since_ms: int) -> list[Entry]:
        """The chain of ``attempt_key`` (see :func:`chain`), from records written at ``since_ms`` or later."""
        ...

    async def append(self, run_id: str, record: Entry | Claim) -> int:
        """Write ``record`` keyed by ``run_id``, wait for the acknowledgement; returns its bytes."""
        ...

    def forget(self, attempt_key: str) -> None:
        """The attempt ended here: what the store keeps of it in memory may go."""
        ...


class MemoryJournal:
    """A journal store in memory: for tests, and for an offline replay fed with records read earlier."""

    def __init__(self, records: Iterable[Entry | Claim | Part] = (), limit: int = 1 << 20) -> None:
        self.records: list[Entry | Claim | Part] = list(records)
        self.limit = limit
        self.appended_bytes = 0

    async def load(self, run_id: str, attempt_key: str, since_ms: int) -> list[Entry]:
        return chain((r for r in self.records if r.run_id == run_id), attempt_key)

    async def append(self, run_id: str, record: Entry | Claim) -> int:
        blobs = split(record, self.limit) if isinstance(record, Entry) else [encode(record)]
        self.records.extend(decode(b) for b in blobs)
        n = sum(len(b) for b in blobs)
        self.appended_bytes += n
        return n

    def forget(self, attempt_key: str) -> None:
        pass


def digest(*parts: object) -> str:
    """sha256 over the canonical JSON of ``parts``."""
    text = json.dumps(to_jsonable_python(parts, fallback=repr), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Unit:
    """What a live unit produced, beyond its payload: the new messages, usage and model it reports."""

    new_messages: list[Any] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    model: str | None = None


@dataclass
class AttemptJournal:
    """The journal session of one incarnation of one attempt.

    Args:
        store: where records are read from and written to.
        run_id, step, attempt, attempt_key: the attempt (``attempt_key`` is its idempotency key).
        since_ms: the earliest time a record of this attempt can carry (see ``streams.journal``).
        live: False for an offline replay: a unit past the recorded end raises instead of running.
        task: the attempt's task as JSON, written with the claim (what an offline replay runs again).
        source: the attempt's task, made JSON for the claim only when one is written (most attempts of
            agents that make no model request write none), unless ``task`` is given.
    """

    store: JournalStore
    run_id: str
    step: str
    attempt: int
    attempt_key: str
    since_ms: int = 0
    live: bool = True
    task: dict[str, Any] | None = None
    source: StepTask | None = field(default=None, repr=False)
    _incarnation: str | None = field(default=None, init=False, repr=False)
    recorded: list[Entry] | None = None
    position: int = 0
    claimed: bool = False
    replayed: int = 0
    executed: int = 0
    written_bytes: int = 0
    write_ms: float = 0.0
    entries: list[Entry] = field(default_factory=list)
    """Every entry of this session, answered or written, in position order (for the cost and the view)."""

    @property
    def incarnation(self) -> str:
        """This session's random ID (a UUID's 32 hex digits), made when first asked for: most attempts
        (agents that make no model request) never journal, and a UUID per attempt was a visible cost."""
        if self._incarnation is None:
            self._incarnation = uuid.uuid4().hex
        return self._incarnation

    async def open(self) -> list[Entry]:
        """Read the recorded chain once (later calls return it)."""
        if self.recorded is None:
            self.recorded = await self.store.load(self.run_id, self.attempt_key, self.since_ms)
        return self.recorded

    async def unit(
        self,
        call: Call,
        body: Callable[[], Awaitable[Any]],
        describe: Callable[[Any], Unit] | None = None,
    ) -> tuple[Any, Entry, bool]:
        """Answer the next unit from the journal, or run it live and journal it.

        Returns:
            (payload, entry, executed): ``executed`` is False when the payload was the recorded one.

        Raises:
            NonDeterministicAgentError: the journal holds another call at this position.
            LookupError: an offline replay (``live=False``) ran past the recorded end.
        """
        recorded = await self.open()
        pos = self.position
        self.position += 1
        if pos < len(recorded):
            entry = recorded[pos]
            if entry.call.digest != call.digest:
                raise NonDeterministicAgentError(
                    run_id=self.run_id,
                    step=self.step,
                    attempt=self.attempt,
                    position=pos,
                    recorded=entry.call.label,
                    made=call.label,
                )
            self.replayed += 1
            self.entries.append(entry)
            return entry.payload, entry, False
        if not self.live:
            raise LookupError(f"journal position {pos}: {call.label} was never recorded (offline replay)")
        t0 = time.monotonic()
        payload = await body()
        latency_ms = (time.monotonic() - t0) * 1000
        extra = describe(payload) if describe is not None else Unit()
        entry = Entry(
            run_id=self.run_id,
            step=self.step,
            attempt=self.attempt,
            attempt_key=self.attempt_key,
            incarnation=self.incarnation,
            position=pos,
            call=call,
            payload=payload,
            new_messages=extra.new_messages,
            usage=extra.usage,
            model=extra.model,
            latency_ms=round(latency_ms, 3),
            at_ms=time.time_ns() // 1_000_000,
            claim=None if self.claimed else pos,
            task=None if self.claimed else self._task(),
        )
        w0 = time.monotonic()
        self.written_bytes += await self.store.append(self.run_id, entry)
        self.claimed = True
        self.write_ms += (time.monotonic() - w0) * 1000
        self.executed += 1
        self.entries.append(entry)
        return payload, entry, True

    def _task(self) -> dict[str, Any] | None:
        if self.task is None and self.source is not None:
            self.task = self.source.model_dump(mode="json")
        return self.task


def tasks(records: Iterable[Entry | Claim | Part]) -> dict[str, dict[str, Any]]:
    """The task of every attempt with a claim in ``records`` (attempt key -> the task of its latest claim:
    an attempt resumed after a pause on a tool call carries the answers), in first-seen order."""
    found: dict[str, dict[str, Any]] = {}
    for rec in whole(records):
        if rec.task is not None:
            found[rec.attempt_key] = rec.task
    return found


def labels(entries: Sequence[Entry]) -> list[str]:
    """``position: label`` of each entry, for a listing."""
    return [f"{e.position}: {e.call.label}" for e in entries]
