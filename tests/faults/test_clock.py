"""A clock jump on one worker, forward and back, with 2,000 runs in flight.

Worker w1's wall clock (the clock it stamps inputs with; time enters the decider only so) jumps 10 minutes
forward for 10 s and back to true time, then 10 minutes back for 10 s and forward to true time again. The
forward jump passes the deadline (timeout and grace) of every attempt still queued there: each is issued
again under its key, once (an attempt running is left to its own timeout); no deadline fires twice,
nothing waits for a due time set in the jumped clock, every step is scheduled once. Every run completes
and the history checker passes (no second terminal, no forked seq).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calmrun.devkafka.cluster import DevCluster
from calmrun.settings import Settings
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.workflow.events import RunEvent
from tests.faults.support import events_records, scenario, settings_on
from tests.runtime_support import WorkerProcs

pytestmark = [pytest.mark.fault, pytest.mark.timeout(900)]
JUMP_MS = 10 * 60 * 1000


@pytest.fixture
def procs(healed: DevCluster, prefix: str, tmp_path: Path) -> Iterator[WorkerProcs]:
    p = WorkerProcs(healed.bootstrap, prefix, tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


async def test_a_clock_jump_forward_and_back_fires_nothing_twice_and_stalls_nothing(
    healed: DevCluster, procs: WorkerProcs, prefix: str, tmp_path: Path
) -> None:
    clock = tmp_path / "w1.clock"
    clock.write_text("0")

    async def jump(
        cluster: DevCluster, settings: Settings, procs: WorkerProcs
    ) -> tuple[float, set[int], Any]:
        at = time.time()
        for offset in (JUMP_MS, 0, -JUMP_MS, 0):
            clock.write_text(str(offset))
            await asyncio.sleep(10)
        return at, set(procs.status("w1").get("owned", [])), {"jumps_ms": [JUMP_MS, 0, -JUMP_MS, 0]}

    outcome = await scenario(
        "clock-jump", healed, procs, prefix, jump, own_args={"w1": ["--clock-file", str(clock)]}
    )
    assert outcome.statuses == {"completed": outcome.runs}
    codec = RecordCodec(wire_models())
    events = [codec.decode_as(r.value, RunEvent) for r in await events_records(settings_on(healed, prefix))]
    # +10 min passes every queued attempt's deadline (its timeout and grace) on w1's clock: such an attempt
    # is issued again under its key, once; a deadline that fired twice would issue it twice
    reissued = Counter(
        (e.run_id, e.step, e.attempt) for e in events if e.type == "step.reissued" and e.seq > 0
    )
    twice = [key for key, n in reissued.items() if n > 1]
    assert not twice, f"deadlines fired twice: {twice[:3]}"
    print(f"clock jump: {len(reissued)} attempts reissued once after the forward jump, none twice")
    scheduled: dict[tuple[str, str | None], set[int]] = defaultdict(set)
    for e in events:
        if e.type == "step.scheduled" and e.seq > 0:
            scheduled[(e.run_id, e.step)].add(e.seq)  # a record written again keeps its seq
    assert max(len(seqs) for seqs in scheduled.values()) == 1, "a step was scheduled twice"
