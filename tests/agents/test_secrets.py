"""API keys reach the model server and nothing else: not events, the DLQ, state snapshots, logs or /metrics.

A run with a known fake key goes through a real worker and broker against ``FakeOpenAI`` (see
``test_model_faults``): one run succeeds, one hits a server that repeats the key in its 401 error (the
worst case for an error message). Then every record of every topic of the test's prefix (keys, values,
headers), the decoded states, events and dead letters, every captured log record and the ``/metrics`` text
are searched for the key.
"""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path
from uuid import uuid4

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.client import Client
from calmrun.localproc import free_port
from calmrun.settings import load_settings
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunRequest
from tests.agents.test_model_faults import fake_openai
from tests.runtime_support import read_raw, ready

FAKE_KEY = f"sk-test-FAKE-{uuid4().hex}"


def _workflow(name: str, alias: str) -> object:
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {
                    "name": "ask",
                    "agent": "tests.agents.test_model_faults:ask",
                    "model": alias,
                    "input": {"question": "input.question"},
                    "timeout_s": 30,
                    "retry": {"max_attempts": 2, "initial_backoff_s": 0.05},
                }
            ],
        }
    )


async def test_api_key_appears_in_no_record_log_or_metric(
    broker: str,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="aiokafka")  # its DEBUG is the Kafka protocol, nothing of ours
    async with fake_openai() as fake:
        # the key comes from the environment (alias "good") or a secrets file (alias "leaky"), never from
        # the configuration file nor the workflow
        secret_file = tmp_path / "openai.key"
        secret_file.write_text(FAKE_KEY + "\n")
        config = tmp_path / "models.yaml"
        config.write_text(
            "models:\n"
            f"  leaky: {{model: 'openai:echo401-1', base_url: '{fake.base_url}', output_mode: prompted,\n"
            f"          api_key: 'file:{secret_file}'}}\n"
        )
        monkeypatch.setenv("CALMRUN_MODELS__GOOD__MODEL", "openai:ok-1")
        monkeypatch.setenv("CALMRUN_MODELS__GOOD__BASE_URL", fake.base_url)
        monkeypatch.setenv("CALMRUN_MODELS__GOOD__OUTPUT_MODE", "prompted")
        monkeypatch.setenv("CALMRUN_MODELS__GOOD__API_KEY", FAKE_KEY)
        metrics_port = free_port()
        settings = load_settings(
            config,
            kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
            worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
            metrics={"port": metrics_port},
        )
        models = ModelRegistry(settings.models)
        workflows = [_workflow("sec_ok", "good"), _workflow("sec_leak", "leaky")]
        metrics = _worker_metrics()
        kw = {"metrics": metrics} if metrics is not None else {}
        worker = Worker(settings, workflows, AgentRegistry(), models, **kw)  # type: ignore[arg-type]
        await worker.start()
        try:
            await ready(worker)
            async with Client(settings) as client:
                ok, leak = f"ok-{uuid4().hex[:6]}", f"leak-{uuid4().hex[:6]}"
                await client.submit(RunRequest(workflow="sec_ok", run_id=ok, input={"question": "q"}))
                await client.submit(RunRequest(workflow="sec_leak", run_id=leak, input={"question": "q"}))
                states = await client.wait_terminal([ok, leak], wait_s=60)
                decoded = [
                    *(s.model_dump_json() for s in (await client.read_states()).values()),
                    *(e.model_dump_json() for e in await client.events()),
                    *(repr(d.model_dump()) for d in await client.read_dlq("sec_leak")),
                ]
            metrics_text = _scrape(metrics_port) if metrics is not None else ""
        finally:
            await worker.stop()

    # the key did go where it belongs: to the server, as a bearer token
    sent = [
        r["body"].get("model")
        for r in fake.requests
        if r["headers"].get("authorization") == f"Bearer {FAKE_KEY}"
    ]
    assert "ok-1" in sent and "echo401-1" in sent
    assert states[ok].status == "completed"
    assert states[leak].status == "quarantined" and "401" in (states[leak].error or "")

    needle = FAKE_KEY.encode()
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(f"{prefix}.")]
    finally:
        await admin.close()
    assert len(topics) >= 5
    for topic in topics:
        for rec in await read_raw(broker, topic):
            blobs = [rec.key or b"", rec.value or b"", *(v for _, v in rec.headers or ())]
            assert not any(needle in b for b in blobs), f"the key is in a record of {topic}"
    for text in decoded:
        assert FAKE_KEY not in text
    assert caplog.records, "nothing was logged: the log check would prove nothing"
    for record in caplog.records:
        assert FAKE_KEY not in record.getMessage(), f"the key is in a log record of {record.name}"
        assert FAKE_KEY not in logging.Formatter().format(record)
    assert FAKE_KEY not in caplog.text
    if metrics is not None:
        assert "calmrun" in metrics_text
        assert FAKE_KEY not in metrics_text
    assert FAKE_KEY not in repr(models) and all(FAKE_KEY not in models.describe(a) for a in models.aliases)


def _worker_metrics() -> object | None:
    try:
        from prometheus_client import CollectorRegistry

        from calmrun.streams.metrics import WorkerMetrics
    except ImportError:  # the metrics layer is not there: /metrics is then not part of the check
        return None
    return WorkerMetrics(CollectorRegistry())


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())
