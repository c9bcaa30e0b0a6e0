"""Helpers for runtime tests: settings per test prefix, workers in-process, scripted agents."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pydantic import BaseModel

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.settings import Settings, load_settings
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, parse_workflow


def settings_for(broker: str, prefix: str, **worker: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1, **worker},
    )


class Item(BaseModel):
    n: int = 0
    text: str = ""


class Out(BaseModel):
    n: int
    label: str = ""


async def add_one(ctx: StepContext, item: Item) -> Out:
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


def linear(name: str = "lin", steps: int = 3, agent: str = "add_one", **step: Any) -> WorkflowDef:
    names = [f"s{i}" for i in range(1, steps + 1)]
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {
                    "name": n,
                    "agent": agent,
                    "next": names[i + 1] if i + 1 < len(names) else None,
                    "input": {"n": "input.n"} if i == 0 else {"n": f"steps.{names[i - 1]}.n"},
                    **step,
                }
                for i, n in enumerate(names)
            ],
        }
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    workflows: Sequence[WorkflowDef],
    agents: AgentRegistry,
    models: ModelRegistry | None = None,
) -> AsyncIterator[Worker]:
    worker = Worker(settings, workflows, agents, models or ModelRegistry({}))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def until(
    pred: Any, wait_s: float = 30.0, what: str = "condition", alive: Callable[[], None] | None = None
) -> None:
    """Poll ``pred()`` to a deadline (no fixed sleeps as synchronisation); the one "wait until" of the tests.

    ``pred`` may be a coroutine function (a read of a topic): its result is awaited. ``alive`` is called on
    every poll and may raise to fail at once (a worker process that died).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while not ((await ok) if inspect.isawaitable(ok := pred()) else ok):
        if alive is not None:
            alive()
        if loop.time() > end:
            raise AssertionError(f"timed out after {wait_s}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- added for the runtime integration tests (test_runtime_*.py) ---------------------------------------


async def sleepy_add_one(ctx: StepContext, item: Item) -> Out:
    """``add_one`` after ``SLEEP_S`` seconds (set per process by ``tests.worker_proc --sleep``)."""
    await asyncio.sleep(SLEEP_S)
    return Out(n=item.n + 1, label=f"{ctx.step}:{ctx.attempt}")


SLEEP_S = 0.0


async def read_raw(broker: str, topic: str, partitions: int = 4) -> list[Any]:
    """Every record of ``topic`` (all partitions) from the beginning to its current end, undecoded."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from calmrun.kafka.reader import read_to_end

    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return [rec async for rec in read_to_end(consumer, tps)]
    finally:
        await consumer.stop()


async def poll_states(
    client: Any, run_ids: Sequence[str], pred: Any, wait_s: float = 60.0, what: str = "run states"
) -> dict[str, Any]:
    """Re-read the state topic until ``pred(state)`` holds for every run in ``run_ids``; returns the states.

    Unlike ``Client.wait_terminal`` this can wait for a run to leave one terminal status for another
    (a redrive turns ``quarantined`` into ``completed``).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while True:
        states = await client.read_states()
        wanted = {rid: states.get(rid) for rid in run_ids}
        if all(s is not None and pred(s) for s in wanted.values()):
            return wanted
        if loop.time() > end:
            counts: dict[str, int] = {}
            for s in wanted.values():
                k = s.status if s is not None else "absent"
                counts[k] = counts.get(k, 0) + 1
            raise AssertionError(f"timed out after {wait_s}s waiting for {what}: {counts}")
        await asyncio.sleep(0.2)


def successful_seqs(events: Sequence[Any]) -> dict[tuple[str, str], set[int]]:
    """(run, step) -> the distinct seqs of its applied ``step.succeeded`` (kind run) events.

    A record re-sent after a crash repeats its seq, so it collapses here; two different seqs for one step
    would mean the step's result was applied twice.
    """
    out: dict[tuple[str, str], set[int]] = {}
    for e in events:
        if e.type == "step.succeeded" and e.seq > 0 and e.data.get("kind", "run") == "run":
            out.setdefault((e.run_id, e.step), set()).add(e.seq)
    return out


class WorkerProcs:
    """``tests.worker_proc`` workers as separate OS processes; ``kill_all()`` ends every one still alive.

    Each worker writes its stats and owned partitions as JSON to ``<dir>/<name>.json`` every 0.1 s and a
    last time after a clean stop (SIGTERM).
    """

    def __init__(self, broker: str, prefix: str, directory: Any) -> None:
        self.broker, self.prefix, self.dir = broker, prefix, directory
        self.procs: dict[str, Any] = {}
        self.logs: dict[str, Any] = {}

    def start(self, name: str, *args: str) -> Any:
        import os
        import subprocess
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in kill_all; a restart appends
        self.logs[name] = log
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.worker_proc",
                "--bootstrap",
                self.broker,
                "--prefix",
                self.prefix,
                "--status-file",
                str(self.dir / f"{name}.json"),
                *args,
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        self.procs[name] = proc
        return proc

    def status(self, name: str) -> dict[str, Any]:
        import json

        path = self.dir / f"{name}.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def alive(self, name: str) -> None:
        """Raise if the worker exited on its own (its log tail is in the message)."""
        proc = self.procs[name]
        if proc.poll() is not None:
            tail = (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"worker {name} exited with {proc.returncode}:\n{tail}")

    def watch(self, *names: str) -> Any:
        """An ``alive`` check for ``until``: raises as soon as one of ``names`` exited."""

        def check() -> None:
            for name in names:
                self.alive(name)

        return check

    def kill9(self, name: str) -> None:
        import signal

        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def terminate(self, name: str, wait_s: float = 60.0) -> int:
        import signal

        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        return int(proc.wait(timeout=wait_s))

    def kill_all(self) -> None:
        import signal

        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
        for log in self.logs.values():
            log.close()


async def ready(worker: Worker, partitions: int = 4, wait_s: float = 60.0) -> Worker:
    """Wait until ``worker`` has restored and owns all ``partitions``.

    Tests that are not about startup submit only after this: records fetched while the worker is still
    restoring its state hit a known race (see ``test_runtime_restart``), which would make them flaky.
    """
    await until(
        lambda: worker.parts.owned == set(range(partitions)), wait_s, "the worker to own every partition"
    )
    return worker


# -- the effectively-once fault tests (tests/streams/test_effectively_once.py) ---------------------------

START_LOG: str | None = None  # set per process by ``tests.worker_proc --start-log``


class Nonce(BaseModel):
    n: int = 0


class NonceOut(BaseModel):
    n: int
    nonce: int
    even: bool


def log_start(ctx: StepContext) -> None:
    """Append this attempt's start to ``START_LOG`` (one line, one write: atomic across processes)."""
    import json
    import os
    import time

    path = START_LOG or os.environ.get("CALMRUN_TEST_START_LOG")  # the variable: ``calmrun worker`` children
    if path is None:
        return

    line = json.dumps(
        {
            "pid": os.getpid(),
            "t_ms": time.time_ns() // 1_000_000,
            "run_id": ctx.run_id,
            "step": ctx.step,
            "kind": ctx.kind,
            "attempt": ctx.attempt,
            "key": ctx.idempotency_key,
        }
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def nonce_step(ctx: StepContext, item: Nonce) -> NonceOut:
    """Sleeps ``SLEEP_S``, returns a random nonce: a re-run of the step would route the run differently."""
    import os
    import random

    log_start(ctx)
    await asyncio.sleep(SLEEP_S or float(os.environ.get("CALMRUN_TEST_SLEEP_S", "0")))
    nonce = random.randrange(1_000_000)
    return NonceOut(n=item.n + 1, nonce=nonce, even=nonce % 2 == 0)


def branchy(name: str = "fork") -> WorkflowDef:
    """Three steps with a branch on the first step's random nonce: s1 -> (even: s2a | odd: s2b) -> s3."""
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {
                    "name": "s1",
                    "agent": "nonce",
                    "input": {"n": "input.n"},
                    "branches": [{"when": {"field": "even", "value": True}, "goto": "s2a"}],
                    "next": "s2b",
                },
                {"name": "s2a", "agent": "nonce", "input": {"n": "steps.s1.n"}, "next": "s3"},
                {"name": "s2b", "agent": "nonce", "input": {"n": "steps.s1.n"}, "next": "s3"},
                {"name": "s3", "agent": "nonce", "input": {"n": "steps.s1.n"}},
            ],
        }
    )
