"""The journal store on the real broker: a zombie's late entries, parts, reading after an attempt ended."""

from __future__ import annotations

import time

from calmrun.agents.journal import AttemptJournal, Call
from calmrun.kafka.topics import Topics, create_topics
from calmrun.settings import Settings, load_settings
from calmrun.streams.journal import KafkaJournal

KEY = "r1/pay/run/1"


def _call(i: int) -> Call:
    return Call(op="tool", name="t", label=f"tool t({i})", digest=f"d{i}")


async def _unit(j: AttemptJournal, i: int, payload: object = None) -> None:
    async def body() -> object:
        return payload if payload is not None else f"result {i}"

    await j.unit(_call(i), body)


async def test_a_fenced_incarnations_late_entries_are_not_the_attempts(broker: str, prefix: str) -> None:
    settings = load_settings(kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4})
    await create_topics(settings.kafka, {Topics(prefix).journal: {}})
    store = KafkaJournal(settings, limit=8192)
    try:
        zombie = AttemptJournal(store, "r1", "pay", 1, KEY)
        for i in range(3):
            await _unit(zombie, i)
        # a new owner of the partition runs the attempt again: it answers 3, then writes its claim and goes on
        owner = AttemptJournal(store, "r1", "pay", 1, KEY)
        for i in range(3):
            await _unit(owner, i)
        assert (owner.replayed, owner.executed) == (3, 0)
        await _unit(owner, 3, payload="x" * 30_000)  # over the limit: written in parts
        await _unit(zombie, 3)  # the zombie did not notice it was fenced
        await _unit(zombie, 4)
        await _unit(owner, 4)
        store.forget(KEY)  # the attempt ended here; a re-run in this process reads the log
        other = KafkaJournal(settings)  # another worker's reader, from the start of the partition
        try:
            again = await other.load("r1", KEY, 0)
        finally:
            await other.close()
        after_forget = await store.load("r1", KEY, 0)
        records = await store.records("r1")
    finally:
        await store.close()
    for chain in (again, after_forget):
        assert [(e.position, e.incarnation) for e in chain] == [
            (0, zombie.incarnation),
            (1, zombie.incarnation),
            (2, zombie.incarnation),
            (3, owner.incarnation),
            (4, owner.incarnation),
        ]
        assert chain[3].payload == "x" * 30_000
    assert sum(1 for r in records if r.type == "part") >= 4
    assert (
        sum(1 for r in records if r.type == "entry" and r.claim is not None) == 1
    )  # owner's entry 3 is split
    assert records[0].type == "entry" and records[0].claim == 0


def _one_partition(broker: str, prefix: str) -> Settings:
    return load_settings(kafka={"bootstrap": broker, "prefix": prefix, "partitions": 1})


async def _attempt(
    store: KafkaJournal, run_id: str, units: int, *, fresh: bool, since_ms: int = 0
) -> AttemptJournal:
    """An attempt of step ``pay`` of ``run_id`` that journals ``units`` units (a fresh one loads nothing)."""
    key = f"{run_id}/pay/run/1"
    j = AttemptJournal(store, run_id, "pay", 1, key, since_ms=since_ms, recorded=[] if fresh else None)
    for i in range(units):
        await _unit(j, i, payload="y" * 2_000)
    return j


async def test_a_reader_keeps_nothing_of_attempts_that_ended_here(broker: str, prefix: str) -> None:
    """Finished runs' journals are not held: an attempt's records read after it ended (by another attempt's
    load, as a worker's reads go) are dropped, and the ended attempts remembered are bounded."""
    settings = _one_partition(broker, prefix)
    await create_topics(settings.kafka, {Topics(prefix).journal: {}})
    store = KafkaJournal(settings, ended=20)
    try:
        for n in range(60):
            ran = await _attempt(store, f"r{n}", 3, fresh=n % 2 == 0)  # every other one loads first
            assert ran.executed == 3
            store.forget(ran.attempt_key)  # executor: the attempt ended
        held = store.held()
    finally:
        await store.close()
    assert held["partitions"] == 1  # the partition was read forward: 30 loads
    assert (held["attempts"], held["records"]) == (0, 0)
    assert held["ended"] == 20


def _tick() -> int:
    """The wall clock's next millisecond (records written before it carry an earlier timestamp)."""
    t = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 <= t:
        pass
    return t + 1


async def test_a_load_the_reader_cannot_vouch_for_reads_the_whole_chain_from_the_log(
    broker: str, prefix: str
) -> None:
    """An attempt that ended and runs again here (forgotten since, or still remembered), and one that started
    before the reader began reading its partition, still get their whole chain: the promise the held
    records served."""
    settings = _one_partition(broker, prefix)
    await create_topics(settings.kafka, {Topics(prefix).journal: {}})
    store = KafkaJournal(settings, ended=2)
    try:
        early = await _attempt(store, "early", 2, fresh=True, since_ms=_tick())
        # the partition's first load: its reading starts here, after "early" started
        live = await _attempt(store, "live", 2, fresh=False, since_ms=_tick())
        early_chain = await store.load("early", early.attempt_key, early.since_ms)  # it started before
        first = await _attempt(store, "e0", 2, fresh=True, since_ms=_tick())
        store.forget(first.attempt_key)
        await store.load("live", live.attempt_key, live.since_ms)  # a read: e0's records arrive, ended
        assert store.held()["attempts"] == 1
        later = [await _attempt(store, f"e{n}", 2, fresh=True, since_ms=_tick()) for n in (1, 2)]
        for j in later:
            store.forget(j.attempt_key)  # past the 2 remembered: e0 is forgotten
        chains = {
            j.attempt_key: await store.load(j.run_id, j.attempt_key, j.since_ms)
            for j in (live, first, *later)
        }
        chains[early.attempt_key] = early_chain
        held = store.held()
    finally:
        await store.close()
    for j in (early, live, first, *later):
        assert [e.incarnation for e in chains[j.attempt_key]] == [j.incarnation] * 2, j.run_id
    assert held == {"partitions": 1, "attempts": 1, "records": 2, "ended": 2}
