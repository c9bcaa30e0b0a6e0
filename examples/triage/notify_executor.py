"""The triage workflow's ``notify`` step, served by a plain Kafka consumer that imports nothing of calmrun.

The step contract (README, "The step contract"): a task record on ``<prefix>.step.triage.notify`` (Avro
single-object bytes of ``schemas/step_task.avsc``, keyed by run ID, with the attempt's idempotency key in
the ``calmrun-idempotency-key`` header), answered by a result record on ``<prefix>.runs.results`` (JSON
here; ``schemas/step_result_record.avsc`` is the Avro form), keyed by run ID. At least once is enough:
a second result for an attempt is ignored by the decider, so this script commits its offsets after it
has sent the results.

    python examples/triage/notify_executor.py --bootstrap localhost:9092 --prefix calmrun

Give the step ``pool: notify`` in the workflow; this script then is that pool's executor.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import fastavro
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
MARKER = b"\xc3\x01"  # Avro single-object encoding: C3 01, 8-byte fingerprint, body


def read_task(value: bytes, schema: Any) -> dict[str, Any]:
    """A task record's fields; its ``input`` is a JSON text."""
    if value[:2] != MARKER:
        raise ValueError("not Avro single-object bytes")
    task = fastavro.schemaless_reader(io.BytesIO(value[10:]), schema)
    assert isinstance(task, dict)
    task["input"] = json.loads(task["input"])
    return task


def notify(inp: dict[str, Any]) -> dict[str, Any]:
    """What examples.triage.agents:notify does: tell the customer the refund is on its way."""
    who = inp.get("customer") or "there"
    text = (
        f"Hi {who}, we refunded {inp['amount']} (reference {inp['refund_id']}) for ticket {inp['ticket_id']}."
    )
    return {"message_id": f"msg-{inp['refund_id']}", "text": text}


def answer(task: dict[str, Any], started: float) -> dict[str, Any]:
    """The result record for one task: the output, or an error that says whether a retry may help."""
    result: dict[str, Any] = {
        "run_id": task["run_id"],
        "workflow": task["workflow"],
        "version": task["version"],
        "step": task["step"],
        "attempt": task["attempt"],
        "kind": task["kind"],
        "pool": "notify",
    }
    try:
        result["output"] = notify(task["input"])
    except KeyError as exc:
        result.update(error_type="InvalidInputError", error=f"missing {exc}", retriable=False)
    latency_ms = (time.monotonic() - started) * 1000
    result["cost"] = {"latency_ms": latency_ms, "api_calls": 1, "agent": "notify_executor.py"}
    return result


async def main(bootstrap: str, prefix: str) -> None:
    schema = fastavro.parse_schema(json.loads((SCHEMAS / "step_task.avsc").read_text()))
    consumer = AIOKafkaConsumer(
        f"{prefix}.step.triage.notify",
        bootstrap_servers=bootstrap,
        group_id=f"{prefix}.pool.notify",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # only tasks of committed decisions
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"notify executor on {bootstrap}, prefix {prefix}", flush=True)
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=100)
            sent = []
            for records in batches.values():
                for rec in records:
                    started = time.monotonic()
                    try:
                        task = read_task(rec.value or b"", schema)
                    except (ValueError, EOFError) as exc:  # not a task: skip it, say so
                        print(f"skipped {rec.topic}[{rec.partition}]@{rec.offset}: {exc}", flush=True)
                        continue
                    result = json.dumps(answer(task, started)).encode()
                    sent.append(await producer.send(f"{prefix}.runs.results", result, key=rec.key))
            if sent:
                await asyncio.gather(*sent)  # every result is acknowledged before the offsets move
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--bootstrap", default="localhost:9092")
    parser.add_argument("--prefix", default="calmrun")
    args = parser.parse_args()
    asyncio.run(main(args.bootstrap, args.prefix))
