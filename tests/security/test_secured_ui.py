"""The operator page on a secured broker (SASL_SSL), as a user with only ``calmrun acls --role ui``.

``alice`` runs the worker of the test's prefix (worker and operator ACLs); ``bob`` gets the ``ui`` ACLs
and nothing else, and serves the page: it rebuilds its index, follows new runs, describes the workers'
group and redrives a quarantined run.
"""

from __future__ import annotations

import asyncio

from aiohttp import ClientSession

from calmrun.acls import acls_for, apply_acls
from calmrun.agents import AgentRegistry, StepContext
from calmrun.client import Client
from calmrun.devkafka import DevKafka
from calmrun.ui import Access, RunQuery, UiServer
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, add_one, linear, ready, running, until
from tests.security.conftest import settings_as

FIXED = {"value": False}


async def flaky(ctx: StepContext, item: Item) -> Out:
    if not FIXED["value"]:
        raise ConnectionError("downstream refused")
    return await add_one(ctx, item)


async def test_the_page_works_with_only_the_ui_acls(secured: DevKafka, prefix: str) -> None:
    admin = settings_as(secured, "admin", prefix)
    alice, bob = settings_as(secured, "alice", prefix), settings_as(secured, "bob", prefix)
    await apply_acls(admin, acls_for(alice, "alice", "worker") + acls_for(alice, "alice", "operator"))
    await apply_acls(admin, acls_for(bob, "bob", "ui"))
    bob = bob.model_copy(update={"ui": bob.ui.model_copy(update={"port": 0})})
    wfs = [linear("lin"), linear("flaky", steps=1, agent="flaky", retry={"max_attempts": 1})]
    agents = AgentRegistry({"add_one": add_one, "flaky": flaky})
    async with running(alice, wfs, agents) as w:
        await ready(w)
        async with Client(alice) as c:
            await c.submit_many(
                [RunRequest(workflow="lin", run_id=f"old-{i}", input={"n": i}) for i in range(5)]
            )
            await c.wait_terminal([f"old-{i}" for i in range(5)], wait_s=60)
        page = UiServer(bob, Access(bob.ui))
        url = await page.start()
        try:
            await page.tail.caught_up(60)
            assert page.index.runs(RunQuery()).total == 5
            async with Client(alice) as c:
                await c.submit(RunRequest(workflow="flaky", run_id="f-1", input={"n": 1}))
            await until(
                lambda: (st := page.index.state("f-1")) is not None and st.status == "quarantined", 60
            )
            async with ClientSession() as s:
                async with s.get(f"{url}api/workers") as resp:
                    assert resp.status == 200
                    groups = {g["role"]: g for g in (await resp.json())["groups"]}
                assert "error" not in groups["workers"], groups["workers"]
                assert groups["workers"]["members"] and groups["workers"]["lag"]
                FIXED["value"] = True
                body = {"workflow": "flaky", "run_ids": ["f-1"]}
                async with s.post(f"{url}api/redrive", json=body, headers={"X-Calmrun-Action": "1"}) as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["runs"] == 1
            await until(lambda: (st := page.index.state("f-1")) is not None and st.status == "completed", 60)
            events = await asyncio.to_thread(lambda: page.index.events("f-1"))
            assert [e.data.get("by") for e in events if e.type == "run.redrive_requested"] == ["ui:local"]
        finally:
            await page.stop()
