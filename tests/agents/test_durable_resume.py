"""A worker killed with -9 in the middle of a multi-tool agent: the attempt resumes from its journal.

The model is ``ScriptedModelServer`` (HTTP, in the test process, so it outlives the worker and counts
every request); the worker is its own OS process; the broker is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import uuid4

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.kafka.topics import ensure_topics
from calmrun.streams.journal import KafkaJournal, by_attempt
from calmrun.workflow.events import RunRequest
from tests.agents.durable_support import (
    HOLD_AT,
    ScriptedModelServer,
    charges_script,
    durable_settings,
    pay_flow,
)

ROOT = Path(__file__).resolve().parents[2]
CALLS = 6


def _start(
    broker: str, prefix: str, base_url: str, tmp: Path, env: dict[str, str], *args: str
) -> subprocess.Popen[bytes]:
    log = open(tmp / "worker.log", "ab")  # noqa: SIM115 - the child holds it; closed with the test's tmp dir
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.agents.durable_support",
            "--bootstrap",
            broker,
            "--prefix",
            prefix,
            "--base-url",
            base_url,
            "--status-file",
            str(tmp / "w.json"),
            *args,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


async def _until(check: object, wait_s: float, what: str, proc: subprocess.Popen[bytes], tmp: Path) -> None:
    deadline = time.monotonic() + wait_s
    while not check():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(f"worker exited: {(tmp / 'worker.log').read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_kill9_mid_agent_resumes_without_repeating_a_model_request_or_a_tool(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    hold, charges = tmp_path / "hold", tmp_path / "charges"
    hold.write_text("")
    env = {"DURABLE_HOLD": str(hold), "DURABLE_CHARGES": str(charges)}
    run_id = f"pay-{uuid4().hex[:8]}"
    with ScriptedModelServer(charges_script(CALLS)) as server:
        settings = durable_settings(broker, prefix, server.base_url)
        await ensure_topics(settings.kafka, [pay_flow()])
        first = _start(broker, prefix, server.base_url, tmp_path, env)
        second: subprocess.Popen[bytes] | None = None
        try:
            async with Client(settings) as client:
                await client.submit(RunRequest(workflow="pay", run_id=run_id, input={"orders": CALLS}))
                await _until(
                    lambda: hold.read_text().startswith("holding"), 120, "tool call 3", first, tmp_path
                )
                sent_before_kill = len(server.requests)
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=30)
                hold.unlink()
                second = _start(broker, prefix, server.base_url, tmp_path, env)
                states = await client.wait_terminal([run_id], wait_s=180)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)

    assert states[run_id].status == "completed", states[run_id]
    assert states[run_id].steps["pay"].attempt == 1  # the same attempt resumed, no retry
    # the model server saw each request once: the 4 made before the kill were answered from the journal
    assert sent_before_kill == HOLD_AT + 1
    digests = server.digests()
    assert len(digests) == CALLS + 1 and len(set(digests)) == len(digests)
    # each side effect ran once: the held call 3 never finished before the kill, so it ran once, after it
    assert Counter(charges.read_text().split()) == {str(i): 1 for i in range(CALLS)}
    report = await check_history(settings.kafka, [pay_flow()])
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations[:10])
    # the journal: one chain of model requests and tool calls, written by two incarnations
    journal = KafkaJournal(settings)
    try:
        records = await journal.records(run_id)
    finally:
        await journal.close()
    (chain,) = by_attempt(records).values()
    assert [e.call.op for e in chain] == ["model", "tool"] * CALLS + ["model"]
    assert len({e.incarnation for e in chain}) == 2
    assert sum(1 for r in records if r.type == "entry" and r.claim is not None) == 2


LONG_CALLS, KILL_AT, OUTPUT_BYTES, BIG_AT, BIG_BYTES = 100, 60, 6_000, 30, 120_000
RECORD_LIMIT = 65_536  # the journal's record limit in this test (by default: under kafka.max_request_size)


async def test_a_100_call_agent_with_long_outputs_stays_under_the_record_limit_and_resumes_at_call_60(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    hold, charges = tmp_path / "hold", tmp_path / "charges"
    hold.write_text("")
    env = {
        "DURABLE_HOLD": str(hold),
        "DURABLE_HOLD_AT": str(KILL_AT),
        "DURABLE_CHARGES": str(charges),
        "DURABLE_OUTPUT_BYTES": str(OUTPUT_BYTES),
        "DURABLE_BIG_AT": str(BIG_AT),
        "DURABLE_BIG_BYTES": str(BIG_BYTES),
    }
    size = ("--journal-limit", str(RECORD_LIMIT), "--agent", "long_payer")
    run_id = f"long-{uuid4().hex[:8]}"
    with ScriptedModelServer(charges_script(LONG_CALLS)) as server:
        settings = durable_settings(broker, prefix, server.base_url)
        await ensure_topics(settings.kafka, [pay_flow(agent="long_payer")])
        first = _start(broker, prefix, server.base_url, tmp_path, env, *size)
        second: subprocess.Popen[bytes] | None = None
        try:
            async with Client(settings) as client:
                await client.submit(RunRequest(workflow="pay", run_id=run_id, input={"orders": LONG_CALLS}))
                await _until(
                    lambda: hold.read_text().startswith("holding"), 240, "tool call 60", first, tmp_path
                )
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=30)
                hold.unlink()
                second = _start(broker, prefix, server.base_url, tmp_path, env, *size)
                states = await client.wait_terminal([run_id], wait_s=300)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
        request_bytes = sum(len(json.dumps(b)) for b in server.requests)

    assert states[run_id].status == "completed", states[run_id]
    digests = server.digests()
    assert len(digests) == LONG_CALLS + 1 and len(set(digests)) == len(digests)
    assert Counter(charges.read_text().split()) == {str(i): 1 for i in range(LONG_CALLS)}
    journal = KafkaJournal(settings)
    try:
        raw = await _raw_sizes(settings, run_id)
        records = await journal.records(run_id)
    finally:
        await journal.close()
    (chain,) = by_attempt(records).values()
    assert len(chain) == 2 * LONG_CALLS + 1
    assert max(raw) <= RECORD_LIMIT  # every record fits; the large tool output went in parts
    assert sum(1 for r in records if r.type == "part") >= 2
    # entries hold what is new: the journal grows with the outputs, the requests with the whole history
    outputs = (LONG_CALLS - 1) * OUTPUT_BYTES + BIG_BYTES
    assert sum(raw) < 3 * outputs < request_bytes / 10


async def _raw_sizes(settings: Any, run_id: str) -> list[int]:
    """The byte size of every journal record of ``run_id`` as stored (key and value)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from calmrun.kafka.topics import Topics, partition_for

    tp = TopicPartition(
        Topics(settings.kafka.prefix).journal, partition_for(run_id, settings.kafka.partitions)
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
        sizes: list[int] = []
        while await consumer.position(tp) < end:
            for rec in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if rec.key == run_id.encode() and rec.value is not None:
                    sizes.append(len(rec.value) + len(rec.key))
        return sizes
    finally:
        await consumer.stop()
