"""Timestamps inside a bench worker for ``bench.timeline``: loaded with ``python -m bench.worker --preload``.

Wraps, in the worker process only, the points a run passes: the intake's fetch, each decision, each step
attempt, each partition transaction and every request its producer sends (answered when). Each mark is
(monotonic ns, what, run IDs, detail); the marks are written as JSON lines to ``$CALMRUN_TIMELINE`` when
the worker exits. ``time.monotonic_ns`` is the system's CLOCK_MONOTONIC, the same in the client's process.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiokafka.client

from calmrun.streams import deciding, intake, local, txn
from calmrun.workflow.events import StepResult

Mark = tuple[int, str, list[str], str]
MARKS: list[Mark] = []
_BATCH: dict[str, list[str]] = {}  # a lane's client id -> run IDs of the transaction it is writing


def mark(what: str, run_ids: list[str], detail: str = "") -> None:
    MARKS.append((time.monotonic_ns(), what, run_ids, detail))


def _dump() -> None:
    path = os.environ.get("CALMRUN_TIMELINE")
    if path:
        with open(path, "w") as f:
            for m in MARKS:
                f.write(json.dumps(m) + "\n")


def _client_id(producer: Any) -> str:
    return str(producer.client._client_id)  # aiokafka 0.14's


def install() -> None:
    """Wrap the points a run passes (see the module docstring); idempotent enough for one process."""
    getmany = intake.getmany

    async def fetched(consumer: Any, **kw: Any) -> Any:
        out = await getmany(consumer, **kw)
        for tp, records in out.records.items():
            for rec in records:
                kind = "request" if tp.topic.endswith(".requests") else tp.topic.rsplit(".", 1)[-1]
                mark("fetched", [(rec.key or b"").decode()], kind)
        return out

    intake.getmany = fetched  # type: ignore[assignment]

    decide = deciding.Deciding.decide

    @functools.wraps(decide)
    def decided(self: Any, p: int, wf: Any, state: Any, inp: Any, *a: Any, **k: Any) -> Any:
        out = decide(self, p, wf, state, inp, *a, **k)
        what = f"{inp.step} result" if isinstance(inp, StepResult) else type(inp).__name__
        mark("decided", [inp.run_id], what)
        return out

    deciding.Deciding.decide = decided  # type: ignore[method-assign]

    execute = local.LocalExecutor.execute

    async def executed(self: Any, task: Any) -> Any:
        mark("step start", [task.run_id], task.step)
        try:
            return await execute(self, task)
        finally:
            mark("step end", [task.run_id], task.step)

    local.LocalExecutor.execute = executed  # type: ignore[method-assign]

    send_txn = txn.TxnWriter._send

    async def begun(self: Any, lane: int, batch: list[Any], offsets: Any) -> Any:
        ids = [d.run_id for d in batch if d.run_id is not None]
        _BATCH[_client_id(self._lanes[lane])] = ids
        mark("txn begin", ids, f"{lane} offsets {len(offsets)} decisions {len(batch)}")
        out = await send_txn(self, lane, batch, offsets)
        mark("txn sent", ids, str(lane))
        return out

    txn.TxnWriter._send = begun  # type: ignore[method-assign]

    end = txn.TxnWriter._end

    async def committed(self: Any, lane: int, batch: list[Any], offsets: Any, futures: Any) -> None:
        ids = [d.run_id for d in batch if d.run_id is not None]
        await end(self, lane, batch, offsets, futures)
        mark("txn committed", ids, str(lane))

    txn.TxnWriter._end = committed  # type: ignore[method-assign]

    wait_held = txn.TxnWriter._wait_held

    async def held(self: Any) -> None:
        ids = [d.run_id for d in self._batch if d.run_id is not None]
        if self._held:
            mark("inline wait", ids, f"{len(self._held)} tasks")
        await wait_held(self)
        if ids:
            mark("inline wait over", ids, "")

    txn.TxnWriter._wait_held = held  # type: ignore[method-assign]

    send: Callable[..., Awaitable[Any]] = aiokafka.client.AIOKafkaClient.send

    async def sent(self: Any, node_id: Any, request: Any, *a: Any, **k: Any) -> Any:
        if "-tx-" not in str(self._client_id):  # not a writer's producer (streams.clients.txn_producer)
            return await send(self, node_id, request, *a, **k)
        ids = list(_BATCH.get(str(self._client_id), []))
        name = re.sub(r"(Request)?(_v\d+)?$", "", type(request).__name__)
        mark("req sent", ids, name)
        resp = await send(self, node_id, request, *a, **k)
        busy = "busy" if re.search(r"\b51\b", str(getattr(resp, "errors", ""))) else ""
        mark("req answered", ids, f"{name} {busy}".strip())
        return resp

    aiokafka.client.AIOKafkaClient.send = sent  # type: ignore[method-assign]
    atexit.register(_dump)


install()
