"""The plain-client contract on the real broker: a refused run request answers under its run ID.

A client that sends a bad request (an unknown workflow, an extra field, a key that differs from
``run_id``, bad JSON, over the size limit) sees ``run.rejected`` with the cause under the run ID it used,
read with nothing but aiokafka (``read_committed``, the ``type`` header) or with ``calmrun submit
--wait``; the dead letter stays. A duplicate run ID never changes the run that has it. ``/ready`` on the
metrics port answers 200 only once the worker's partitions are assigned and restored.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from prometheus_client import CollectorRegistry

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.check import check_history
from calmrun.client import Client
from calmrun.kafka.topics import INVALID, Topics, partition_for
from calmrun.localproc import free_port
from calmrun.streams.metrics import WorkerMetrics
from calmrun.streams.worker import Worker
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import add_one, linear, ready, running, settings_for, until

ROOT = Path(__file__).resolve().parents[2]
PLAIN_CLIENTS = ROOT / "docs" / "plain-clients.md"
CODEC = RecordCodec(wire_models())


@dataclass(frozen=True)
class Bad:
    """One refused request: the run ID it names, its bytes, and what its rejection must say."""

    run_id: str
    key: bytes | None
    value: bytes
    error_type: str
    cause: str


def bad_requests() -> list[Bad]:
    def js(body: object) -> bytes:
        return json.dumps(body).encode()

    return [
        Bad(
            "rj-unknown",
            b"rj-unknown",
            js({"workflow": "no-such-flow", "input": {"n": 1}}),
            "UnknownWorkflowError",
            "no-such-flow",
        ),
        Bad(
            "rj-extra",
            b"rj-extra",
            js({"workflow": "lin", "input": {"n": 1}, "colour": "red"}),
            "DecodeError",
            "colour",
        ),
        Bad("rj-key", b"rj-key", js({"workflow": "lin", "run_id": "rj-other"}), "DecodeError", "differ"),
        # no key: the producer picks any partition; the worker moves it to its run's, then rejects it
        Bad(
            "rj-json",
            None,
            b'{"workflow": "lin", "run_id": "rj-json", "input": {"n": ',
            "DecodeError",
            "JSON",
        ),
        Bad(
            "rj-big",
            b"rj-big",
            js({"workflow": "lin", "input": {"text": "a" * 300_000}}),
            "LimitExceededError",
            "max_request_bytes",
        ),
    ]


async def read_events(
    broker: str, topic: str, until_types: dict[str, str], wait_s: float = 60.0
) -> list[tuple[RunEvent, bytes | None]]:
    """What a plain aiokafka client reads (read_committed) until each run has its awaited event type."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: list[tuple[RunEvent, bytes | None]] = []
    try:
        end = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < end:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    assert rec.value is not None
                    seen.append((CODEC.decode_as(rec.value, RunEvent), dict(rec.headers).get("type")))
            got = {(e.run_id, e.type) for e, _ in seen}
            if all((run, typ) in got for run, typ in until_types.items()):
                return seen
    finally:
        await consumer.stop()
    raise AssertionError(f"timed out: read {[(e.run_id, e.type) for e, _ in seen]}")


async def test_each_refused_request_is_rejected_under_its_run_id_and_a_duplicate_changes_nothing(
    broker: str, prefix: str
) -> None:
    settings = settings_for(broker, prefix)
    topics = Topics(prefix)
    bad = bad_requests()
    async with (
        running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w,
        Client(settings) as client,
    ):
        await ready(w)
        [dup] = await client.submit_many([RunRequest(workflow="lin", input={"n": 1}, run_id="rj-dup")])
        before = (await client.wait_terminal([dup], wait_s=60))[dup]
        assert before.status == "completed"
        producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
        await producer.start()
        try:
            for b in bad:
                await producer.send_and_wait(topics.requests, b.value, key=b.key)
            # what a plain Kafka client reads: run.rejected under each run ID, the type in a header
            events = await read_events(broker, topics.events, {b.run_id: "run.rejected" for b in bad})
            states = await client.wait_terminal([b.run_id for b in bad], wait_s=60)  # as submit --wait
            # a bad request under a run ID that has a run; a corrected one under a rejected ID
            await producer.send_and_wait(topics.requests, bad[0].value, key=b"rj-dup")
            fixed = json.dumps({"workflow": "lin", "input": {"n": 2}}).encode()
            await producer.send_and_wait(topics.requests, fixed, key=b"rj-unknown")
        finally:
            await producer.stop()
        notes = await read_events(
            broker, topics.events, {"rj-dup": "input.ignored", "rj-unknown": "run.completed"}
        )
        since = states["rj-unknown"].created_ms + 1  # its rejection is not the corrected request's answer
        after = await client.wait_terminal([dup, "rj-unknown"], wait_s=60, since_ms=since)
        await until(lambda: w.stats.poison == len(bad) + 1, 60, "every refused request parked")
        assert w.stats.rejected == len(bad)  # the one under rj-dup is a duplicate: parked, not rejected
        parked = await client.read_dlq(INVALID)
    for b in bad:
        [(ev, type_header)] = [(e, h) for e, h in events if e.run_id == b.run_id]
        assert (ev.type, ev.seq, type_header) == ("run.rejected", -1, b"run.rejected"), b  # a note
        assert ev.data["error_type"] == b.error_type and b.cause in ev.data["error"], ev.data
        st = states[b.run_id]
        assert (st.status, st.error_type, st.seq) == ("rejected", b.error_type, 0) and b.cause in (
            st.error or ""
        )
        [letter] = [
            d for d in parked if d.run_id == b.run_id and d.reason == "poison"
        ]  # the dead letter stays
        assert letter.error_type == b.error_type
    # the duplicate: the completed run is as it was; the refusal is a note (seq -1) with its cause
    assert after[dup] == before
    [note] = [e for e, _ in notes if e.run_id == dup and e.seq < 0]
    assert note.type == "input.ignored" and "no-such-flow" in note.data["error"]
    assert [d for d in parked if d.run_id == dup]  # parked too
    # a rejection takes no run ID: the corrected request under it started the run
    assert after["rj-unknown"].status == "completed"
    assert next(e.type for e, _ in notes if e.run_id == "rj-unknown" and e.seq > 0) == "run.requested"
    report = await check_history(settings.kafka, [linear()])
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations)
    assert report.runs == len(bad) + 1 and report.replayed == 2


async def test_a_rejected_request_redriven_once_its_workflow_is_deployed_starts_its_run(
    broker: str, prefix: str
) -> None:
    """A rejection takes no run ID: ``calmrun dlq redrive -w _invalid --all`` after the fix starts the run."""
    settings = settings_for(broker, prefix)
    topics = Topics(prefix)
    agents = AgentRegistry({"add_one": add_one})
    request = json.dumps({"workflow": "later", "input": {"n": 1}}).encode()
    async with running(settings, [linear()], agents) as w, Client(settings) as client:
        await ready(w)
        producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topics.requests, request, key=b"rd-1")
        finally:
            await producer.stop()
        first = (await client.wait_terminal(["rd-1"], wait_s=60))["rd-1"]
        assert (first.status, first.error_type) == ("rejected", "UnknownWorkflowError")
    # the fix: a worker that runs `later` too; then the operator re-injects the parked request
    async with running(settings, [linear(), linear("later")], agents) as w, Client(settings) as client:
        await ready(w)
        assert await client.redrive(INVALID) == (0, 1)
        # (since_ms: the first rejection is not the answer to the re-injected request)
        state = (await client.wait_terminal(["rd-1"], wait_s=60, since_ms=first.created_ms + 1))["rd-1"]
    assert (state.status, state.workflow, state.steps["s3"].output) == (
        "completed",
        "later",
        {"n": 4, "label": "s3:1"},
    )
    report = await check_history(settings.kafka, [linear(), linear("later")])
    assert report.ok and report.replayed == 1, report.summary()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "calmrun.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CALMRUN_KAFKA__PARTITIONS": "4"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_wait_reports_the_rejection(broker: str, prefix: str, tmp_path: Path) -> None:
    settings = settings_for(broker, prefix)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"text": "a" * 300_000}))
    async with running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w:
        await ready(w)
        where = ("-b", broker, "--prefix", prefix, "--wait", "--wait-s", "90")
        code, out, err = await _cli("submit", "no-such-flow", "--run-id", "cli-unknown", *where)
        assert code == 0, err
        assert "submitted cli-unknown: rejected" in out and "no-such-flow" in out, out
        # corrected, under the same run ID: the earlier rejection is not this request's answer
        code, out, err = await _cli("submit", "lin", "-i", '{"n": 1}', "--run-id", "cli-unknown", *where)
        assert code == 0, err
        assert "submitted cli-unknown: completed" in out, out
        code, out, err = await _cli("submit", "lin", "-i", f"@{big}", "--run-id", "cli-big", "--json", *where)
        assert code == 0, err
        state = json.loads(out)["state"]
        assert (state["status"], state["error_type"]) == ("rejected", "LimitExceededError")
        assert "max_request_bytes" in state["error"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_ready_answers_503_until_the_partitions_are_restored_then_200(broker: str, prefix: str) -> None:
    port = free_port()
    settings = settings_for(broker, prefix).model_copy(
        update={"metrics": settings_for(broker, prefix).metrics.model_copy(update={"port": port})}
    )
    w = Worker(
        settings,
        [linear()],
        AgentRegistry({"add_one": add_one}),
        ModelRegistry({}),
        metrics=WorkerMetrics(CollectorRegistry()),
    )
    restore = w.restore.runs
    restoring = asyncio.Event()
    go = asyncio.Event()

    async def held_restore(parts: set[int]) -> None:  # the takeover waits here until the test lets it go
        restoring.set()
        await go.wait()
        await restore(parts)

    w.restore.runs = held_restore  # type: ignore[method-assign]
    url = f"http://127.0.0.1:{port}/ready"
    await w.start()
    try:
        code, text = await asyncio.to_thread(_get, url)
        assert code == 503, text  # started, not assigned or not restored yet
        await asyncio.wait_for(restoring.wait(), 60)
        code, text = await asyncio.to_thread(_get, url)
        assert (code, text.strip()) == (503, "taking over partitions [0, 1, 2, 3] (restoring their runs)")
        go.set()
        await ready(w)
        code, text = await asyncio.to_thread(_get, url)
        assert (code, text.strip()) == (200, "ready: partitions [0, 1, 2, 3]")
        code, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and "calmrun_runs" in text  # the metrics are served as before
    finally:
        await w.stop()


async def test_the_docs_kcat_request_lands_on_its_runs_partition_and_is_answered(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    """docs/plain-clients.md's kcat block, run by bash as written (its first line's values set here)."""
    assert shutil.which("kcat"), "kcat missing: `make tools` installs it"
    block = PLAIN_CLIENTS.read_text().split("<!-- kcat-request -->\n```sh\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    assert lines[0].startswith("B=")
    lines[0] = f"B={broker} P={prefix} RUN=kcat-run"
    script = tmp_path / "request.sh"
    script.write_text("set -e -o pipefail\n" + "\n".join(lines) + "\n")
    settings = settings_for(broker, prefix)
    topics = Topics(prefix)
    async with (
        running(settings, [linear()], AgentRegistry({"add_one": add_one})) as w,
        Client(settings) as client,
    ):
        await ready(w)
        proc = await asyncio.create_subprocess_exec("bash", str(script))
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        # the docs' request names the triage workflow, which this worker does not run: it is rejected
        state = (await client.wait_terminal(["kcat-run"], wait_s=60))["kcat-run"]
    assert (state.status, state.error_type) == ("rejected", "UnknownWorkflowError"), state
    consumer = AIOKafkaConsumer(
        topics.requests, bootstrap_servers=broker, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        end = asyncio.get_running_loop().time() + 60
        while not records and asyncio.get_running_loop().time() < end:
            records += [r for rs in (await consumer.getmany(timeout_ms=1000)).values() for r in rs]
        records += [r for rs in (await consumer.getmany(timeout_ms=1000)).values() for r in rs]
    finally:
        await consumer.stop()
    # produced with murmur2: on the run's own partition at once, never moved by the worker
    assert [(r.key, r.partition) for r in records] == [(b"kcat-run", partition_for("kcat-run", 4))]


async def test_the_cli_worker_prints_ready_after_running_and_ready_answers_200_then(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    """`calmrun worker` prints `worker running` (on uvloop) when started, `worker ready` once assigned."""
    wf = linear(agent="tests.runtime_support:add_one")
    path = tmp_path / "lin.yaml"
    path.write_text(yaml.safe_dump(wf.model_dump(mode="json", exclude_defaults=True)))
    port = free_port()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "calmrun.cli",
            "worker",
            "-w",
            str(path),
            "-b",
            broker,
            "--prefix",
            prefix,
            cwd=ROOT,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "CALMRUN_KAFKA__PARTITIONS": "4",
                "CALMRUN_METRICS__PORT": str(port),
            },
        )
    try:
        await until(lambda: "worker ready" in log.read_text(), 120, "worker ready", lambda: _alive(proc, log))
        text = log.read_text()
        assert text.index("worker running") < text.index("worker ready: partitions [0, 1, 2, 3]"), text
        assert "(deciding and executing the default pool, uvloop)" in text, text  # worker.event_loop: auto
        code, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/ready")
        assert (code, body.strip()) == (200, "ready: partitions [0, 1, 2, 3]")
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 60) == 0, log.read_text()


def _alive(proc: asyncio.subprocess.Process, log: Path) -> None:
    assert proc.returncode is None, f"the worker exited with {proc.returncode}: {log.read_text()}"
