"""Failure isolation end to end: every kind of poison record, mixed with 1,000 valid runs, stops nothing.

The worker is its own OS process (``tests.worker_proc``); the records come from a plain gzip producer, as
any client would send them. The worker must keep its PID, complete every valid run, and park every poison
record in a dead-letter topic with a readable cause; ``calmrun dlq tail --json`` (the real CLI) must read
them all back as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from calmrun.check import check_history
from calmrun.client import Client
from calmrun.kafka.topics import INVALID, Topics
from calmrun.wire.avro import MARKER
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import WorkerProcs, linear, settings_for, until

ROOT = Path(__file__).resolve().parents[2]
CODEC = RecordCodec(wire_models())
MB2 = 2 * 1024 * 1024
LIMIT = "LimitExceededError"


@dataclass(frozen=True)
class Poison:
    """One poison record: where it goes, what it holds, and what its dead letter must say."""

    name: str
    value: bytes | None
    key: bytes | None = b"poison"
    headers: tuple[tuple[str, bytes | None], ...] = ()
    error_type: str = "DecodeError"
    cause: str = ""  # a piece of the dead letter's error text
    topic: str = "requests"  # or "step": the step topic of lin.s1
    header_name: bytes | None = None  # produced by kcat with this (non-UTF-8) header name


def _avro_request(input_json: str) -> bytes:
    """An Avro RunRequest as any Avro client would write it, its input a JSON string of our choosing."""
    raw = {"workflow": "lin", "input": input_json, "run_id": None, "tenant": "default", "budget_usd": None}
    return CODEC.avro.encode("io.calmrun.RunRequest", raw)


def poison_records() -> list[Poison]:
    deep_obj = '{"a":' * 10_000 + "1" + "}" * 10_000
    deep_arr = "[" * 10_000 + "]" * 10_000
    req = '{{"workflow":"lin","input":{}}}'.format
    event = RunEvent(run_id="x", seq=1, type="run.requested", at_ms=1, workflow="lin")
    return [
        # the first table: each of these stopped the worker before
        Poison(
            "deep JSON object", deep_obj.encode(), error_type="LimitExceededError", cause="max_json_depth"
        ),
        Poison("deep JSON array", deep_arr.encode(), error_type="LimitExceededError", cause="max_json_depth"),
        Poison(
            "deep JSON inside Avro",
            _avro_request('{"x":' + deep_arr + "}"),
            error_type="LimitExceededError",
            cause="max_json_depth",
        ),
        Poison(
            "deep JSON inside Avro, under the ceiling",
            _avro_request('{"x":' + "[" * 150 + "]" * 150 + "}"),
            error_type="LimitExceededError",
            cause="max_json_depth",
        ),
        Poison(
            "5,000-digit integer",
            req('{"n":' + "9" * 5000 + "}").encode(),
            error_type="LimitExceededError",
            cause="max_number_digits",
        ),
        Poison(
            "2 MB JSON",
            req('{"text":"' + "a" * MB2 + '"}').encode(),
            error_type="LimitExceededError",
            cause="max_request_bytes",
        ),
        Poison("2 MB not JSON", b"\xff" * MB2, error_type="LimitExceededError", cause="max_request_bytes"),
        # the second table: handled before, kept so
        Poison("random bytes", b"\xff\x00garbage" + bytes(range(256)), cause="not UTF-8"),
        Poison("non-object input", b"[1, 2, 3]", cause="JSON object"),
        Poison("input not an object", req("[1]").encode(), cause="input"),
        Poison("wrong types", json.dumps({"workflow": 5}).encode(), cause="workflow"),
        Poison(
            "unknown workflow",
            json.dumps({"workflow": "no-such-flow"}).encode(),
            error_type="UnknownWorkflowError",
            cause="no-such-flow",
        ),
        Poison(
            "bad UTF-8 in a header",
            b"{not json",
            headers=(("trace", b"\xff\xfe\x00"), ("ok", b"fine")),
            cause="JSON",
        ),
        Poison("empty value", b"", cause="JSON"),
        Poison("null value", None, key=b"tombstone", cause="tombstone"),
        # a leading zero byte is Confluent framing (wire.format): read as such, and refused without a registry
        Poison("null key", b"\x00\x01 keyless garbage", key=None, cause="Confluent-framed"),
        Poison("non-UTF-8 key", req('{"n":1}').encode(), key=b"\xff\xfe", cause="key is not UTF-8"),
        Poison(
            "Avro marker, unknown fingerprint",
            MARKER + bytes(8) + b"avro-looking garbage",
            error_type="UnknownSchemaError",
            cause="fingerprint",
        ),
        # the fuzzer's worst finds, and the rest of the record's parts
        Poison("lone surrogate", req('{"s":"\\ud800"}').encode(), cause="surrogate"),
        Poison("NaN", req('{"n":NaN}').encode(), cause="NaN"),
        Poison("float overflow", req('{"n":1e999}').encode(), cause="64-bit float"),
        Poison("UTF-8 BOM", b"\xef\xbb\xbf" + req("{}").encode(), cause="BOM"),
        Poison("UTF-16 JSON", req("{}").encode("utf-16"), cause="UTF-8"),
        Poison("NaN budget", b'{"workflow":"lin","budget_usd":"NaN"}', cause="budget_usd"),
        Poison(
            "null header value",
            b"{not json",
            headers=(("empty", None),),
            cause="JSON",
        ),
        Poison(
            "300 KB header",
            req("{}").encode(),
            headers=(("big", b"h" * 300_000),),
            error_type="LimitExceededError",
            cause="max_request_bytes",
        ),
        Poison("2 MB key", req("{}").encode(), key=b"k" * MB2, error_type="LimitExceededError"),
        Poison("garbage task", b"\xff\x00 not a task", topic="step", cause="Avro"),
        # aiokafka itself cannot parse these (it decodes header names): parked without bytes
        Poison("non-UTF-8 header name", b"{}", key=b"hdr-1", header_name=b"\xff\xfe", cause="cannot parse"),
        Poison(
            "non-UTF-8 header name, again", b"{}", key=b"hdr-2", header_name=b"\xc3", cause="cannot parse"
        ),
        Poison("an event on a step topic", CODEC.encode(event), topic="step", cause="expected StepTask"),
    ]


def _kcat_produce(broker: str, topic: str, p: Poison) -> None:
    kcat = shutil.which("kcat")
    assert kcat is not None, "the kcat CLI is not installed (Debian package 'kcat'); this test needs it"
    assert p.key is not None and p.value is not None and p.header_name is not None
    subprocess.run(
        [
            kcat.encode(),
            b"-P",
            b"-b",
            broker.encode(),
            b"-t",
            topic.encode(),
            b"-k",
            p.key,
            b"-H",
            p.header_name + b"=v",
        ],
        input=p.value + b"\n",
        check=True,
        timeout=60,
    )


def _kcat_find(broker: str, topic: str, p: Poison) -> tuple[str, int, int]:
    """Where kcat wrote ``p`` (aiokafka cannot read it back, which is the point)."""
    kcat = shutil.which("kcat")
    assert kcat is not None
    out = subprocess.run(
        [kcat, "-C", "-b", broker, "-t", topic, "-e", "-q", "-f", "%k %p %o\n"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    [(part, off)] = [
        (int(f[1]), int(f[2])) for f in (line.split() for line in out.splitlines()) if f[0] == p.key
    ]
    return topic, part, off


def _cli(broker: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calmrun.cli", *args, "--bootstrap", broker, "--prefix", prefix],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.fault
async def test_every_poison_record_is_parked_and_1000_valid_runs_complete(
    broker: str, prefix: str, procs: WorkerProcs
) -> None:
    settings = settings_for(broker, prefix)
    topics = Topics(prefix)
    procs.start("w", "--max-in-flight", "100")
    await until(
        lambda: procs.status("w").get("owned") == [0, 1, 2, 3], 90, "the worker to be ready", procs.watch("w")
    )
    pid = procs.status("w")["pid"]
    assert pid == procs.procs["w"].pid

    poison = poison_records()
    valid = [RunRequest(workflow="lin", input={"n": i}, run_id=f"ok{i}") for i in range(1000)]
    # gzip, and a client limit above the 2 MB records (the broker checks the compressed batch)
    producer = AIOKafkaProducer(
        bootstrap_servers=broker, acks="all", compression_type="gzip", max_request_size=8 * MB2, linger_ms=5
    )
    await producer.start()
    sources: dict[tuple[str, int, int], Poison] = {}
    try:
        futures = []
        every = len(valid) // len(poison)
        for i, req in enumerate(valid):
            if i % every == 0 and i // every < len(poison):
                p = poison[i // every]
                topic = topics.requests if p.topic == "requests" else topics.step("lin", "s1")
                if p.header_name is not None:
                    _kcat_produce(broker, topic, p)
                else:
                    md = await producer.send_and_wait(topic, p.value, key=p.key, headers=list(p.headers))
                    sources[(md.topic, md.partition, md.offset)] = p
            headers = [("trace", b"\xff\xfe")] if i % 100 == 7 else []  # bad UTF-8 on valid ones too
            futures.append(
                await producer.send(
                    topics.requests, CODEC.encode(req), key=(req.run_id or "").encode(), headers=headers
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    for p in poison:
        if p.header_name is not None:
            sources[_kcat_find(broker, topics.requests, p)] = p
    assert len(sources) == len(poison)

    async with Client(settings) as client:
        waiting = asyncio.create_task(client.wait_terminal([r.run_id or "" for r in valid], wait_s=240))
        while not waiting.done():  # fail at once if the worker dies, with its log
            try:
                procs.alive("w")
            except AssertionError:
                waiting.cancel()
                raise
            await asyncio.wait([waiting], timeout=0.5)
        states = waiting.result()
        procs.alive("w")
        await until(
            lambda: procs.status("w")["stats"]["poison"] >= len(poison),
            60,
            "every poison parked",
            procs.watch("w"),
        )
        # the worker counts a completion once its transaction committed; its status file follows within 0.1 s
        await until(
            lambda: procs.status("w")["stats"]["completed"] >= len(valid),
            10,
            "the worker's count of completed runs",
            procs.watch("w"),
        )
        parked = [*(await client.read_dlq(INVALID)), *(await client.read_dlq("lin"))]
    for req in valid:
        s = states[req.run_id or ""]
        assert s.status == "completed", s
        assert s.steps["s3"].output == {"n": req.input["n"] + 3, "label": "s3:1"}

    # the same process all along, and it parked exactly the poison
    status = procs.status("w")
    procs.alive("w")
    assert status["pid"] == pid == procs.procs["w"].pid
    assert status["stats"]["poison"] == len(poison), status["stats"]
    assert status["stats"]["completed"] == len(valid)

    by_source = {(d.source_topic, d.source_partition, d.source_offset): d for d in parked}
    assert set(by_source) == set(sources), {p.name for s, p in sources.items() if s not in by_source}
    for src, p in sources.items():
        d = by_source[src]
        assert (d.reason, d.error_type) == ("poison", p.error_type), (p.name, d.error)
        assert p.cause in d.error, (p.name, d.error)
        assert d.traceback
        if p.header_name is not None:  # the client could not parse it: only where it is
            assert (d.key, d.value, d.headers, d.truncated) == (None, None, {}, [])
        elif p.value is not None and len(p.value) > settings.limits.dlq_max_payload_bytes:
            [cut] = [c for c in d.truncated if c.field == "value"]
            assert (cut.size, cut.sha256) == (len(p.value), hashlib.sha256(p.value).hexdigest()), p.name
            assert d.value == p.value[: cut.kept]
        elif p.key is not None and len(p.key) > 1024:
            assert [c.field for c in d.truncated] == ["key"], p.name
            assert d.value == p.value
        elif p.name == "300 KB header":
            assert [c.field for c in d.truncated] == ["headers.big"]
        else:
            assert d.truncated == [], p.name
            assert d.value == p.value
            assert d.key == p.key
            assert d.headers == {k: v or b"" for k, v in p.headers}

    # the real CLI reads every dead letter back, as JSON and as a table
    tail = _cli(broker, prefix, "dlq", "tail", "--json", "-w", INVALID)
    assert tail.returncode == 0, tail.stderr
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert len(lines) == sum(1 for d in parked if d.workflow is None)
    listed = {(e["source_topic"], e["source_partition"], e["source_offset"]): e for e in lines}
    assert set(listed) == {s for s, d in by_source.items() if d.workflow is None}
    assert set(listed) == set(sources)  # no poison here names a workflow this worker runs
    for src, p in sources.items():
        e = listed[src]
        assert e["error"] and e["error_type"] == p.error_type
        if p.value is None or p.header_name is not None:
            assert e["value"] is None
        elif e["value"]["encoding"] == "utf-8":
            assert p.value.startswith(e["value"]["data"].encode())
        else:
            assert p.value.startswith(base64.b64decode(e["value"]["data"]))
    task = listed[next(s for s, p in sources.items() if p.name == "an event on a step topic")]
    assert task["value"]["avro"]["schema"] == "RunEvent"
    assert task["value"]["avro"]["record"]["run_id"] == "x"
    table = _cli(broker, prefix, "dlq", "tail", "-w", INVALID)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count(" poison ") >= len(poison)
    assert "b'\\xff\\x00garbage" in table.stdout

    procs.alive("w")
    assert procs.terminate("w") == 0
    assert procs.status("w")["state"] == "stopped"

    # one history per run, the 1,000 valid ones re-decided against their definition
    report = await check_history(settings.kafka, [linear()])
    assert report.ok, report.summary() + "\n" + "\n".join(str(v) for v in report.violations[:10])
    # the keyed poison requests ("poison", "tombstone") ended as run.rejected: nothing to re-decide
    # (the others name no run: no key and no run_id, a key not UTF-8 or too long, or unreadable to aiokafka)
    assert report.replayed == len(valid) and report.runs == len(valid) + 2, report.summary()
