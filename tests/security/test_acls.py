"""Teams confined by prefixed ACLs: what ``calmrun acls`` prints, and that it is enough and no more.

``alice`` (team A) and ``bob`` (team B) get the worker and operator ACLs of their own prefix only (applied
with ``calmrun acls --apply`` as ``admin``). Alice's worker and client on B's prefix fail with an
authorization error naming B's topic; her own runs on A complete meanwhile, and so do Bob's on B.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from calmrun.acls import acls_for, apply_acls
from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.cli import app
from calmrun.client import Client
from calmrun.devkafka import DevKafka
from calmrun.errors import KafkaAuthorizationError
from calmrun.settings import load_settings
from calmrun.streams.worker import Worker
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, ready, running
from tests.security.conftest import settings_as


def test_acls_command_prints_the_prefixed_acls_of_each_role() -> None:
    result = CliRunner().invoke(
        app, ["acls", "--prefix", "teama", "--principal", "alice", "--role", "worker"]
    )
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines() if line.startswith("ALLOW")]
    assert lines == [
        ["ALLOW", "User:alice", "Read", "topic", "prefixed", "teama."],
        ["ALLOW", "User:alice", "Write", "topic", "prefixed", "teama."],
        ["ALLOW", "User:alice", "Describe", "topic", "prefixed", "teama."],
        ["ALLOW", "User:alice", "Create", "topic", "prefixed", "teama."],
        ["ALLOW", "User:alice", "Read", "group", "literal", "teama.workers"],
        ["ALLOW", "User:alice", "Describe", "group", "literal", "teama.workers"],
        ["ALLOW", "User:alice", "Write", "transactional_id", "prefixed", "teama.workers.tx."],
        ["ALLOW", "User:alice", "Describe", "transactional_id", "prefixed", "teama.workers.tx."],
    ]
    assert (
        "kafka-acls.sh --add --allow-principal 'User:alice' --operation Read --topic 'teama.'"
        in result.output
    )
    viewer = acls_for(load_settings(kafka={"prefix": "teama"}), "alice", "viewer")
    assert {a.operation for a in viewer} == {"Read", "Describe"}
    assert {(a.resource, a.name) for a in viewer} == {("topic", "teama.")}


async def test_a_team_cannot_touch_another_teams_prefix(secured: DevKafka, prefix: str) -> None:
    team_a, team_b = f"{prefix}a", f"{prefix}b"
    admin = settings_as(secured, "admin", team_a)
    for user, team in (("alice", team_a), ("bob", team_b)):
        wanted = acls_for(settings_as(secured, user, team), user, "worker")
        wanted += acls_for(settings_as(secured, user, team), user, "operator")
        await apply_acls(admin, wanted)

    agents = AgentRegistry({"add_one": add_one})
    alice_a, bob_b = settings_as(secured, "alice", team_a), settings_as(secured, "bob", team_b)
    alice_on_b = settings_as(secured, "alice", team_b)
    async with running(alice_a, [linear()], agents) as wa, running(bob_b, [linear()], agents) as wb:
        await ready(wa)
        await ready(wb)
        async with Client(alice_a) as ca, Client(bob_b) as cb:
            a_ids = await ca.submit_many(RunRequest(workflow="lin", input={"n": i}) for i in range(10))
            b_ids = await cb.submit_many(RunRequest(workflow="lin", input={"n": i}) for i in range(5))

            # alice's worker on B's prefix: refused at start, naming B's topic
            intruder = Worker(alice_on_b, [linear()], agents, ModelRegistry({}))
            with pytest.raises(KafkaAuthorizationError) as worker_refused:
                await intruder.start()
            await intruder.stop()
            assert worker_refused.value.resource == "topic"
            assert worker_refused.value.name.startswith(f"{team_b}.")
            print(f"\nworker refused: {worker_refused.value}")

            # alice's client on B's prefix: cannot write a request, cannot read the events
            async with Client(alice_on_b) as intruding:
                with pytest.raises(KafkaAuthorizationError) as write_refused:
                    await intruding.submit(RunRequest(workflow="lin", input={"n": 1}, run_id="sneaky"))
                assert write_refused.value.name == f"{team_b}.runs.requests"
                with pytest.raises(KafkaAuthorizationError) as read_refused:
                    await intruding.events(b_ids[0])
                assert read_refused.value.name == f"{team_b}.runs.events"
            print(f"client refused: {write_refused.value}; {read_refused.value}")

            a_states = await ca.wait_terminal(a_ids, wait_s=60)
            b_states = await cb.wait_terminal(b_ids, wait_s=60)
    assert {s.status for s in a_states.values()} == {"completed"}
    assert {s.status for s in b_states.values()} == {"completed"}
    assert "sneaky" not in b_states


async def test_a_missing_group_acl_fails_the_worker_start_naming_the_group(
    secured: DevKafka, prefix: str
) -> None:
    alice = settings_as(secured, "alice", f"{prefix}g")
    topics_only = [a for a in acls_for(alice, "alice", "worker") if a.resource == "topic"]
    await apply_acls(settings_as(secured, "admin", f"{prefix}g"), topics_only)
    worker = Worker(alice, [linear()], AgentRegistry({"add_one": add_one}), ModelRegistry({}))
    with pytest.raises(KafkaAuthorizationError) as refused:
        await worker.start()
    await worker.stop()
    assert (refused.value.resource, refused.value.name) == ("group", f"{prefix}g.workers")
