"""The checkpoint on its own (pure): an input finishes only as the transaction answering it is taken, and the
commit position never passes an input still open."""

from __future__ import annotations

from aiokafka.structs import TopicPartition

from calmrun.streams.checkpoint import Checkpoint, Taken

REQ0, REQ1, STEP0 = TopicPartition("req", 0), TopicPartition("req", 1), TopicPartition("step", 0)


def test_the_position_stops_at_the_first_input_not_answered() -> None:
    cp = Checkpoint()
    a, b, c = (cp.consumed(REQ0, off) for off in (5, 6, 7))
    assert cp.take(0, [b, c], whole=True).positions == {REQ0: 5}  # 5 is open: a crash re-delivers 5, 6 and 7
    cp.committed({REQ0: 5})
    assert cp.take(0, [], whole=True).positions == {}  # nothing moved
    assert cp.take(0, [a], whole=True).positions == {REQ0: 8}
    cp.committed({REQ0: 8})
    assert cp.transactions == 2


def test_a_partition_is_given_only_its_own_positions() -> None:
    cp = Checkpoint()
    r0, r1, s0 = cp.consumed(REQ0, 0), cp.consumed(REQ1, 0), cp.consumed(STEP0, 3)
    assert cp.take(0, [r0, s0], whole=True).positions == {REQ0: 1, STEP0: 4}
    assert cp.take(1, [r1], whole=True).positions == {REQ1: 1}


def test_a_settled_input_waits_for_a_take_of_all_its_writer_holds() -> None:
    """Settled inputs are answered by a decision queued already, maybe in what a partial take left behind:
    they are finished only by a take that leaves the writer nothing."""
    cp = Checkpoint()
    answered, echo = cp.consumed(REQ0, 0), cp.consumed(STEP0, 0)
    cp.settled([echo])
    # the echo's answer may be in the rest
    assert cp.take(0, [answered], whole=False).positions == {REQ0: 1, STEP0: 0}
    cp.committed({REQ0: 1, STEP0: 0})
    assert cp.take(0, [], whole=True).positions == {STEP0: 1}


def test_a_forgotten_partition_finishes_nothing_and_a_probe_commits_what_was_found() -> None:
    cp = Checkpoint()
    cp.positioned({REQ0: 10, STEP0: 2})
    assert cp.last(0) == {REQ0: 10, STEP0: 2}
    stale = cp.consumed(REQ0, 10)
    cp.settled([cp.consumed(STEP0, 2)])
    cp.forget({0})
    assert cp.last(0) == {} and cp.consumed_to(REQ0) is None
    fresh = cp.consumed(REQ0, 10)  # the partition came back: its inputs are read again
    assert cp.take(0, [stale], whole=True).positions == {REQ0: 10}  # read before it left: finishes nothing
    assert cp.take(0, [fresh], whole=True).positions == {REQ0: 11}


def test_positions_may_wait_unless_they_pass_a_strict_input_not_committed() -> None:
    """A lazy input (an accepted request: re-read, it is a duplicate) lets the positions wait; a strict one
    (a quarantined request: re-read, it would be quarantined twice) holds them to its transaction until
    they are committed past it; a strict input behind an open one holds nothing yet."""
    cp = Checkpoint()
    accepted, quarantined, opened, behind = (cp.consumed(REQ0, off) for off in (0, 1, 2, 3))
    assert cp.take(0, [], whole=True, lazy=[accepted]) == Taken({REQ0: 1}, may_wait=True)
    assert cp.take(0, [quarantined], whole=True) == Taken({REQ0: 2}, may_wait=False)
    assert cp.take(0, [], whole=True) == Taken({REQ0: 2}, may_wait=False)  # deferred: still due
    cp.committed({REQ0: 2})
    assert cp.take(0, [behind], whole=True) == Taken({}, may_wait=True)  # 2 is open: 3 cannot commit yet
    assert cp.take(0, [], whole=True, lazy=[opened]) == Taken({REQ0: 4}, may_wait=False)  # now it passes 3
    cp.committed({REQ0: 4})
    settled = cp.consumed(STEP0, 0)
    cp.settled([settled])
    assert cp.take(0, [], whole=True) == Taken({STEP0: 1}, may_wait=True)  # a settled input is lazy
