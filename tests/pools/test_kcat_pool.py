"""The docs' kcat pipeline (docs/pools.md) answers a pooled step: the block under ``<!-- kcat-pool -->``, run
by bash with its first line's values set for this test (broker, prefix, a ``lin`` workflow whose ``s2`` is
pooled)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.check import check_history
from calmrun.client import Client
from calmrun.workflow.events import RunRequest
from tests.pools.test_pools import pooled
from tests.runtime_support import add_one, linear, ready, running, settings_for

PAGE = Path(__file__).resolve().parents[2] / "docs" / "pools.md"


def kcat_block() -> list[str]:
    text = PAGE.read_text()
    after = text.split("<!-- kcat-pool -->\n```sh\n", 1)[1]
    return after.split("```", 1)[0].splitlines()


def start(script: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


async def test_the_readme_kcat_pipeline_answers_a_pooled_step(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    assert shutil.which("kcat"), "kcat missing: `make tools` installs it"
    lines = kcat_block()
    assert lines[0].startswith("B=") and lines[1].startswith("kcat")
    output = shlex.quote('{"n": 99}')
    lines[0] = f"B={broker} P={prefix} WF=lin STEP=s2 POOL=s2 OUTPUT={output}"
    script = tmp_path / "kcat_pool.sh"
    script.write_text("set -e -o pipefail\n" + "\n".join(lines) + "\n")
    settings = settings_for(broker, prefix)
    wf = pooled(linear(), s2="s2")
    async with running(settings, [wf], AgentRegistry({"add_one": add_one}), ModelRegistry({})) as worker:
        await ready(worker)
        pipeline = start(script, tmp_path / "kcat.log")
        try:
            async with Client(settings) as client:
                ids = await client.submit_many(
                    [RunRequest(workflow="lin", input={"n": i}, run_id=f"k{i}") for i in range(10)]
                )
                states = await client.wait_terminal(ids, wait_s=90)
        finally:
            os.killpg(pipeline.pid, signal.SIGTERM)
            pipeline.wait(timeout=30)
    assert {s.status for s in states.values()} == {"completed"}, (tmp_path / "kcat.log").read_text()
    assert all(s.steps["s2"].output == {"n": 99} for s in states.values())
    assert all(s.steps["s3"].output == {"n": 100, "label": "s3:1"} for s in states.values())
    assert worker.stats.results == 10
    report = await check_history(settings.kafka, [wf])
    assert report.ok, report.summary()
