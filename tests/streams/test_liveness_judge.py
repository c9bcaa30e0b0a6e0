"""How a worker judges its peers from their beats (``calmrun.streams.liveness``), without a broker: a peer
silent for ``dead_after_s`` is judged dead, one whose beats came late is given three times its longest gap,
and one that beats again after it was removed (a false removal) waits twice as long each time, up to the
session timeout."""

from __future__ import annotations

import json

from calmrun.settings import load_settings
from calmrun.streams.liveness import FORGET_S, Liveness, Peer

INTERVAL = 0.25
DEAD_AFTER = 1.0
SESSION = 6.0


def judge() -> Liveness:
    settings = load_settings(
        kafka={"prefix": "judge"},
        worker={
            "session_timeout_s": SESSION,
            "liveness": {"enabled": True, "interval_s": INTERVAL, "dead_after_s": DEAD_AFTER},
        },
    )
    return Liveness(settings, member=lambda: "me", rejoin=lambda: None)


def beat(lv: Liveness, who: str, now: float, member: str = "") -> None:
    value = {"group": lv.group, "member": member or f"{who}-m", "instance": who, "leaving": False}
    lv._read(who.encode(), json.dumps(value).encode(), now)


def run(lv: Liveness, peer_beats: list[float], until: float, peer: str = "p") -> float | None:
    """Own beats every interval up to ``until``, the peer's at ``peer_beats``; when the peer is first judged
    dead (None: never)."""
    t, beats = 0.0, sorted(peer_beats)
    while t <= until:
        while beats and beats[0] <= t:
            beat(lv, peer, beats.pop(0))
        beat(lv, lv.key, t)
        if any(key == peer for key, _ in lv._dead(t)):
            return t
        t = round(t + INTERVAL / 5, 6)
    return None


def test_a_peer_silent_for_dead_after_is_judged_dead_then() -> None:
    lv = judge()
    regular = [i * INTERVAL for i in range(20)]  # the last at 4.75
    dead = run(lv, regular, 10.0)
    assert dead is not None and 4.75 + DEAD_AFTER <= dead < 4.75 + DEAD_AFTER + INTERVAL


def test_late_beats_raise_the_threshold_to_three_times_the_longest_gap() -> None:
    lv = judge()
    beats = [0.0, 0.25, 0.5, 1.3, 1.55, 1.8]  # one gap of 0.8 s (over half of dead_after_s): late
    dead = run(lv, beats, 10.0)
    assert dead is not None and 1.8 + 2.4 <= dead < 1.8 + 2.4 + INTERVAL
    assert lv.counts.late == 1


def test_gaps_under_half_of_dead_after_do_not() -> None:
    lv = judge()
    beats = [0.0, 0.45, 0.9, 1.35]
    dead = run(lv, beats, 10.0)
    assert dead is not None and dead < 1.35 + DEAD_AFTER + INTERVAL
    assert lv.counts.late == 0


def test_a_removed_peer_that_beats_again_waits_twice_as_long_each_time_up_to_the_session() -> None:
    lv = judge()
    peer = Peer("p-m", "p", 0.0)
    limits = []
    for n in range(1, 5):
        lv._gone["p"] = peer
        lv._survived("p", peer, now=float(n))
        peer.late_gap_s = 0.0  # the doubling alone
        limits.append(peer.dead_after(DEAD_AFTER, lv._cap_s, float(n)))
    assert limits == [2.0, 4.0, SESSION, SESSION]
    assert lv.counts.survived == 4
    # forgotten after a quiet while
    assert peer.dead_after(DEAD_AFTER, lv._cap_s, 4.0 + FORGET_S + 1) == DEAD_AFTER


def test_a_false_removal_seen_from_the_beats() -> None:
    lv = judge()
    lv.peers["p"] = Peer("p-m", "p", 0.0)
    lv._gone["p"] = lv.peers.pop("p")  # as ``_remove`` leaves it
    beat(lv, "p", 3.0, member="p-m2")  # the removed process beats again, 3 s after its last
    p = lv.peers["p"]
    assert lv.counts.survived == 1 and "p" not in lv._gone
    assert p.member == "p-m2"
    assert p.dead_after(DEAD_AFTER, lv._cap_s, 3.0) == SESSION  # twice its 3 s gap, capped


def test_a_worker_whose_own_beats_stall_judges_nobody() -> None:
    lv = judge()
    beat(lv, lv.key, 0.0)
    beat(lv, "p", 0.0)
    for i in range(1, 8):
        beat(lv, lv.key, i * INTERVAL)
    assert [k for k, _ in lv._dead(1.75)] == ["p"]
    assert lv._dead(1.75 + 2 * INTERVAL + 0.2) == []  # its own last beat is too old now


def test_gaps_while_a_peer_has_no_member_id_do_not() -> None:
    """A worker joining its group (or rejoining) beats with no member id; it is busy then, so its gaps are
    not taken for a slow link."""
    lv = judge()
    beat(lv, "p", 0.0, member="-")
    lv.peers["p"].member = ""  # its first beats: no member id yet
    lv._read(b"p", json.dumps({"group": lv.group, "member": "", "instance": "p"}).encode(), 0.9)
    beat(lv, "p", 1.0)
    assert lv.counts.late == 0
    assert lv.peers["p"].dead_after(DEAD_AFTER, lv._cap_s, 1.0) == DEAD_AFTER


def test_a_gap_this_worker_s_own_beats_shared_does_not() -> None:
    """Both the peer's beats and this worker's own come back 0.8 s late together (the broker, the machine or
    this reader stalled): not the peer's lateness, so a peer killed after it is judged dead after
    ``dead_after_s``, not three times that gap."""
    lv = judge()
    for t in (0.0, 0.25, 0.5):
        beat(lv, "p", t)
        beat(lv, lv.key, t)
    lv._own_arrived(1.3)  # the reader's batch at 1.3 holds both (``_watch`` notes its own first)
    beat(lv, "p", 1.3)
    beat(lv, lv.key, 1.3)
    assert lv.counts.late == 0 and lv.counts.shared == 1
    assert lv.peers["p"].dead_after(DEAD_AFTER, lv._cap_s, 1.3) == DEAD_AFTER
    # the same gap with this worker's beats on time is the peer's: late
    lv2 = judge()
    dead = run(lv2, [0.0, 0.25, 0.5, 1.3], 10.0)
    assert lv2.counts.late == 1 and dead is not None and dead >= 1.3 + 2.4
