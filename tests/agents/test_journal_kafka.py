"""The journal store on the real broker: a zombie's late entries, parts, reading after an attempt ended."""

from __future__ import annotations

from calmrun.agents.journal import AttemptJournal, Call
from calmrun.kafka.topics import Topics, create_topics
from calmrun.settings import load_settings
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
