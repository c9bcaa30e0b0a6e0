"""The page's actions in Debian's Chromium against a real broker: approve, reject (with a comment), signal
(a JSON payload), cancel and redrive, from the run view and from the Inbox; who did it is on the events.

One worker runs ``hitl`` (an approval by alice, then a wait for the signal ``paid``), ``hitl_bob`` (the
same, answered by bob only), ``flaky`` (quarantined until "fixed") and ``pooled`` (a step in the pool
``gpu``, run by an executor whose /metrics the Workers view reads). The page is ``calmrun ui`` in its own
process with an operator (alice) and a viewer (victor). Screenshots go to the test's temporary directory
and to ``CALMRUN_UI_SHOTS`` when set (``docs/ui`` for docs/operator-page.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright import async_api as playwright_api

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.client import Client
from calmrun.localproc import free_port
from calmrun.settings import Settings, load_settings
from calmrun.streams.pool import PoolExecutor
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunRequest
from calmrun.workflow.state import RunState
from tests.people.flows import people, undo
from tests.runtime_support import Item, Out, add_one, linear, ready, running
from tests.ui.test_ui_browser import CHROMIUM, OPERATOR_TOKEN, ROOT, VIEWER_TOKEN, open_run, shoot

FIXED = {"value": False}


async def flaky(ctx: StepContext, item: Item) -> Out:
    if not FIXED["value"]:
        raise ConnectionError("ledger API refused the connection (10.0.0.9:443)")
    return await add_one(ctx, item)


def workflows() -> list[WorkflowDef]:
    bob = people("hitl_bob").model_dump(mode="json")
    for step in bob["steps"]:
        if step["name"] == "gate":
            step["approvers"] = ["bob"]
    pooled = linear("pooled", steps=2).model_dump(mode="json")
    pooled["steps"][1]["pool"] = "gpu"
    flaky_wf = linear("flaky", steps=1, agent="flaky", retry={"max_attempts": 1}).model_dump(mode="json")
    return [people(), parse_workflow(bob), parse_workflow(flaky_wf), parse_workflow(pooled)]


@pytest.fixture
def shots(tmp_path: Path) -> list[Path]:
    folders = [tmp_path / "screenshots"]
    if os.environ.get("CALMRUN_UI_SHOTS"):
        folders.append(ROOT / os.environ["CALMRUN_UI_SHOTS"])
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    return folders


@pytest.fixture
async def stack(broker: str, prefix: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    FIXED["value"] = False
    kafka = {"bootstrap": broker, "prefix": prefix, "partitions": 4}
    worker_cfg = {"commit_interval_s": 0.2, "timer_interval_s": 0.1}
    settings = load_settings(kafka=kafka, worker=worker_cfg)
    metrics_port = free_port()
    executor_settings = load_settings(kafka=kafka, worker=worker_cfg, metrics={"port": metrics_port})
    wfs = workflows()
    files = []
    for wf in wfs:
        files.append(tmp_path / f"{wf.name}.yaml")
        files[-1].write_text(yaml.safe_dump(wf.model_dump(mode="json", exclude_defaults=True)))
    agents = AgentRegistry({"add_one": add_one, "undo": undo, "flaky": flaky})
    async with running(settings, wfs, agents, ModelRegistry({})) as w:
        await ready(w)
        executor = PoolExecutor(
            executor_settings, wfs, "gpu", AgentRegistry({"add_one": add_one}), ModelRegistry({})
        )
        await executor.start()
        config = tmp_path / "ui.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "kafka": kafka,
                    "ui": {
                        "users": {
                            "alice": {"token": OPERATOR_TOKEN, "role": "operator"},
                            "victor": {"token": VIEWER_TOKEN, "role": "viewer"},
                        },
                    },
                }
            )
        )
        ready_file, log = tmp_path / "ui.url", tmp_path / "ui.log"
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        proc = launch_ui(config, files, ready_file, log, ["--pool-metrics", metrics])
        try:
            end = time.monotonic() + 60
            while not ready_file.exists():
                assert proc.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
            yield {
                "settings": settings,
                "url": ready_file.read_text().strip(),
                "log": log,
                "executor": executor,
            }
        finally:
            stop_ui(proc)
            await executor.stop()


def launch_ui(
    config: Path, files: list[Path], ready_file: Path, log: Path, extra: list[str]
) -> subprocess.Popen[bytes]:
    """``calmrun ui`` as its own process, as an operator starts it."""
    args = [sys.executable, "-m", "calmrun.cli", "ui", "-c", str(config), "--port", "0", *extra]
    args += ["--ready-file", str(ready_file), *[a for f in files for a in ("-w", str(f))]]
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def stop_ui(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def waits(step: str) -> Any:
    return lambda s: step in s.steps and s.steps[step].status == "waiting"


async def until_state(client: Client, run_id: str, pred: Any, what: str, wait_s: float = 60) -> RunState:
    end = time.monotonic() + wait_s
    while True:
        state = await client.state(run_id)
        if state is not None and pred(state):
            return state
        assert time.monotonic() < end, f"{run_id}: timed out waiting for {what}; last {state}"
        await asyncio.sleep(0.2)


async def confirm(page: Any, fields: dict[str, str] | None = None) -> None:
    await page.wait_for_selector("#confirm[open]")
    for sel, text in (fields or {}).items():
        await page.fill(sel, text)
    await page.click("#confirm-ok")
    await page.wait_for_selector("#confirm", state="hidden")


@pytest.mark.timeout(600)
async def test_actions_from_the_run_view_and_the_inbox(stack: dict[str, Any], shots: list[Path]) -> None:
    settings: Settings = stack["settings"]
    url: str = stack["url"]
    errors: list[str] = []
    async with Client(settings) as client, playwright_api.async_playwright() as pw:
        runs = [RunRequest(workflow="hitl", run_id=f"h{i}", input={"n": i}) for i in range(1, 5)]
        runs += [RunRequest(workflow="hitl_bob", run_id="b1", input={"n": 1})]
        runs += [RunRequest(workflow="flaky", run_id="f1", input={"n": 1})]
        runs += [RunRequest(workflow="pooled", run_id=f"p{i}", input={"n": i}) for i in range(5)]
        await client.submit_many(runs)
        for r in ("h1", "h2", "h3", "h4", "b1"):
            await until_state(client, r, waits("gate"), "gate")
        await until_state(client, "f1", lambda s: s.status == "quarantined", "quarantine")
        await client.wait_terminal([f"p{i}" for i in range(5)], wait_s=60)

        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
            ctx.set_default_timeout(60_000)  # a busy machine's worker may stall for seconds
            page = await ctx.new_page()
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            await page.goto(f"{url}?token={OPERATOR_TOKEN}")
            await page.wait_for_selector("#live.on")

            # -- the Inbox: everything waiting for a person, by approver ------------------------------
            await page.goto(f"{url}#/inbox")
            await page.wait_for_function("() => document.querySelectorAll('#inbox tbody tr').length === 5")
            await page.select_option("#inbox-approver", "bob")
            await page.wait_for_function("() => document.querySelectorAll('#inbox tbody tr').length === 1")
            assert await page.locator('#inbox tr[data-run="b1"]').count() == 1
            await page.select_option("#inbox-approver", "alice")
            await page.wait_for_function("() => document.querySelectorAll('#inbox tbody tr').length === 4")
            assert await page.locator('#inbox tr[data-run="b1"]').count() == 0
            await shoot(page, shots, "inbox")

            # approve h1 from the Inbox, with a comment
            await page.click('#inbox tr[data-run="h1"] [data-action=approve]')
            await page.wait_for_selector("#confirm[open]")
            assert "Approve gate of h1?" in await page.inner_text("#confirm-title")
            assert "alice" in await page.inner_text("#confirm-text")
            await shoot(page, shots, "inbox-approve-dialog")
            await confirm(page, {"#action-comment": "checked the order"})
            await until_state(client, "h1", waits("pay"), "pay waiting")

            # alice may not answer bob's gate: refused with the reason, nothing sent
            await page.select_option("#inbox-approver", "")
            await page.wait_for_selector('#inbox tr[data-run="b1"]')
            await page.click('#inbox tr[data-run="b1"] [data-action=approve]')
            await confirm(page)
            await page.wait_for_function(
                "() => document.querySelector('#toast').textContent.includes('its approvers are bob')"
            )

            # signal h1 from the Inbox (its wait for `paid`), with a JSON payload
            await page.wait_for_selector('#inbox tr[data-run="h1"][data-step="pay"]')
            await page.click('#inbox tr[data-run="h1"][data-step="pay"] [data-action=signal]')
            await page.wait_for_selector("#confirm[open]")
            await page.fill("#action-payload", "[1, 2]")
            await page.click("#confirm-ok")
            assert "must be a JSON object" in await page.inner_text("#confirm-error")
            await confirm(page, {"#action-payload": '{"amount": 41, "ref": "wire-7"}'})
            h1 = await until_state(client, "h1", lambda s: s.status == "completed", "h1 completed")
            assert h1.steps["pay"].output == {"amount": 41, "ref": "wire-7"} and h1.steps["c"].output == {
                "n": 42,
                "label": "c:1",
            }

            # -- the run view: reject h2 (a comment is required), approve h3 then signal it, cancel h4 -
            await open_run(page, url, "h2")
            await page.wait_for_selector('.waiting[data-step="gate"] [data-action=reject]')
            await shoot(page, shots, "run-waiting")
            await page.click('.waiting[data-step="gate"] [data-action=reject]')
            await page.wait_for_selector("#confirm[open]")
            await page.click("#confirm-ok")
            assert "needs a comment" in await page.inner_text("#confirm-error")
            assert await page.is_visible("#confirm[open]")
            await confirm(page, {"#action-comment": "duplicate of h1"})
            h2 = await until_state(client, "h2", lambda s: s.status == "completed", "h2 rejected")
            assert h2.outcome == "rejected"

            await open_run(page, url, "h3")
            await page.click('.waiting[data-step="gate"] [data-action=approve]')
            await confirm(page)
            await until_state(client, "h3", waits("pay"), "pay waiting")
            await page.wait_for_selector('.waiting[data-step="pay"] [data-action=signal]', timeout=60_000)
            await page.click('.waiting[data-step="pay"] [data-action=signal]')
            await confirm(page, {"#action-payload": '{"amount": 9}'})
            await page.wait_for_function(
                "() => document.querySelector('#run-status')?.textContent.startsWith('completed')",
                timeout=60_000,
            )

            await open_run(page, url, "h4")
            await page.click("#cancel-run")
            await page.wait_for_selector("#confirm[open]")
            await page.click("#confirm-ok")
            assert "needs a reason" in await page.inner_text("#confirm-error")
            await confirm(page, {"#action-reason": "customer withdrew"})
            await page.wait_for_function(
                "() => document.querySelector('#run-status')?.textContent.startsWith('cancelled')",
                timeout=60_000,
            )
            assert await page.inner_text("#run-cause") == "cancelled by ui:alice: customer withdrew"
            await shoot(page, shots, "run-cancelled")

            # -- redrive the quarantined run after the fix ------------------------------------------
            FIXED["value"] = True
            await open_run(page, url, "f1")
            await page.click("#redrive-run")
            await confirm(page)
            await page.wait_for_function(
                "() => document.querySelector('#run-status')?.textContent.startsWith('completed')",
                timeout=60_000,
            )

            # -- who did what, on the events --------------------------------------------------------
            answers = {
                (e.run_id, e.type): e.data
                for r in ("h1", "h2", "h3", "h4", "f1", "b1")
                for e in await client.events(r)
                if e.type
                in ("step.approved", "step.rejected", "run.cancel_requested", "run.redrive_requested")
                or e.type == "signal.received"
            }
            assert answers[("h1", "step.approved")] == {"by": "alice", "comment": "checked the order"}
            assert answers[("h2", "step.rejected")] == {"by": "alice", "comment": "duplicate of h1"}
            assert answers[("h3", "step.approved")]["by"] == "alice"
            assert answers[("h1", "signal.received")]["by"] == "ui:alice"
            assert answers[("h4", "run.cancel_requested")]["by"] == "ui:alice"
            assert answers[("h4", "run.cancel_requested")]["reason"] == "customer withdrew"
            assert answers[("f1", "run.redrive_requested")]["by"] == "ui:alice"
            assert not any(r == "b1" for r, _ in answers)  # refused: nothing reached the worker
            log = stack["log"].read_text()
            assert "approve by=alice role=operator run=h1 step='gate' comment='checked the order'" in log
            assert "cancel by=alice role=operator run=h4 reason='customer withdrew'" in log

            # -- a viewer sees the Inbox, cannot act ------------------------------------------------
            vctx = await browser.new_context(viewport={"width": 1400, "height": 900})
            vpage = await vctx.new_page()
            await vpage.goto(f"{url}?token={VIEWER_TOKEN}")
            await vpage.goto(f"{url}#/inbox")
            await vpage.wait_for_selector('#inbox tr[data-run="b1"]')
            assert await vpage.is_disabled('#inbox tr[data-run="b1"] [data-action=approve]')
            resp = await vpage.request.post(
                f"{url}api/runs/b1/command",
                data=json.dumps({"command": "cancel", "reason": "x"}),
                headers={"Content-Type": "application/json", "X-Calmrun-Action": "1"},
            )
            assert resp.status == 403
            await vctx.close()

            # -- the Workers view: the pool's group with its lag, issued attempts, running and fencing -
            executor: PoolExecutor = stack["executor"]
            await page.goto(f"{url}#/workers")
            await page.wait_for_selector('[data-pool="gpu"] [data-testid=pool-fenced]', timeout=30_000)
            pool_text = await page.inner_text('[data-pool="gpu"]')
            assert f"fencings: {executor.counts.fenced}" in pool_text and "agents running: 0" in pool_text
            assert "attempts issued (from the run states): 0" in pool_text
            heading = await page.inner_text("h2:has-text('pool gpu')")
            assert f"{settings.kafka.prefix}.pool.gpu" in heading
            lag = page.locator("h2:has-text('pool gpu') ~ table.lag").first
            assert f"{settings.kafka.prefix}.step.pooled.s2" in await lag.inner_text()
            await shoot(page, shots, "workers-pools")
        finally:
            await browser.close()
    # the one refusal (alice answering bob's gate) is a 403 the browser logs; nothing else may fail
    assert [e for e in errors if "status of 403" not in e] == [], errors
    assert len(errors) == 1, errors
