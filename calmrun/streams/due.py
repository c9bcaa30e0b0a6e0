"""The worker's timer loop: hands each owned run whose deadline or retry time has come a ``TimerFired``.

``streams.timers`` says when to look at a run again; this room looks, every ``worker.timer_interval_s``
while no rebalance is under way, and decides the ``TimerFired`` stamped with the clock (time enters the
decider only on its inputs). A run pinned to a version not served here waits, as its inputs do
(``streams.versions``); a finished or no longer owned run is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container

from calmrun.streams.deciding import Deciding
from calmrun.streams.shared import Shared
from calmrun.streams.timers import Timers
from calmrun.streams.versions import Pinning
from calmrun.workflow.events import TimerFired
from calmrun.workflow.state import RunState


class DueTimers:
    """Fires the due timers of the owned runs; see the module docstring.

    Args:
        running: the idempotency keys of the attempts running here (an expired one ends by its own timeout).
    """

    def __init__(
        self, shared: Shared, timers: Timers, pins: Pinning, decisions: Deciding, running: Container[str]
    ) -> None:
        self._timers, self._parts, self._workflows = timers, shared.ownership, shared.workflows
        self._pins, self._decisions, self._running, self._clock = pins, decisions, running, shared.clock
        self._interval_s = shared.settings.worker.timer_interval_s

    async def run(self) -> None:
        """Look every ``interval_s``, while the partitions are stable; until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            if self._parts.stable.is_set():
                self.fire(self._clock())

    def fire(self, now: int) -> None:
        """Give the decider a TimerFired for every owned run whose deadline or retry time has come."""
        self._timers.fire(now, self._live, self._running, self._decide(now))

    def _live(self, p: int, run_id: str) -> RunState | None:
        table = self._parts.runs.get(p)
        state = table.get_live(run_id) if p in self._parts.owned and table is not None else None
        return state if state is not None and self._pins.serves(state) else None  # else: it waits

    def _decide(self, now: int) -> Callable[[int, RunState], None]:
        def fire(p: int, state: RunState) -> None:
            wf = self._workflows.pinned(state.workflow, state.version, state.digest)
            assert wf is not None  # _live gave only runs served here
            self._decisions.decide(p, wf, state, TimerFired(state.run_id, now), None, ())

        return fire
