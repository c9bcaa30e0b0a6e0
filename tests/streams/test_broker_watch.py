"""The broker watch's judgment: a gone broker at once, a silent one past its own deadline while another
answers, every one silent as a cut-off, a late look needs as much more silence; one stall line and one
resume line.

:class:`Liveness` is tried against a real broker, a port where nothing listens and a listener that never
answers (a broker out of reach behind a proxy, or hung); the judgment and the lines from set states.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from calmrun.kafka.liveness import MIN_SILENT_S, SLOW_FACTOR, Liveness
from calmrun.localproc import free_port
from calmrun.settings import load_settings
from calmrun.streams.brokers import EVERY, BrokerWatch


async def until(pred: Callable[[], bool], wait_s: float = 30) -> None:
    end = time.monotonic() + wait_s
    while not pred():
        assert time.monotonic() < end, "never happened"
        await asyncio.sleep(0.05)


async def running(p: Liveness, check: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(p.run())
    try:
        await check()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def silent_listener() -> AsyncIterator[int]:
    """A port that accepts connections and reads requests, and never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_broker_answers_on_one_connection(broker: str) -> None:
    host, port = broker.split(",")[0].rsplit(":", 1)
    p = Liveness(host, int(port), interval_s=0.1)

    async def check() -> None:
        await until(lambda: p.answers >= 3)
        assert not p.lost(time.monotonic())
        assert p.connects == 1  # asked again on the same connection, not a new one each time

    await running(p, check)


async def test_nothing_listening_is_gone_at_once() -> None:
    p = Liveness("127.0.0.1", free_port(), interval_s=0.1)

    async def check() -> None:
        await until(lambda: p.gone)
        assert p.lost(time.monotonic())

    await running(p, check)


async def test_a_silent_listener_is_lost_only_past_its_deadline(silent_listener: int) -> None:
    p = Liveness("127.0.0.1", silent_listener, interval_s=0.1)

    async def check() -> None:
        await until(lambda: p.lost(time.monotonic()))
        assert not p.gone  # it accepts connections: silent, not gone
        assert p.silent_for(time.monotonic()) >= MIN_SILENT_S

    await running(p, check)


async def test_a_slow_broker_sets_its_own_longer_deadline() -> None:
    delay = 0.5

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.read(1024):  # one ApiVersions request per read, answered late
            await asyncio.sleep(delay)
            writer.write(b"\x00\x00\x00\x04" + head[8:12])  # size 4, the request's correlation ID
            await writer.drain()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    p = Liveness("127.0.0.1", server.sockets[0].getsockname()[1], interval_s=0.1)

    async def check() -> None:
        await until(lambda: p.answers >= 3)
        assert p.deadline() >= SLOW_FACTOR * delay > MIN_SILENT_S

    try:
        await running(p, check)
    finally:
        server.close()


@dataclass
class Owning:
    """The watch's ``Owned`` port: partitions 0 and 1."""

    owned: set[int]


def watch() -> BrokerWatch:
    settings = load_settings(kafka={"bootstrap": "127.0.0.1:1", "prefix": "w"})
    w = BrokerWatch(settings, ["w.requests", "w.events", "w.state"], Owning({0, 1}), "g")
    w.probes = {n: Liveness("127.0.0.1", 9000 + n) for n in (1, 2, 3)}
    w._brokers = {n: ("127.0.0.1", 9000 + n) for n in (1, 2, 3)}
    return w


def answered(p: Liveness, sent: float) -> None:
    p.waiting_since, p.answered_sent = None, sent


def silent(p: Liveness, since: float) -> None:
    p.waiting_since = since


def test_a_broker_silent_while_another_answers_is_lost() -> None:
    w = watch()
    silent(w.probes[2], 100.0)
    answered(w.probes[1], 100.5)  # asked after broker 2's request, and answered: this side works
    silent(w.probes[3], 103.0)  # asked recently, not yet answered: not past its deadline
    assert w.judge(100.0 + MIN_SILENT_S + 0.1) == {2}


def test_a_silent_broker_waits_for_evidence_that_this_side_works() -> None:
    w = watch()
    silent(w.probes[2], 100.0)
    for n in (1, 3):  # both answered only requests sent before broker 2 fell silent
        answered(w.probes[n], 99.5)
        silent(w.probes[n], 101.0)
    assert w.judge(100.0 + MIN_SILENT_S + 0.1) == set()  # no verdict on 2 yet...
    assert w.judge(101.0 + MIN_SILENT_S + 0.1) == {EVERY}  # ...and then nobody answers: cut off


def test_a_gone_broker_is_lost_at_once_and_every_one_gone_is_a_cut_off() -> None:
    w = watch()
    w.probes[3].gone = True
    assert w.judge(100.0) == {3}
    for p in w.probes.values():
        p.gone = True
    assert w.judge(100.0) == {EVERY}


def test_a_late_look_needs_as_much_more_silence() -> None:
    w = watch()
    for p in w.probes.values():
        silent(p, 100.0)
    now = 100.0 + MIN_SILENT_S + 0.5
    assert w.judge(now, late=1.0) == set()  # the answers may be waiting unread for as long
    assert w.judge(now + 0.25) == set()  # the last look's lateness still counts
    assert w.judge(now + 0.5) == {EVERY}


def test_one_stall_line_and_one_resume_line(caplog: pytest.LogCaptureFixture) -> None:
    w = watch()
    w._leaders = {0: {"w.events": 1, "w.state": 1}, 1: {"w.events": 2, "w.state": 1}, 2: {"w.events": 2}}
    w._coordinators = {"group": 3, "tx.0": 1, "tx.1": 2}
    silent(w.probes[2], time.monotonic() - 3)
    with caplog.at_level(logging.INFO, logger="calmrun.brokers"):
        w._judged({2})
        w._judged({2})
        assert w.stalled == {0, 1}
        w._judged(set())
        w._judged(set())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("broker 2 (127.0.0.1:9002) unreachable since ")
    assert lines[0].endswith(
        ": partitions [0, 1] wait on it (leader of events, transaction coordinator of the worker's writer)"
    )
    assert "broker 2 (127.0.0.1:9002): partitions [0, 1] resumed after " in lines[1]
    assert "(broker back)" in lines[1]
    assert w.stalled == set()


def test_a_cut_off_names_every_owned_partition(caplog: pytest.LogCaptureFixture) -> None:
    w = watch()
    for p in w.probes.values():
        silent(p, time.monotonic() - 3)
    with caplog.at_level(logging.INFO, logger="calmrun.brokers"):
        w._judged({EVERY})
        assert w.stalled == {0, 1}
        w._judged(set())
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("every broker unreachable since ")
    assert lines[0].endswith(": partitions [0, 1] wait on it (no broker answers)")
    assert lines[1].startswith("every broker: partitions [0, 1] resumed after ")
