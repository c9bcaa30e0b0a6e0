"""``calmrun deploy check`` and ``calmrun versions`` against the real broker: a change that renames a step
the runs in flight use must stay pinned (exit 1, the first divergent decision shown); one that changes
only a step they have not reached can take them over, and ``--migrate`` moves them (``run.migrated``),
after which they finish on the new version and the history checker still re-decides each exactly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import tests.versions.support as support
from calmrun.check.invariants import check_history
from calmrun.client import Client
from calmrun.kafka.topics import partition_for
from calmrun.workflow.events import RunRequest
from tests.runtime_support import ready, running, settings_for, until
from tests.versions.support import AGENTS, V1, V2, V3, pinned, write_yaml
from tests.versions.test_versions_in_flight import at_b, cli


async def test_deploy_check_flags_a_renamed_step_and_migrates_runs_past_a_later_change(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    support.OPEN = asyncio.Event()
    settings = settings_for(broker, prefix)
    v2_file, v3_file = write_yaml(V2, tmp_path / "v2.yaml"), write_yaml(V3, tmp_path / "v3.yaml")
    common = ("-b", broker, "--prefix", prefix, "--json")
    async with running(settings, [V1, V3], AGENTS) as w:  # serves v3 too, so a migration to it is decided
        await ready(w)
        async with Client(settings) as c:
            ids = await c.submit_many(  # a request may name its version (v3 is the newest here)
                RunRequest(workflow="pin", input={"n": i}, version="1") for i in range(3)
            )
            await until(lambda: at_b(w, ids), 60, "the runs to reach b")
            (fourth,) = await c.submit_many([RunRequest(workflow="pin", input={"n": 7}, version="1")])
            await until(lambda: at_b(w, [fourth]), 60, "the fourth run to reach b")

            code, shown = await cli("versions", *common)
            assert code == 0, shown
            flying = json.loads(shown)["in_flight"]
            assert flying == [
                {"workflow": "pin", "version": "1", "digest": V1.digest, "runs": 4, "served": True}
            ]

            code, shown = await cli("deploy", "check", str(v2_file), *common)
            assert code == 1, shown  # b is renamed: every run in flight must stay on v1
            report = json.loads(shown)
            assert report["diverging"] == 4 and {r["verdict"] for r in report["runs"]} == {"must stay pinned"}
            first = report["runs"][0]["first_divergence"]
            assert first["seq"] == 4  # after a: the record schedules b, v2 b2
            assert [e["step"] for e in first["recorded"] if e["type"] == "step.scheduled"] == ["b"]
            assert [e["step"] for e in first["new"] if e["type"] == "step.scheduled"] == ["b2"]

            code, shown = await cli("deploy", "check", str(v3_file), *common)
            assert code == 0, shown  # v3 changes only c, which no run has reached
            assert {r["verdict"] for r in json.loads(shown)["runs"]} == {"can take over"}

            # a version no worker serves yet: nothing is sent (a worker without it would park the command)
            v4_file = write_yaml(pinned("4", last_agent="add_ten"), tmp_path / "v4.yaml")
            code, shown = await cli("deploy", "check", str(v4_file), "--migrate", *common)
            assert code == 2 and "do not serve pin v4" in shown, shown

            code, shown = await cli("deploy", "check", str(v3_file), "--migrate", *common)
            assert code == 0, shown
            migrated = set(json.loads(shown)["migrated"])
            assert len(migrated) == 4 and set(ids) <= migrated

            def on_v3() -> bool:
                states = [w.parts.state(partition_for(r, 4), r) for r in migrated]
                return all(s is not None and s.version == "3" for s in states)

            await until(on_v3, 30, "the runs to be migrated to v3")
            support.OPEN.set()
            states = await c.wait_terminal([*ids, fourth], wait_s=60)
        for rid in [*ids, fourth]:
            s = states[rid]
            # c ran with v3's agent (add_ten): the run was decided with v3 after its migration
            assert (s.status, s.version, s.digest) == ("completed", "3", V3.digest)
            assert (
                s.steps["c"].output is not None and s.steps["c"].output["n"] == s.steps["b"].output["n"] + 10
            )
        async with Client(settings) as c:
            events = await c.events(ids[0])
        migration = [e for e in events if e.type == "run.migrated"]
        assert len(migration) == 1 and migration[0].data["from"] == {"version": "1", "digest": V1.digest}

        code, shown = await cli("versions", *common)
        assert json.loads(shown)["in_flight"] == []  # nothing needs v1 any more: its workers may stop
        code, shown = await cli("deploy", "check", str(v2_file), "--finished", "2", *common)
        assert code == 1 and len(json.loads(shown)["runs"]) == 2  # the last finished, re-decided too
    # replay picks the definition per event: v1 up to the migration, v3 after it
    report = await check_history(settings.kafka, [V1, V3])
    assert report.ok, report.summary()
    assert report.replayed == 4
