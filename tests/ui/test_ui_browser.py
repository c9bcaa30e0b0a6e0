"""The operator page as a person uses it: Debian's Chromium (Playwright) against a real broker and worker.

One session of the page (``calmrun ui`` as its own process, with an operator and a viewer token), one
worker running the triage example and a ``fragile`` workflow whose downstream call fails until "fixed",
and the cost aggregator. The test watches a batch arrive live, finds a quarantined run and its cause,
checks a viewer cannot redrive, redrives from the page with the keyboard, replays a run, compares the
cost view with ``calmrun costs --json`` and looks at the workers. Screenshots of every view go to the
test's temporary directory (and to ``CALMRUN_UI_SHOTS`` when set: ``docs/ui`` for docs/ui.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
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
from calmrun.cli.costs import batch_costs
from calmrun.client import Client
from calmrun.costs.process import AggregatorProcess
from calmrun.settings import Settings, load_settings
from calmrun.workflow.definition import load_workflow
from calmrun.workflow.events import RunRequest
from tests.runtime_support import Item, Out, add_one, ready, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "triage"
OPERATOR_TOKEN, VIEWER_TOKEN = "op-7f3a9c", "view-2b81e4"
FIXED = {"value": False}

FRAGILE = {
    "name": "fragile",
    "version": "1",
    "steps": [
        {"name": "prep", "agent": "add_one", "input": {"n": "input.n"}, "next": "call"},
        {
            "name": "call",
            "agent": "fragile",
            "input": {"n": "steps.prep.n"},
            "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05, "jitter": 0.0},
            "next": "post",
        },
        {"name": "post", "agent": "add_one", "input": {"n": "steps.call.n"}},
    ],
}


async def fragile(ctx: StepContext, item: Item) -> Out:
    if not FIXED["value"]:
        raise ConnectionError("payments API refused the connection (10.0.0.7:443)")
    return await add_one(ctx, item)


@pytest.fixture
def shots(tmp_path: Path) -> list[Path]:
    folders = [tmp_path / "screenshots"]
    if os.environ.get("CALMRUN_UI_SHOTS"):
        folders.append(ROOT / os.environ["CALMRUN_UI_SHOTS"])
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    return folders


async def open_run(page: Any, url: str, run_id: str) -> None:
    """Go to a run's view and wait until it shows that run: the view before stays in the DOM until the new
    one is drawn, and a click or a read meant for this run must not land on it."""
    await page.goto(f"{url}#/run/{run_id}")
    await page.wait_for_function(
        "(id) => document.querySelector('#main h1 .path')?.textContent === id", arg=run_id
    )


async def shoot(page: Any, folders: list[Path], name: str) -> None:
    for f in folders:
        await page.screenshot(path=str(f / f"{name}.png"), full_page=True)


class UiProcess:
    """``calmrun ui`` as its own process, with a configuration file naming two users."""

    def __init__(self, settings: Settings, tmp: Path, workflows: list[Path]) -> None:
        config = {
            "kafka": {
                "bootstrap": settings.kafka.bootstrap,
                "prefix": settings.kafka.prefix,
                "partitions": 4,
            },
            "budgets": {"tenants": {"default": {"usd": "0.01", "window": "1h"}}},  # the page compares spend
            "ui": {
                "users": {
                    "alice": {"token": OPERATOR_TOKEN, "role": "operator"},
                    "victor": {"token": VIEWER_TOKEN, "role": "viewer"},
                }
            },
        }
        self.config = tmp / "ui.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.ready = tmp / "ui.url"
        self.log = tmp / "ui.log"
        args = [sys.executable, "-m", "calmrun.cli", "ui", "-c", str(self.config), "--port", "0"]
        args += ["--ready-file", str(self.ready)]
        for w in workflows:
            args += ["-w", str(w)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    async def url(self, wait_s: float = 60.0) -> str:
        end = time.monotonic() + wait_s
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"calmrun ui did not start:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        return self.ready.read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def stack(broker: str, prefix: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A worker (triage + fragile), the cost aggregator and the page, all on this test's prefix."""
    sys.path.insert(0, str(ROOT))
    FIXED["value"] = False
    settings = load_settings(
        EXAMPLE / "models.yaml",
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1},
    )
    fragile_yaml = tmp_path / "fragile.yaml"
    fragile_yaml.write_text(yaml.safe_dump(FRAGILE))
    triage = load_workflow(EXAMPLE / "workflow.yaml")
    agents = AgentRegistry({"fragile": fragile, "add_one": add_one})
    async with running(
        settings, [triage, load_workflow(fragile_yaml)], agents, ModelRegistry(settings.models)
    ) as w:
        await ready(w)
        agg = AggregatorProcess(settings, log=tmp_path / "agg.log").start()
        v2 = tmp_path / "triage-v2.yaml"  # decide's refund branch goes to escalate: refunded runs diverge
        text = (EXAMPLE / "workflow.yaml").read_text().replace('version: "1"', 'version: "2"')
        v2.write_text(
            text.replace("value: refund}\n        goto: refund", "value: refund}\n        goto: escalate")
        )
        assert load_workflow(v2).version == "2" and v2.read_text() != text
        ui = UiProcess(settings, tmp_path, [EXAMPLE / "workflow.yaml", v2, fragile_yaml])
        try:
            yield {"settings": settings, "worker": w, "url": await ui.url(), "ui": ui, "tmp": tmp_path}
        finally:
            ui.stop()
            agg.stop()


async def tab_until(page: Any, selector: str, max_tabs: int = 80) -> list[str]:
    """Press Tab until ``selector`` has the focus; returns what got the focus on the way."""
    seen: list[str] = []
    for _ in range(max_tabs):
        await page.keyboard.press("Tab")
        desc = await page.evaluate(
            "() => { const e = document.activeElement; return e ? (e.id || e.textContent || e.tagName)"
            ".trim().slice(0, 40) : '' }"
        )
        seen.append(desc)
        if await page.evaluate(f"() => document.activeElement === document.querySelector({selector!r})"):
            return seen
    raise AssertionError(f"Tab never reached {selector}; focus went through {seen}")


@pytest.mark.timeout(600)
async def test_operator_page_in_chromium(stack: dict[str, Any], shots: list[Path]) -> None:
    settings: Settings = stack["settings"]
    url: str = stack["url"]
    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            op_ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
            page = await op_ctx.new_page()
            page.on(
                "console",
                lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            await page.goto(f"{url}?token={OPERATOR_TOKEN}")
            await page.wait_for_selector("#live.on")
            assert "alice (operator)" in await page.inner_text("#me")
            await page.evaluate("() => { window.__noReload = 1 }")

            # -- runs appear live while a batch runs (no reload) ------------------------------------
            tickets = [
                json.loads(x) for x in (EXAMPLE / "tickets.jsonl").read_text().splitlines() if x.strip()
            ]
            async with Client(settings) as client:
                t0 = time.monotonic()
                await client.submit(RunRequest(workflow="triage", run_id="first-0", input=tickets[0]))
                await page.wait_for_selector('tr[data-run="first-0"]', timeout=10_000)
                first_seen = time.monotonic() - t0
                batch = [
                    RunRequest(workflow="triage", run_id=f"batch-{i:03d}", input=tickets[i % len(tickets)])
                    for i in range(40)
                ]
                totals_seen: list[int] = []
                submit = asyncio.create_task(_trickle(client, batch))
                while not submit.done() or len(totals_seen) < 2:
                    totals_seen.append(int(await page.inner_text('[data-testid="count-total"]')))
                    await asyncio.sleep(0.3)
                await submit
                await page.wait_for_function(
                    "() => document.querySelector('[data-testid=count-completed]')?.textContent === '41'",
                    timeout=120_000,
                )
                assert len(set(totals_seen)) > 1, f"the list did not move while the batch ran: {totals_seen}"
                assert await page.evaluate("() => window.__noReload") == 1
                print(f"\na new run appeared on the page {first_seen * 1000:.0f} ms after it was submitted")
                await shoot(page, shots, "runs")

                # filters and search
                await page.fill("#f-q", "batch-00")
                await page.press("#f-q", "Enter")
                await page.wait_for_function(
                    "() => document.querySelector('[data-testid=count-total]').textContent === '10'"
                )
                await page.goto(f"{url}#/runs")

                # -- a quarantined run shows its cause ---------------------------------------------
                ids = await client.submit_many(
                    [RunRequest(workflow="fragile", run_id=f"frag-{i}", input={"n": i}) for i in range(3)]
                )
                await client.wait_terminal(ids, wait_s=60)
            await page.goto(f"{url}#/runs?status=quarantined")
            await page.wait_for_function(
                "() => document.querySelector('[data-testid=count-quarantined]')?.textContent === '3'"
            )
            await page.click('a[href="#/run/frag-0"]')
            await page.wait_for_selector("#run-cause")
            cause = await page.inner_text("#run-cause")
            assert "ConnectionError" in cause and "payments API refused" in cause
            assert "quarantined" in await page.inner_text("#run-status")
            assert "frag-0" in await page.inner_text("#run-dlq") or "fragile" in await page.inner_text(
                "#run-dlq"
            )
            await shoot(page, shots, "run-quarantined")
            await page.goto(f"{url}#/dlq?workflow=fragile")
            await page.wait_for_selector('tr[data-run="frag-0"]')
            assert "payments API refused" in await page.inner_text(
                'tr[data-run="frag-0"] [data-testid=cause]'
            )
            await page.click('tr[data-run="frag-0"] summary')
            assert "StepTask" in await page.inner_text(
                'tr[data-run="frag-0"] [data-testid=preview]'
            ) or '"step"' in (await page.inner_text('tr[data-run="frag-0"] [data-testid=preview]'))
            await shoot(page, shots, "dead-letters")

            # the keyboard reaches every action of the view: the filter, the selections, each redrive
            await page.reload()  # a fresh load: Tab starts at the top of the page
            await page.wait_for_selector('tr[data-run="frag-2"]')
            in_main = await page.evaluate(
                "() => [...document.querySelectorAll('main button:not([disabled]), main input, main select')]"
                ".map(e => e.outerHTML.slice(0, 120))"
            )
            assert len(in_main) >= 8  # workflow filter, redrive selected, 3 checkboxes, 3 redrives
            focused: set[str] = set()
            for _ in range(120):
                await page.keyboard.press("Tab")
                focused.add(await page.evaluate("() => document.activeElement.outerHTML.slice(0, 120)"))
                if set(in_main) <= focused:
                    break
            assert set(in_main) <= focused, set(in_main) - focused

            # -- a viewer cannot redrive (and sees payloads redacted) ---------------------------------
            viewer_ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
            vpage = await viewer_ctx.new_page()
            vpage.on(
                "console", lambda m: errors.append(f"viewer console: {m.text}") if m.type == "error" else None
            )
            await vpage.goto(f"{url}?token={VIEWER_TOKEN}")
            await vpage.goto(f"{url}#/dlq?workflow=fragile")
            await vpage.wait_for_selector('tr[data-run="frag-0"]')
            assert await vpage.is_disabled('tr[data-run="frag-0"] [data-action=redrive]')
            assert await vpage.is_disabled("#redrive-selected")
            assert "[redacted]" in (
                await vpage.text_content('tr[data-run="frag-0"] [data-testid=preview]') or ""
            )
            resp = await vpage.request.post(
                f"{url}api/redrive",
                data=json.dumps({"workflow": "fragile", "run_ids": ["frag-0"]}),
                headers={"Content-Type": "application/json", "X-Calmrun-Action": "1"},
            )
            assert resp.status == 403
            anon = await pw.request.new_context()
            assert (await anon.get(f"{url}api/runs")).status == 401
            await anon.dispose()
            await open_run(vpage, url, "frag-1")
            await vpage.wait_for_selector("#run-status")
            assert await vpage.is_disabled("#redrive-run")
            await shoot(vpage, shots, "viewer-run")
            await viewer_ctx.close()

            # -- redrive from the page, by keyboard, after the fix ------------------------------------
            FIXED["value"] = True
            await open_run(page, url, "frag-0")
            await page.wait_for_selector("#redrive-run")
            await page.reload()  # a fresh load: Tab starts at the top of the page
            await page.wait_for_selector("#redrive-run")
            seen = await tab_until(page, "#redrive-run")
            assert any("Runs" in s for s in seen) and any("Dead letters" in s for s in seen)
            await page.keyboard.press("Enter")
            await page.wait_for_selector("#confirm[open]")
            await page.keyboard.press("Tab")  # from Cancel (focused first) to the confirming button
            assert await page.evaluate("() => document.activeElement.id") == "confirm-ok"
            await page.keyboard.press("Enter")
            await page.wait_for_function(
                "() => document.querySelector('#run-status')?.textContent.startsWith('completed')",
                timeout=60_000,
            )
            async with Client(settings) as client:
                events = await client.events("frag-0")
            redrives = [e for e in events if e.type == "run.redrive_requested"]
            assert [e.data.get("by") for e in redrives] == ["ui:alice"]
            await shoot(page, shots, "run-redriven")
            log = stack["ui"].log.read_text()
            assert "redrive by=alice role=operator workflow=fragile runs=['frag-0']" in log

            # the other two: select both on the Dead letters view, redrive many with a confirmation
            await page.goto(f"{url}#/dlq?workflow=fragile")
            for rid in ("frag-1", "frag-2"):
                await page.check(f'tr[data-run="{rid}"] input[type=checkbox]')
            await page.click("#redrive-selected")
            await page.wait_for_selector("#confirm[open]")
            assert "2 runs" in await page.inner_text("#confirm-title")
            await page.click("#confirm-ok")
            await page.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=run-status]')]"
                ".filter(e => e.textContent === 'completed').length === 3",
                timeout=60_000,
            )

            # -- replay this run --------------------------------------------------------------------
            await open_run(page, url, "batch-000")
            await page.wait_for_selector("#waterfall .wf-row")
            rows = await page.locator("#waterfall .wf-row").count()
            assert rows >= 5  # classify, extract + sentiment (in parallel), decide, and the branch taken
            decide_input = await page.locator("#attempts [data-testid=attempt-input]").nth(3).text_content()
            assert '"classification"' in (decide_input or "")  # decide's mapping over earlier outputs
            await page.reload()  # a fresh load: Tab starts at the top of the page
            await page.wait_for_selector("#replay-run")
            await tab_until(page, "#replay-run")
            await page.keyboard.press("Enter")
            await page.wait_for_selector("#replay-verdict")
            assert await page.inner_text("#replay-verdict") == "converged"
            await shoot(page, shots, "run")

            # against a changed definition a refunded run diverges: the first divergent decision, side by side
            await page.goto(f"{url}#/runs?outcome=refunded")
            await page.wait_for_selector("#runs tbody tr a")
            await page.click("#runs tbody tr a")
            await page.wait_for_selector("#replay-version")
            await page.select_option("#replay-version", "2")
            await page.click("#replay-run")
            await page.wait_for_selector("#replay-verdict")
            assert await page.inner_text("#replay-verdict") == "diverged"
            divergence = await page.inner_text("#divergence")
            assert "run.routed" in divergence and "escalate" in divergence, divergence
            assert await page.locator("#replay-side .diff").count() >= 2  # a differing event on each side
            await shoot(page, shots, "run-replay-diverged")

            # -- costs equal `calmrun costs --json` --------------------------------------------------
            await batch_costs(settings)  # the aggregator has folded every event
            cli = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "calmrun.cli", "costs", "--json", "--by", "workflow"],
                *["-c", str(stack["ui"].config)],
                stdout=subprocess.PIPE,
                cwd=ROOT,
            )
            stdout, _ = await cli.communicate()
            assert cli.returncode == 0
            want = {r["value"]: r for r in json.loads(stdout)["rows"]}
            assert set(want) == {"triage", "fragile"}
            deadline = time.monotonic() + 30
            while True:
                await page.goto(f"{url}#/costs?by=workflow&window=1m")
                await page.wait_for_selector("#cost-totals")
                got = await _cost_rows(page)
                if got == {k: _fields(v) for k, v in want.items()} or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            assert got == {k: _fields(v) for k, v in want.items()}
            total_usd = sum(float(r["cost_usd"]) for r in want.values())
            chart_total = await page.inner_text('[data-testid="chart-money-total"]')
            assert chart_total == f"total ${total_usd:.6f}"
            budget = page.locator("#cost-budgets tbody tr")
            assert await budget.count() == 1 and "$0.010000" in await budget.inner_text()
            assert float(await budget.locator("[role=meter]").get_attribute("aria-valuenow") or 0) > 0
            await shoot(page, shots, "costs")

            # -- workers ---------------------------------------------------------------------------
            await page.goto(f"{url}#/workers")
            await page.wait_for_selector("table.members")
            text = await page.inner_text("main")
            assert settings.group_id in text and f"{settings.kafka.prefix}.runs.events" in text
            await shoot(page, shots, "workers")

            await page.goto(f"{url}#/runs")
            await page.wait_for_selector("#runs")
            assert errors == [], errors
        finally:
            await browser.close()


async def _trickle(client: Client, batch: list[RunRequest]) -> None:
    for i in range(0, len(batch), 5):
        await client.submit_many(batch[i : i + 5])
        await asyncio.sleep(0.4)


_FIELDS = ("attempts", "succeeded", "failed", "tokens_in", "tokens_out", "requests", "api_calls", "cost_usd")


def _fields(row: dict[str, Any]) -> dict[str, str]:
    return {f: str(row[f]) for f in _FIELDS}


async def _cost_rows(page: Any) -> dict[str, dict[str, str]]:
    return dict(
        await page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll('#cost-totals tbody tr')].map(tr =>
                [tr.dataset.value, Object.fromEntries([...tr.querySelectorAll('[data-field]')]
                    .map(td => [td.dataset.field, td.textContent]))]))"""
        )
    )
