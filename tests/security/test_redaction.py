"""Redaction: a marked e-mail address (``redact: [input.customer.email, steps.lookup.email]``) goes through a
real worker and broker, into an agent's input, an agent's output, a quarantined step's error message and a
poison request, and is then searched for in every record of every topic, the snapshot and the logs.

It must be in the state topic and reach the next agent (the run needs it); the requests and step topics
carry it by design (they are the run's input); everything else holds ``[redacted]`` instead.
"""

from __future__ import annotations

import json
import logging
from uuid import uuid4

import pytest
from pydantic import BaseModel

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.errors import ConfigError
from calmrun.kafka.topics import admin_client
from calmrun.redact import MASK, Redactor
from calmrun.replay import fetch_snapshot
from calmrun.replay.recorded import replay_recorded
from calmrun.settings import load_settings
from calmrun.workflow.definition import parse_workflow
from calmrun.workflow.events import RunEvent, RunRequest
from tests.runtime_support import read_raw, ready, running

MARK = f"mark-{uuid4().hex[:12]}@example.com"
SEEN: list[str] = []


class Customer(BaseModel):
    name: str
    email: str


class LookupIn(BaseModel):
    customer: Customer


class Found(BaseModel):
    email: str
    account: str


async def lookup(ctx: StepContext, item: LookupIn) -> Found:
    return Found(email=item.customer.email, account=f"acct-{item.customer.name}")


class NotifyIn(BaseModel):
    email: str
    fail: bool = False


class Sent(BaseModel):
    ok: bool


async def notify(ctx: StepContext, item: NotifyIn) -> Sent:
    SEEN.append(item.email)
    if item.fail:
        raise ValueError(f"mail server refused {item.email}")
    return Sent(ok=True)


WORKFLOW = {
    "name": "red",
    "outcomes": ["sent"],
    "steps": [
        {
            "name": "lookup",
            "agent": "tests.security.test_redaction:lookup",
            "input": {"customer": "input.customer"},
            "next": "notify",
        },
        {
            "name": "notify",
            "agent": "tests.security.test_redaction:notify",
            "input": {"email": "steps.lookup.email", "fail": "input.fail"},
            "retry": {"max_attempts": 1},
            "next": "end:sent",
        },
    ],
}
REDACT = ["input.customer.email", "steps.lookup.email"]


def test_paths_are_masked_and_their_values_scrubbed_everywhere_else() -> None:
    r = Redactor(REDACT)
    ev = RunEvent(
        run_id="r",
        seq=3,
        type="run.completed",
        at_ms=1,
        workflow="red",
        data={"outputs": {"lookup": {"email": MARK, "account": "a"}}, "note": f"sent to {MARK}"},
    )
    out = r.event(ev, None)
    assert out.data == {"outputs": {"lookup": {"email": MASK, "account": "a"}}, "note": f"sent to {MASK}"}
    with pytest.raises(ConfigError, match="redact"):
        load_settings(redact=["customer.email"])


async def test_a_redacted_field_is_in_no_topic_but_the_runs_own_snapshot_or_log(
    broker: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="aiokafka")
    SEEN.clear()
    settings = load_settings(
        kafka={"bootstrap": broker, "prefix": prefix},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
        redact=REDACT,
    )
    wf = parse_workflow(WORKFLOW)
    customer = {"name": "dana", "email": MARK}
    async with running(settings, [wf], AgentRegistry(), ModelRegistry({})) as w, Client(settings) as c:
        await ready(w)
        await c.submit_many(
            [
                RunRequest(workflow="red", run_id="ok", input={"customer": customer, "fail": False}),
                RunRequest(workflow="red", run_id="bad", input={"customer": customer, "fail": True}),
                RunRequest(workflow="no-such-workflow", run_id="poison", input={"customer": customer}),
            ]
        )
        states = await c.wait_terminal(["ok", "bad"], wait_s=60)
        dead = await c.read_dlq("red")
        parked = await c.read_dlq("_invalid")
    assert states["ok"].status == "completed", states["ok"]
    assert states["bad"].status == "quarantined", states["bad"]
    assert SEEN == [MARK, MARK]  # the next step got the real value: the run state keeps it
    assert states["ok"].input["customer"]["email"] == MARK
    assert MASK in dead[0].error and MARK not in dead[0].error and parked

    async with admin_client(settings.kafka) as admin:
        topics = [t for t in await admin.list_topics() if t.startswith(f"{prefix}.")]
    carriers = {f"{prefix}.runs.requests", f"{prefix}.runs.state", *(t for t in topics if ".step." in t)}
    checked = 0
    for topic in topics:
        blobs = [b for rec in await read_raw(broker, topic) for b in (rec.key or b"", rec.value or b"")]
        found = any(MARK.encode() in b for b in blobs)
        if topic in carriers:
            assert found or not topic.endswith("state"), f"{topic} should keep the value"
        else:
            checked += len(blobs)
            assert not found, f"the redacted value is in a record of {topic}"
    assert checked > 20, "too few records were searched"
    assert any(MASK.encode() in rec.value for rec in await read_raw(broker, f"{prefix}.runs.events"))

    snap = await fetch_snapshot(settings, "ok")
    assert MARK not in snap.model_dump_json() and MASK in snap.model_dump_json()
    assert replay_recorded(wf, snap).verdict == "converged"
    assert caplog.records
    for record in caplog.records:
        assert MARK not in logging.Formatter().format(record), f"in a log record of {record.name}"
    assert json.dumps(states["ok"].steps["lookup"].output) == json.dumps(
        {"email": MARK, "account": "acct-dana"}
    )
