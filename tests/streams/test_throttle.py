"""The throttle on its own (pure asyncio): concurrency per step and alias, rates, pauses after a 429."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import pytest
from pydantic_ai.exceptions import ModelHTTPError

from calmrun.errors import ConfigError, ProviderError
from calmrun.settings import ThrottleSettings
from calmrun.streams.checkpoint import Checkpoint
from calmrun.streams.tasks import LocalSource, TaskRunner
from calmrun.streams.throttle import Throttle
from calmrun.workflow.events import StepCost, StepResult, StepTask
from tests.runtime_support import linear, until
from tests.streams.test_task_runner import Ports

WF = linear("lin")


def task(i: int, model: str | None = "a", step: str = "s1") -> StepTask:
    return StepTask(
        run_id=f"r{i}",
        workflow="lin",
        version="1",
        step=step,
        attempt=1,
        agent="x",
        model=model,
        issued_ms=0,
        timeout_s=30,
    )


def throttle(**cfg: Any) -> Throttle:
    return Throttle(ThrottleSettings.model_validate(cfg), [WF], ["a", "b"])


def result(t: StepTask, tokens: int = 0, requests: int = 1) -> StepResult:
    cost = StepCost(latency_ms=1, queue_wait_ms=0, tokens_in=tokens, requests=requests, model=t.model)
    return StepResult(run_id=t.run_id, step=t.step, attempt=1, at_ms=0, output={}, cost=cost)


class Probe:
    """Counts attempts inside ``hold`` at once, per alias, and when each started."""

    def __init__(self, th: Throttle) -> None:
        self.th = th
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.starts: list[tuple[str, float]] = []

    async def run(self, t: StepTask, busy_s: float = 0.05) -> None:
        name = t.model or "-"
        async with self.th.hold(t) or contextlib.nullcontext():
            self.starts.append((name, time.monotonic()))
            self.now[name] = self.now.get(name, 0) + 1
            self.peak[name] = max(self.peak.get(name, 0), self.now[name])
            await asyncio.sleep(busy_s)
            self.now[name] -= 1


async def test_concurrency_per_alias_and_per_step_never_exceeds_the_limit() -> None:
    th = throttle(models={"a": {"max_concurrency": 2}}, steps={"lin/s2": {"max_concurrency": 1}})
    probe = Probe(th)
    runs = [probe.run(task(i)) for i in range(10)] + [probe.run(task(i, "b")) for i in range(5)]
    await asyncio.gather(*runs)
    assert probe.peak == {"a": 2, "b": 5}  # b has no limit: it is not held up behind a
    step = Probe(th)
    await asyncio.gather(*(step.run(task(i, None, "s2")) for i in range(4)))
    assert step.peak == {"-": 1}
    assert th.counts.waits[("model", "a")] == 8 and th.counts.waits[("step", "lin/s2")] == 3


async def test_requests_per_minute_space_the_starts() -> None:
    th = throttle(models={"a": {"requests_per_minute": 600}})  # one start per 0.1 s
    probe = Probe(th)
    await asyncio.gather(*(probe.run(task(i), 0) for i in range(5)), probe.run(task(9, "b"), 0))
    a = [at for name, at in probe.starts if name == "a"]
    b = [at for name, at in probe.starts if name == "b"]
    assert all(y - x >= 0.095 for x, y in itertools.pairwise(a)), a
    assert b[0] < a[1]  # another alias starts at once
    assert th.counts.waits[("rate", "a")] == 4


async def test_a_burst_starts_at_once_then_the_spacing_applies() -> None:
    th = throttle(models={"a": {"requests_per_minute": 600, "requests_burst": 3}})
    probe = Probe(th)
    await asyncio.gather(*(probe.run(task(i), 0) for i in range(4)))
    a = [at for _, at in probe.starts]
    assert a[2] - a[0] < 0.05 and a[3] - a[0] >= 0.095


async def test_tokens_per_minute_throttle_the_next_starts_from_recorded_usage() -> None:
    th = throttle(models={"a": {"tokens_per_minute": 6_000}})  # 100 tokens/s
    probe = Probe(th)
    await probe.run(task(0), 0)
    th.finished(task(0), result(task(0), tokens=5_000))  # under a minute's budget: no wait
    await probe.run(task(1), 0)
    th.finished(task(1), result(task(1), tokens=1_050))  # 50 tokens over: half a second
    t0 = time.monotonic()
    await asyncio.gather(probe.run(task(2), 0), probe.run(task(3, "b"), 0))
    starts = dict(probe.starts[2:])
    assert starts["a"] - t0 >= 0.45 and starts["b"] - t0 < 0.1


async def test_a_429_pauses_the_alias_for_every_step_for_its_retry_after() -> None:
    th = throttle(retry_after_default_s=0.3)
    assert th.paused() == {}
    asked = ModelHTTPError(429, "m", headers={"Retry-After": "0.6"})
    try:
        raise ProviderError("openai", status=429, retriable=True) from asked
    except ProviderError as exc:
        th.failed(task(0), exc)  # as the agent wraps it
    assert 0.5 < th.paused()["a"] <= 0.6
    probe = Probe(th)
    t0 = time.monotonic()
    await asyncio.gather(probe.run(task(1, step="s2"), 0), probe.run(task(2, "b"), 0))
    starts = dict(probe.starts)
    assert starts["a"] - t0 >= 0.55 and starts["b"] - t0 < 0.1
    assert th.counts.pauses == {"a": 1} and th.counts.waits[("paused", "a")] == 1
    th.failed(task(3, "b"), ModelHTTPError(429, "m"))  # no Retry-After: the configured default
    assert 0.2 < th.paused()["b"] <= 0.3
    th.failed(task(4), ModelHTTPError(500, "m", headers={"Retry-After": "5"}))
    th.failed(task(4), ValueError("not a provider"))
    assert "a" not in th.paused()


def test_a_limit_on_an_unknown_step_or_alias_is_refused() -> None:
    with pytest.raises(ConfigError, match="lin/nope"):
        throttle(steps={"lin/nope": {"max_concurrency": 1}})
    with pytest.raises(ConfigError, match="'c', not a model alias"):
        throttle(models={"c": {"max_concurrency": 1}})


async def test_a_task_waiting_for_its_alias_holds_no_slot_and_blocks_no_other_alias() -> None:
    """max_in_flight 2, a limited to 1: a's second task waits for a's permit without taking the second slot,
    so b's task is fetched and runs meanwhile."""
    th = throttle(models={"a": {"max_concurrency": 1}})
    release = asyncio.Event()
    ran: list[str] = []

    async def execute(t: StepTask) -> StepResult:
        ran.append(t.run_id)
        if t.run_id == "r0":
            await release.wait()
        return result(t)

    ports = Ports(execute)
    runner = TaskRunner(2, ports, ports, ports, Checkpoint(), ports, th, 10)

    def start(t: StepTask) -> None:
        runner.start(0, t, LocalSource("t", 0, b"", b"", ()), eager=False, pending=[])

    start(task(0))
    await until(lambda: ran == ["r0"], 10, "r0 to start")
    start(task(1))  # waits for a's only permit
    await asyncio.wait_for(runner.room(), 10)  # a waiting task is not counted against max_in_flight
    start(task(2, "b"))
    await until(lambda: ran == ["r0", "r2"] and len(runner) == 2, 10, "b's r2 to run while a's r1 waits")
    assert ran == ["r0", "r2"]  # r2 done; r0 runs, r1 waits: a's limit held up no other alias
    release.set()
    await until(lambda: len(ran) == 3, 10, "r1 to start once r0 released a's permit")
    assert ran == ["r0", "r2", "r1"]
