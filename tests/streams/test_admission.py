"""``streams.ownership``: what the task runner asks before an attempt starts and when its result is in.

Asked twice per attempt, so the usual answer (ownership settled, no stall) awaits nothing; a rebalance or a
stall still holds the answer until ownership is proved.
"""

from __future__ import annotations

import asyncio
from typing import cast

from calmrun.settings import load_settings
from calmrun.streams.membership import Membership
from calmrun.streams.ownership import Ownership, Stalls
from calmrun.streams.txn import TxnWriter


class _Probed:
    """The worker's writer as ``Stalls`` uses it: only its probe transaction, counted."""

    def __init__(self) -> None:
        self.probes = 0

    async def probe(self) -> None:
        self.probes += 1


def _ownership() -> Ownership:
    settings = load_settings(None, kafka={"bootstrap": "localhost:1", "prefix": "adm"})
    own = Ownership(Membership(settings, []), 4)
    own.owned.update({0, 1})
    return own


async def test_accept_answers_at_once_while_ownership_is_settled_and_waits_while_it_is_not() -> None:
    own = _ownership()
    assert await own.accept(0) and not await own.accept(3)
    own.stable.clear()  # a rebalance or a stall check is under way
    waiting = asyncio.ensure_future(own.accept(1))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    own.owned.discard(1)  # the rebalance took it away
    own.stable.set()
    assert await waiting is False


async def test_a_stall_of_half_a_session_is_noticed_and_proved_once() -> None:
    own = _ownership()
    writer = _Probed()
    own.writer = cast(TxnWriter, writer)
    stalls = Stalls(own, session_timeout_s=10)
    stalls.ran()
    assert not stalls.stalled()
    await stalls.revalidate_if_stalled()
    assert writer.probes == 0
    stalls.tick -= 5  # the process was paused for half a session
    assert stalls.stalled()
    await asyncio.gather(stalls.revalidate_if_stalled(), stalls.revalidate_if_stalled())
    assert writer.probes == 1 and not stalls.stalled() and own.stable.is_set()
