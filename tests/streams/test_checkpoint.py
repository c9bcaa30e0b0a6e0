"""The checkpoint on its own (pure): an input finishes only as the transaction answering it is taken, and the
commit position never passes an input still open."""

from __future__ import annotations

from aiokafka.structs import TopicPartition

from calmrun.streams.checkpoint import Checkpoint

REQ0, REQ1, STEP0 = TopicPartition("req", 0), TopicPartition("req", 1), TopicPartition("step", 0)


def test_the_position_stops_at_the_first_input_not_answered() -> None:
    cp = Checkpoint()
    a, b, c = (cp.consumed(REQ0, off) for off in (5, 6, 7))
    assert cp.take(0, [b, c], whole=True) == {REQ0: 5}  # 5 is open: a crash re-delivers 5, 6 and 7
    cp.committed({REQ0: 5})
    assert cp.take(0, [], whole=True) == {}  # nothing moved
    assert cp.take(0, [a], whole=True) == {REQ0: 8}
    cp.committed({REQ0: 8})
    assert cp.transactions == 2


def test_a_partition_is_given_only_its_own_positions() -> None:
    cp = Checkpoint()
    r0, r1, s0 = cp.consumed(REQ0, 0), cp.consumed(REQ1, 0), cp.consumed(STEP0, 3)
    assert cp.take(0, [r0, s0], whole=True) == {REQ0: 1, STEP0: 4}
    assert cp.take(1, [r1], whole=True) == {REQ1: 1}


def test_a_settled_input_waits_for_a_take_of_all_its_writer_holds() -> None:
    """Settled inputs are answered by a decision queued already, maybe in what a partial take left behind:
    they are finished only by a take that leaves the writer nothing."""
    cp = Checkpoint()
    answered, echo = cp.consumed(REQ0, 0), cp.consumed(STEP0, 0)
    cp.settled([echo])
    assert cp.take(0, [answered], whole=False) == {REQ0: 1, STEP0: 0}  # the echo's answer may be in the rest
    cp.committed({REQ0: 1, STEP0: 0})
    assert cp.take(0, [], whole=True) == {STEP0: 1}


def test_a_forgotten_partition_finishes_nothing_and_a_probe_commits_what_was_found() -> None:
    cp = Checkpoint()
    cp.positioned({REQ0: 10, STEP0: 2})
    assert cp.last(0) == {REQ0: 10, STEP0: 2}
    stale = cp.consumed(REQ0, 10)
    cp.settled([cp.consumed(STEP0, 2)])
    cp.forget({0})
    assert cp.last(0) == {} and cp.consumed_to(REQ0) is None
    fresh = cp.consumed(REQ0, 10)  # the partition came back: its inputs are read again
    assert cp.take(0, [stale], whole=True) == {REQ0: 10}  # read before it left: finishes nothing
    assert cp.take(0, [fresh], whole=True) == {REQ0: 11}
