"""The cost aggregator restarted 10 times (SIGTERM and kill -9, five of each) while events keep arriving, then
every total compared with an independent recount of the whole events topic (tests/costs_oracle.py).

Events arrive as the worker writes them today (plain idempotent producer, copies of seqs after a crash)
and as it will (transactions, some aborted: aborted events must not count, and their offsets and the
transaction markers leave gaps the aggregator must tell from lost records).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from decimal import Decimal
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from calmrun.costs.costtopics import ensure_cost_topics
from calmrun.costs.process import AggregatorProcess
from calmrun.costs.totals import read_current
from calmrun.kafka.topics import partition_for
from calmrun.settings import Settings, load_settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, StepCost
from tests.costs_oracle import counted, differences, read_events, recount

ROUNDS = 10
T0 = 1_704_067_170_000


def settings_for(broker: str, prefix: str) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        costs={"emit_interval_s": 0.05, "session_timeout_s": 6, "max_batch": 500},
    )


def run_events(i: int) -> list[RunEvent]:
    base = {
        "run_id": f"r{i:05d}",
        "workflow": ("wa", "wb")[i % 2],
        "tenant": ("acme", "beta", "gamma")[i % 3],
    }
    at = T0 + i * 700

    def cost(k: int) -> StepCost:
        return StepCost(
            latency_ms=3.0 + k,
            tokens_in=50 + i % 17 + k,
            tokens_out=5 + k,
            requests=1,
            api_calls=k % 2,
            model=("cheap", "smart")[min(k, 1)],
            cost_usd=Decimal("0.000031") * (k + 1) + Decimal(i % 11) / Decimal(10**7),
        )

    ev = [
        RunEvent(**base, seq=1, type="run.requested", at_ms=at),
        RunEvent(**base, seq=2, type="step.scheduled", at_ms=at, step="s1", attempt=1, data={"agent": "a1"}),
        RunEvent(**base, seq=3, type="step.failed", at_ms=at + 2, step="s1", attempt=1, cost=cost(0)),
        RunEvent(
            **base,
            seq=4,
            type="step.escalated",
            at_ms=at + 2,
            step="s1",
            attempt=1,
            data={"from": "cheap", "to": "smart", "reason": "invalid_output"},
        ),
        RunEvent(
            **base, seq=5, type="step.scheduled", at_ms=at + 2, step="s1", attempt=2, data={"agent": "a1"}
        ),
        RunEvent(**base, seq=6, type="step.succeeded", at_ms=at + 5, step="s1", attempt=2, cost=cost(1)),
        RunEvent(
            **base, seq=7, type="step.scheduled", at_ms=at + 5, step="s2", attempt=1, data={"agent": "a2"}
        ),
        RunEvent(**base, seq=8, type="step.succeeded", at_ms=at + 9, step="s2", attempt=1, cost=cost(2)),
        RunEvent(**base, seq=9, type="run.completed", at_ms=at + 9),
    ]
    return ev


async def write_events(settings: Settings, stop: asyncio.Event, written: list[int]) -> None:
    """Runs at ~100/s until ``stop``: most plain, every 4th re-sends copies (other cost), every 5th in a
    transaction, every 15th in a transaction that is aborted."""
    codec = RecordCodec(wire_models())
    k = settings.kafka
    topic = f"{k.prefix}.runs.events"
    plain = AIOKafkaProducer(bootstrap_servers=k.bootstrap, acks="all", enable_idempotence=True, linger_ms=2)
    tx = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap, transactional_id=f"{k.prefix}.test-writer", linger_ms=2
    )
    await plain.start()
    await tx.start()
    try:
        i = 0
        while not stop.is_set():
            ev = run_events(i)
            p = partition_for(ev[0].run_id, k.partitions)
            if i % 5 == 0:
                await tx.begin_transaction()
                for e in ev:
                    await tx.send(topic, codec.encode(e), key=e.run_id.encode(), partition=p)
                if i % 15 == 0:
                    await tx.abort_transaction()
                else:
                    await tx.commit_transaction()
            else:
                for e in ev:
                    await plain.send(topic, codec.encode(e), key=e.run_id.encode(), partition=p)
                if i % 4 == 1:
                    for e in ev[2:6]:
                        again = e.model_copy(update={"cost": ev[7].cost}) if e.cost else e
                        await plain.send(topic, codec.encode(again), key=e.run_id.encode(), partition=p)
            written.append(i)
            i += 1
            await asyncio.sleep(0.01)
        await plain.flush()
    finally:
        await plain.stop()
        await tx.stop()


@pytest.mark.fault
async def test_ten_restarts_leave_every_total_equal_to_a_recount(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(broker, prefix)
    await ensure_cost_topics(settings)
    stop, written = asyncio.Event(), []
    writer = asyncio.create_task(write_events(settings, stop, written))
    rng = random.Random(17)
    log = tmp_path / "agg.log"
    try:
        for round_ in range(ROUNDS):
            agg = AggregatorProcess(settings, log=log).start()
            await asyncio.sleep(rng.uniform(1.0, 4.0))  # sometimes mid-restore, mostly mid-stream
            assert agg.alive(), log.read_text()[-3000:]
            if round_ % 2:
                agg.kill()
            else:
                agg.stop()
            assert not writer.done() or writer.exception() is None
        stop.set()
        await writer
        with AggregatorProcess(settings, log=log):
            table, cov = await read_current(settings, wait=True, wait_s=120)
        assert cov.lag == 0
        events = await read_events(settings)
        want = recount(events)
        diff = differences(counted(table), want)
        assert not diff, f"{len(diff)} totals differ from the recount: {diff[:5]}"
        aborted = {f"r{i:05d}" for i in written if i % 15 == 0}
        assert aborted and not any(e.run_id in aborted for e in events)  # aborted runs are not in the log
        assert not any(("run", r, "all", 0) in want for r in aborted)
        assert len(written) > 500 and table.row("workflow", "wa").attempts > 0
        assert sum(table.repairs.values()) == 0  # gaps were markers and aborted records, none was lost
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await writer
