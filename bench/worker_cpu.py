"""The worker's CPU per run in its pure parts, in process and without a broker: a stable yardstick.

    python -m bench.worker_cpu [--runs 2000] [--repeat 5]

The bench's workflow (``bench.worker``: three no-op steps returning ~200 bytes) goes through the worker's own
classes as ``bench.worker`` runs it at 100 in flight, alone in its group (task records ``auto``: none for
its own steps), with ``worker.inline_wait_ms`` folding s1's result into the request's transaction: the
request's bytes are parsed and stamped (``parse_request``, ``Stamps``), each input is decided by
``streams.deciding.Deciding`` (the decider, its events and tasks encoded, the run table), each transaction
encodes the newest state of the run and runs the decisions' commit callbacks (what ``TxnWriter``
does around its sends), and each attempt runs through ``streams.local.LocalExecutor`` (``Attempts.run``,
``agents.execute``). Only the broker is left out: ``_Writer`` stands in for ``TxnWriter`` (no
producer, no sends) and ``_Starts`` for ``EagerStarts`` (no task runner: the bench runs the attempts itself,
one at a time). Prints process CPU µs per run for each stage and in all, the minimum and the median of the
repetitions; the total is also measured in repetitions of its own, which read no clock per stage.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, cast

from bench.worker import bench_step, workflow
from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.kafka.topics import Topics, partition_for
from calmrun.limits import check_workflow
from calmrun.redact import Redactor
from calmrun.settings import Settings, load_settings
from calmrun.streams.attempts import Attempts
from calmrun.streams.checkpoint import Pending
from calmrun.streams.deciding import Deciding
from calmrun.streams.local import LocalExecutor, Recording
from calmrun.streams.membership import Membership
from calmrun.streams.ownership import Ownership
from calmrun.streams.records import Out, StateOut
from calmrun.streams.requests import parse_request
from calmrun.streams.runtable import RunTable
from calmrun.streams.shared import Shared
from calmrun.streams.stamps import Stamps
from calmrun.streams.tasks import LocalSource
from calmrun.streams.throttle import Throttle
from calmrun.streams.timers import Timers
from calmrun.streams.txn import TxnWriter
from calmrun.streams.versions import VersionAssignor
from calmrun.wire.codec import wire_codec
from calmrun.workflow.events import RunRequest, StepTask
from calmrun.workflow.registry import Definitions

PARTITIONS = 4
STAGES = ("request", "decide", "commit", "attempt")


class _Alone(VersionAssignor):
    """The assignor of a worker alone in its group: every member resumes from states (no task records)."""

    group_resumes: ClassVar[bool] = True


class _Writer:
    """What ``Deciding`` asks of the worker's writer, without a producer: ``commit`` does what
    ``TxnWriter._write`` does besides Kafka (the newest state per run encoded, the callbacks run)."""

    def __init__(self, partitions: Iterable[int]) -> None:
        self.partitions = set(partitions)
        self.batch: list[tuple[list[Out], StateOut | None, Callable[[], None] | None, str | None]] = []
        self.open: dict[str, int] = defaultdict(int)
        self.written = 0  # bytes of the records the transactions would send
        self.records = 0  # and how many

    def add(
        self,
        p: int,
        outputs: list[Out],
        state: StateOut | None,
        on_commit: Callable[[], None] | None,
        run_id: str | None = None,
        *,
        inputs: Iterable[Pending],
        lazy: bool = False,
    ) -> None:
        self.batch.append((outputs, state, on_commit, run_id))
        if run_id is not None:
            self.open[run_id] += 1

    def quiet(self, run_id: str) -> bool:
        return run_id not in self.open

    def hold(self, tasks: Iterable[asyncio.Future[None]]) -> None:
        pass

    def commit(self) -> None:
        batch, self.batch = self.batch, []
        states: dict[tuple[str, bytes], StateOut] = {}
        for outputs, state, _, _ in batch:
            self.written += sum(len(o.value or b"") for o in outputs)
            self.records += len(outputs)
            if state is not None:
                states.pop((state.topic, state.key), None)
                states[(state.topic, state.key)] = state
        for st in states.values():
            self.written += len(st.encode())
            self.records += 1
        for _, _, on_commit, run_id in batch:
            if run_id is not None:
                self.open[run_id] -= 1
                if self.open[run_id] <= 0:
                    del self.open[run_id]
            if on_commit is not None:
                on_commit()


class _Starts:
    """Collects the tasks a decision starts (``EagerStarts`` without a task runner)."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, Out, StepTask]] = []

    def start(self, p: int, tasks: list[tuple[Out, StepTask]], committed: bool) -> list[asyncio.Future[None]]:
        self.queue += [(p, out, task) for out, task in tasks]
        return []


class Pipeline:
    """The worker's pure parts for the bench's workflow, as ``streams.worker.Worker`` composes them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        wf = check_workflow(workflow({}), settings)
        wfs = self.workflows = Definitions([wf])
        t, codec = Topics(settings.kafka.prefix), wire_codec(settings.wire)
        self.topics, self.codec = t, codec
        local = frozenset(t.worker_inputs([wf], "default")) - {t.requests, t.results}
        w = settings.worker
        recording = Recording(local, w.task_records, w.eager, _Alone)
        own = self.own = Ownership(Membership(settings, []), settings.kafka.partitions)
        self.writer = _Writer(range(settings.kafka.partitions))
        for p in self.writer.partitions:
            own.owned.add(p)
            own.runs[p] = RunTable(codec)
        own.writer = cast(TxnWriter, self.writer)
        shared = Shared(settings, t, codec, wfs, own, Redactor(settings.redact), time_ms)
        self.stamps = Stamps(settings, wfs.values(), own)
        throttle = Throttle(settings.throttle, wfs.values(), ModelRegistry({}).aliases)
        agents = AgentRegistry({"bench_step": bench_step})
        self.attempts = Attempts(settings, agents, ModelRegistry({}), throttle, time_ms)
        self.executor = LocalExecutor(self.attempts, shared.redactor, own)
        self.starts = _Starts()
        self.deciding = Deciding(shared, Timers(), None, self.starts, recording)

    def request_bytes(self, run_id: str) -> bytes:
        """The request as the bench's client writes it (``bench.driver``)."""
        return self.codec.encode(RunRequest(workflow="lin", run_id=run_id, input={"n": 0}))

    async def run(self, run_id: str, value: bytes, cpu: dict[str, int] | None) -> None:
        """One run from its request's bytes to its last transaction; adds CPU ns per stage to ``cpu``
        (None: no clock is read, for the total alone: a clock read costs 1-2 µs here, 18 a run)."""
        clock = time.process_time_ns if cpu is not None else _no_clock
        cpu = cpu if cpu is not None else defaultdict(int)
        t0 = clock()
        limits = self.settings.limits
        key = run_id.encode()
        rid, body = parse_request(key, value, self.codec, fallback_id="requests-0-0", limits=limits)
        assert isinstance(body, RunRequest)
        p = partition_for(rid, self.own.n)
        state = self.own.runs[p].get(rid)
        wf = self.workflows.newest(body.workflow)
        assert wf is not None
        inp = self.stamps.request(rid, wf, body, 1_000)
        t1 = clock()
        cpu["request"] += t1 - t0
        src = LocalSource(self.topics.requests, p, key, value, ())
        self.deciding.decide(p, wf, state, inp, src, (), redelivered=True, lazy=True)
        t2 = clock()
        cpu["decide"] += t2 - t1
        writer, queue = self.writer, self.starts.queue
        while queue or writer.batch:
            if not queue:
                t0 = clock()
                writer.commit()
                cpu["commit"] += clock() - t0
                continue
            _, out, task = queue.pop(0)
            t0 = clock()
            result = await self.executor.execute(task)
            t1 = clock()
            # as Intake.result: the run's state and its definition, then the decision
            state = self.own.state(p, task.run_id)
            assert state is not None
            wf = self.workflows.pinned(state.workflow, state.version, state.digest)
            assert wf is not None
            source = LocalSource(out.topic, p, out.key or b"", out.value_or_encode(), out.headers)
            self.deciding.decide(p, wf, state, result, source, (), lazy=True)
            cpu["attempt"] += t1 - t0
            cpu["decide"] += clock() - t1


def time_ms() -> int:
    return 1_000


def _no_clock() -> int:
    return 0


def settings_for_bench() -> Settings:
    """``bench.worker``'s settings (its broker and prefix do not matter: nothing connects)."""
    kafka = {"bootstrap": "localhost:1", "prefix": "cpu", "partitions": PARTITIONS}
    worker = {"max_in_flight": 100, "commit_interval_s": 1.0, "timer_interval_s": 0.2}
    return load_settings(None, kafka=kafka, worker=worker)


async def repetition(runs: int, tag: str, stages: bool) -> tuple[dict[str, float], Pipeline]:
    """CPU µs per run over ``runs`` fresh runs of one fresh pipeline: in all, and per stage if ``stages``."""
    pipe = Pipeline(settings_for_bench())
    ids = [f"{tag}-{i:07d}-abcdefgh" for i in range(runs)]
    values = [pipe.request_bytes(rid) for rid in ids]
    cpu: dict[str, int] = dict.fromkeys(STAGES, 0)
    gc.collect()
    start = time.process_time_ns()
    for rid, value in zip(ids, values, strict=True):
        await pipe.run(rid, value, cpu if stages else None)
    total = time.process_time_ns() - start
    out = {k: v / runs / 1e3 for k, v in cpu.items()} if stages else {}
    out["staged total" if stages else "total"] = total / runs / 1e3
    return out, pipe


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.worker_cpu")
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    reps: list[dict[str, float]] = []
    pipe: Pipeline | None = None
    for i in range(args.repeat + 1):  # the first pair is a warm-up, not counted
        for stages in (False, True):  # the total without clock reads, then the stages
            rep, pipe = asyncio.run(repetition(args.runs, f"r{i}s{stages:d}", stages))
            if i:
                reps.append(rep)
    assert pipe is not None
    keys: list[str] = [*STAGES, "staged total", "total"]
    out: dict[str, Any] = {
        "runs": args.runs,
        "repetitions": args.repeat,
        "decisions per run": pipe.deciding.counts.decisions / args.runs,
        "completed per run": pipe.deciding.counts.completed / args.runs,
        "records written per run": pipe.writer.records / args.runs,
        "bytes written per run": round(pipe.writer.written / args.runs),
    }
    for k in keys:
        vals = [r[k] for r in reps if k in r]
        out[f"{k} us/run (min, median)"] = [round(min(vals), 1), round(statistics.median(vals), 1)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
