"""A model's faults stay with its step: retried by policy, escalated along the step's ladder, quarantined.

The faults a real server cannot be made to produce on demand come from ``FakeOpenAI``, a small HTTP server
of the tests speaking the OpenAI chat-completions API; the model name of a request picks its behaviour. A
refused connection is a port nothing listens on. Workers, broker and pydantic-ai are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import pytest
from pydantic import BaseModel, Field
from pydantic_ai import Agent

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.agents.models import retry_after_ms
from calmrun.client import Client
from calmrun.localproc import free_port
from calmrun.settings import ModelAlias
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import ready, running, settings_for

RETRY_AFTER_S = 1
USAGE = {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}


class Answer(BaseModel):
    answer: str = Field(min_length=1)
    confidence: float = Field(ge=0, le=1)


ask = Agent(output_type=Answer, name="ask", instructions="Answer the question given as JSON.")


class FakeOpenAI:
    """An OpenAI-compatible HTTP server on 127.0.0.1; the requested model name picks what it does.

    ``ok-*`` answers valid JSON for ``Answer``, ``invalid-*`` answers JSON that fails it, ``e500-*`` and
    ``e429-*`` answer those statuses (429 with ``Retry-After``), ``once429-*`` answers its first request 429
    with ``Retry-After: 2`` and then as ``ok-*``, ``hang-*`` never answers, ``echo401-*``
    answers 401 with the request's ``Authorization`` header in its message. Every request is
    kept (``requests``, with its headers and monotonic arrival time ``t``) so a test can see what reached
    the server.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.hits: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aenter__(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        payload = json.loads(body) if body else {}
        self.requests.append(
            {"method": method, "path": path, "headers": headers, "body": payload, "t": time.monotonic()}
        )
        if method == "GET" and path.endswith("/models"):
            names = sorted(self.hits) or ["ok"]
            await _reply(
                writer, 200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}
            )
            return
        model = str(payload.get("model", ""))
        self.hits[model] += 1
        kind = model.split("-", 1)[0]
        if kind == "hang":
            await reader.read(1)  # returns when the client gives up and closes the connection
            return
        if kind == "e500":
            await _reply(writer, 500, {"error": {"message": "boom", "type": "server_error"}})
            return
        if kind == "echo401":  # a careless server that repeats the credentials it was sent
            error = {"error": {"message": f"bad key: {headers.get('authorization')}", "type": "auth"}}
            await _reply(writer, 401, error)
            return
        if kind == "e429":
            error = {"error": {"message": "slow down", "type": "rate_limit"}}
            await _reply(writer, 429, error, {"Retry-After": str(RETRY_AFTER_S)})
            return
        if kind == "once429" and self.hits[model] == 1:
            error = {"error": {"message": "slow down", "type": "rate_limit"}}
            await _reply(writer, 429, error, {"Retry-After": "2"})
            return
        good = kind in ("ok", "once429")
        content = {"answer": "42", "confidence": 0.9} if good else {"answer": "", "confidence": 7}
        await _reply(writer, 200, _completion(model, json.dumps(content)))


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid4().hex[:8]}",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }


async def _reply(
    writer: asyncio.StreamWriter, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(
        f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
        f"connection: close\r\n{extra}\r\n".encode()
        + data
    )
    await writer.drain()


@contextlib.asynccontextmanager
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


FAULTS = ("refused", "e500", "e429", "hang", "invalid")


def _alias(fault: str, base_url: str, refused_url: str) -> ModelAlias:
    url = refused_url if fault == "refused" else base_url
    return ModelAlias(model=f"openai:{fault}-1", base_url=url, output_mode="prompted", temperature=0)


def _workflow(name: str, ladder: list[str]) -> WorkflowDef:
    # the per-attempt timeout cuts a hung request; elsewhere it is generous: a busy machine never trips it
    timeout_s = 3.0 if "hang" in ladder else 30.0
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {
                    "name": "ask",
                    "agent": "tests.agents.test_model_faults:ask",
                    "models": ladder,
                    "input": {"question": "input.question"},
                    "timeout_s": timeout_s,
                    "retry": {"max_attempts": 2, "initial_backoff_s": 0.05, "max_backoff_s": 0.2},
                }
            ],
        }
    )


def _of(events: list[RunEvent], run_id: str, type_: str) -> list[RunEvent]:
    return [e for e in events if e.run_id == run_id and e.type == type_ and e.seq >= 0]


async def test_each_fault_is_retried_escalated_or_quarantined_and_others_carry_on(
    broker: str, prefix: str
) -> None:
    async with fake_openai() as fake:
        refused = f"http://127.0.0.1:{free_port()}/v1"
        aliases = {f: _alias(f, fake.base_url, refused) for f in FAULTS}
        aliases["good"] = ModelAlias(model="openai:ok-1", base_url=fake.base_url, output_mode="prompted")
        models = ModelRegistry(aliases)
        # per fault: one workflow escalating to a good model, one with that model alone
        workflows = [_workflow(f"esc_{f}", [f, "good"]) for f in FAULTS]
        workflows += [_workflow(f"only_{f}", [f]) for f in FAULTS]
        workflows.append(_workflow("fine", ["good"]))
        settings = settings_for(broker, prefix)
        runs = {wf.name: f"{wf.name}-{uuid4().hex[:6]}" for wf in workflows}
        async with (
            running(settings, workflows, AgentRegistry(), models) as worker,
            Client(settings) as client,
        ):
            await ready(worker)
            for wf_name, run_id in runs.items():
                await client.submit(RunRequest(workflow=wf_name, run_id=run_id, input={"question": "6*7?"}))
            states = await client.wait_terminal(runs.values(), wait_s=90)
            events = await client.events()
            dlq = {f: await client.read_dlq(f"only_{f}") for f in FAULTS}

    expected_error = {
        "refused": "ProviderError",
        "e500": "ProviderError",
        "e429": "ProviderError",
        "hang": "AgentTimeout",
        "invalid": "InvalidOutputError",
    }
    assert states[runs["fine"]].status == "completed"
    for fault in FAULTS:
        esc, only = runs[f"esc_{fault}"], runs[f"only_{fault}"]
        # escalated to the good model: recorded as the decider's decision, then the run completes
        assert states[esc].status == "completed", (fault, states[esc])
        (escalated,) = _of(events, esc, "step.escalated")
        reason = "invalid_output" if fault == "invalid" else "exhausted"
        assert escalated.data["from"] == fault and escalated.data["to"] == "good"
        assert escalated.data["reason"] == reason
        failed = _of(events, esc, "step.failed")
        # invalid output escalates at once; the others use up the retry policy (2 attempts) first
        assert len(failed) == (1 if fault == "invalid" else 2), (fault, failed)
        assert {e.data.get("error_type") for e in failed} == {expected_error[fault]}, fault
        assert all(e.cost is not None and e.cost.model == fault for e in failed)
        (succeeded,) = _of(events, esc, "step.succeeded")
        assert succeeded.cost is not None and succeeded.cost.model == "good"
        assert succeeded.cost.tokens_in == USAGE["prompt_tokens"] and succeeded.cost.latency_ms > 0

        # alone on its ladder: quarantined with its cause, in the DLQ
        assert states[only].status == "quarantined", (fault, states[only])
        assert states[only].error_type == expected_error[fault]
        (parked,) = [r for r in dlq[fault] if r.run_id == only]
        assert parked.error_type == expected_error[fault] and parked.step == "ask"
        assert parked.reason == "quarantined"
        assert len(_of(events, only, "step.failed")) == 2  # the retry policy's 2 attempts, no ladder

    # the statuses and the refused connection name their cause
    assert "status 500" in (states[runs["only_e500"]].error or "")
    assert "status 429" in (states[runs["only_e429"]].error or "")
    assert "no status" in (states[runs["only_refused"]].error or "")

    # tokens of failed attempts are counted: the invalid reply used tokens (and pydantic-ai asked once more)
    for run in (runs["esc_invalid"], runs["only_invalid"]):
        for e in _of(events, run, "step.failed"):
            assert e.cost is not None and e.cost.requests == 2
            assert e.cost.tokens_in == 2 * USAGE["prompt_tokens"]
            assert e.cost.tokens_out == 2 * USAGE["completion_tokens"]

    # one request per attempt: the SDK's own retries are off, calmrun's policy decides
    assert fake.hits["e500-1"] == 2 + 2 and fake.hits["e429-1"] == 2 + 2

    # a 429's Retry-After is honoured: the next attempt waits at least that long (recorded, not timed)
    for run in (runs["esc_e429"], runs["only_e429"]):
        (retry,) = _of(events, run, "step.retry_scheduled")
        assert retry.data["delay_ms"] >= RETRY_AFTER_S * 1000, retry.data


def test_retry_after_is_read_from_the_provider_error() -> None:
    from pydantic_ai.exceptions import ModelHTTPError

    assert retry_after_ms(ModelHTTPError(429, "m", headers={"retry-after": "2"})) == 2000
    assert retry_after_ms(ModelHTTPError(429, "m", headers={"retry-after-ms": "350"})) == 350
    assert (
        retry_after_ms(ModelHTTPError(429, "m", headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}))
        == 0
    )
    assert retry_after_ms(ModelHTTPError(500, "m", headers={})) is None
    try:
        try:
            raise ModelHTTPError(429, "m", headers={"Retry-After": "1.5"})
        except ModelHTTPError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert retry_after_ms(outer) == 1500


async def test_probe_reports_answering_missing_and_refused_models() -> None:
    async with fake_openai() as fake:
        fake.hits["ok-1"] = 0  # what the fake lists
        models = ModelRegistry(
            {
                "up": ModelAlias(model="openai:ok-1", base_url=fake.base_url),
                "unserved": ModelAlias(model="openai:nope", base_url=fake.base_url),
                "down": ModelAlias(model="openai:ok-1", base_url=f"http://127.0.0.1:{free_port()}/v1"),
                "scripted": ModelAlias(model="function:examples.triage.scripted:fast"),
            }
        )
        health = await models.probe_all(timeout_s=3)
    assert health["up"][0] and "answers" in health["up"][1]
    assert not health["unserved"][0] and "does not serve 'nope'" in health["unserved"][1]
    assert not health["down"][0] and "127.0.0.1" in health["down"][1]
    assert health["scripted"] == (True, "in process, no network")
    # a probe spends no tokens: it only listed models
    assert {r["path"] for r in fake.requests} == {"/v1/models"}


@pytest.mark.parametrize("value", ["env:CALMRUN_TEST_KEY", "file:{dir}/key.txt", "sk-inline"])
def test_api_key_from_env_file_or_value(value: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from calmrun.agents.models import api_key

    monkeypatch.setenv("CALMRUN_TEST_KEY", "sk-from-env")
    (tmp_path / "key.txt").write_text("sk-from-file\n")
    cfg = ModelAlias(model="openai:x", api_key=SecretStr(value.format(dir=tmp_path)))
    expected = {"env": "sk-from-env", "file": "sk-from-file"}.get(value.split(":", 1)[0], "sk-inline")
    assert api_key("a", cfg) == expected
