"""The page links a parent run and its child run (``kind: workflow``), in Debian's Chromium against a real
broker: the parent's view lists the child (a link, with its status), the child's view links its parent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright import async_api as playwright_api

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.client import Client
from calmrun.settings import load_settings
from calmrun.workflow.definition import WorkflowDef, parse_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import add_one, linear, ready, running
from tests.ui.test_ui_actions import launch_ui, stop_ui
from tests.ui.test_ui_browser import CHROMIUM, OPERATOR_TOKEN


def workflows() -> list[WorkflowDef]:
    parent = parse_workflow(
        {
            "name": "claim",
            "steps": [
                {"name": "prep", "agent": "add_one", "input": {"n": "input.n"}, "next": "fraud"},
                {"name": "fraud", "kind": "workflow", "workflow": "fraud", "input": {"n": "steps.prep.n"}},
            ],
        }
    )
    return [parent, linear("fraud", steps=2)]


@pytest.fixture
async def stack(broker: str, prefix: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    kafka = {"bootstrap": broker, "prefix": prefix, "partitions": 4}
    settings = load_settings(kafka=kafka, worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1})
    wfs = workflows()
    files = []
    for wf in wfs:
        files.append(tmp_path / f"{wf.name}.yaml")
        files[-1].write_text(yaml.safe_dump(wf.model_dump(mode="json", exclude_none=True)))  # keeps kind
    async with running(settings, wfs, AgentRegistry({"add_one": add_one}), ModelRegistry({})) as w:
        await ready(w)
        config = tmp_path / "ui.yaml"
        config.write_text(
            yaml.safe_dump(
                {"kafka": kafka, "ui": {"users": {"alice": {"token": OPERATOR_TOKEN, "role": "operator"}}}}
            )
        )
        ready_file, log = tmp_path / "ui.url", tmp_path / "ui.log"
        proc = launch_ui(config, files, ready_file, log, [])
        try:
            end = time.monotonic() + 60
            while not ready_file.exists():
                assert proc.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
            yield {"settings": settings, "url": ready_file.read_text().strip()}
        finally:
            stop_ui(proc)


@pytest.mark.timeout(300)
async def test_a_parent_and_its_child_link_each_other(stack: dict[str, Any]) -> None:
    async with Client(stack["settings"]) as client:
        (rid,) = await client.submit_many([RunRequest(workflow="claim", run_id="c1", input={"n": 1})])
        state = (await client.wait_terminal([rid], wait_s=90))[rid]
    assert state.status == "completed", state
    child = "c1.fraud"
    url = stack["url"]
    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            await page.goto(f"{url}?token={OPERATOR_TOKEN}#/run/c1")
            item = f'#run-children li[data-child="{child}"]'
            # the page's index catches up with the child's state: its status shows once it has it
            await page.wait_for_function(
                f"() => document.querySelector({item!r})?.textContent.includes('completed')",
                timeout=60_000,
            )
            assert "step fraud" in await page.inner_text(item)
            await page.click(f"{item} a")
            await page.wait_for_selector("#run-parent a", timeout=30_000)
            assert child in await page.inner_text("h1")
            assert "c1" in await page.inner_text("#run-parent a")
            assert "completed" in await page.inner_text("#run-parent")
            await page.click("#run-parent a")
            await page.wait_for_selector(item, timeout=30_000)
        finally:
            await browser.close()
    assert not errors, errors
