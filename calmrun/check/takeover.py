"""Deploying a new version with runs in flight: could it take them over, which versions are still needed.

- ``takeover`` re-decides the recorded history of each run (in flight, and optionally the last finished
  ones) against a new definition with the recorded-replay machinery: a run whose decisions all come out
  the same "can take over"; otherwise it "must stay pinned", and the first divergent decision says why.
- ``versions_in_flight`` counts the runs not finished per workflow and pinned version (from the state
  topic), so an operator knows when the workers of an old version may be stopped.
- ``group_serves`` reads what the workers of the group serve from their group membership (each member's
  metadata, published by ``streams.versions.VersionAssignor``), which is how ``calmrun status`` can say
  that no worker serves the version a run waits for.
- ``send_migrations`` sends the ``migrate`` command for runs that converge.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from aiokafka.errors import KafkaError

from calmrun.client import Client
from calmrun.errors import CalmrunError
from calmrun.kafka.topics import admin_client
from calmrun.replay.recorded import Divergence, replay_recorded
from calmrun.replay.snapshot import Snapshot
from calmrun.settings import Settings
from calmrun.streams.versions import ASSIGNOR, pin, read_member_data
from calmrun.workflow.definition import WorkflowDef
from calmrun.workflow.events import RunCommand
from calmrun.workflow.registry import Pin, pin_of, version_order
from calmrun.workflow.state import RunState

CAN_TAKE_OVER = "can take over"
MUST_STAY = "must stay pinned"
ON_IT = "on it already"


@dataclass(frozen=True)
class Takeover:
    """The verdict for one run: could ``new`` decide it from here on as it was decided so far?"""

    run_id: str
    pinned: Pin
    status: str
    seq: int
    verdict: str  # CAN_TAKE_OVER, MUST_STAY or ON_IT
    divergence: Divergence | None = None
    error: str | None = None

    @property
    def in_flight(self) -> bool:
        return self.status == "running"

    def why(self) -> str:
        if self.error is not None:
            return self.error
        d = self.divergence
        if d is None:
            return ""
        return f"decision {d.decision} ({d.input}), seq {d.seq}: {d.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.pinned.workflow,
            "version": self.pinned.version,
            "digest": self.pinned.digest,
            "status": self.status,
            "seq": self.seq,
            "verdict": self.verdict,
            "first_divergence": None
            if self.divergence is None
            else {
                "decision": self.divergence.decision,
                "input": self.divergence.input,
                "seq": self.divergence.seq,
                "recorded": self.divergence.original,
                "new": self.divergence.replay,
                "reason": self.divergence.reason,
            },
            "error": self.error,
        }


def takeover(new: WorkflowDef, snapshots: Iterable[Snapshot], *, finished: int = 0) -> list[Takeover]:
    """The verdict of ``new`` for each run of its workflow in flight, and the last ``finished`` finished.

    A run is re-decided from its request with ``new`` deciding every input (a migration recorded in its
    history included), and compared decision by decision with what is recorded.
    """
    mine = [s for s in snapshots if s.workflow == new.name and s.state is not None and s.events]
    flying = [s for s in mine if s.state is not None and not s.state.is_terminal()]
    done = sorted(
        (s for s in mine if s.state is not None and s.state.is_terminal()), key=lambda s: s.requested_ms
    )
    chosen = flying + (done[-finished:] if finished > 0 else [])
    out = []
    for snap in sorted(chosen, key=lambda s: (s.requested_ms, s.run_id)):
        state = snap.state
        assert state is not None
        where = pin(state)
        if (state.version, state.digest) == (new.version, new.digest):
            out.append(Takeover(snap.run_id, where, state.status, state.seq, ON_IT))
            continue
        try:
            r = replay_recorded(new, snap)
        except CalmrunError as exc:
            out.append(Takeover(snap.run_id, where, state.status, state.seq, MUST_STAY, error=str(exc)))
            continue
        verdict = CAN_TAKE_OVER if r.divergence is None else MUST_STAY
        out.append(Takeover(snap.run_id, where, state.status, state.seq, verdict, r.divergence))
    return out


def versions_in_flight(states: Iterable[RunState]) -> dict[str, dict[Pin, int]]:
    """Per workflow: the pinned versions of the runs not finished, and how many runs each."""
    counts: dict[str, collections.Counter[Pin]] = collections.defaultdict(collections.Counter)
    for s in states:
        if not s.is_terminal():
            counts[s.workflow][pin(s)] += 1
    return {
        wf: dict(sorted(c.items(), key=lambda kv: version_order(kv[0].version)))
        for wf, c in sorted(counts.items())
    }


async def group_serves(settings: Settings) -> list[Pin] | None:
    """What the workers of the group serve, from their membership; None when that cannot be known (no
    answer, or a group on the plain range assignor, whose members publish nothing)."""
    members = await group_members(settings)
    return None if members is None else sorted({p for m in members for p in m})


async def group_members(settings: Settings) -> list[list[Pin]] | None:
    """What each worker of the group serves (see ``group_serves``)."""
    try:
        async with admin_client(settings.kafka, "versions") as admin:
            (resp,) = await admin.describe_consumer_groups([settings.group_id])
    except (KafkaError, CalmrunError):
        return None
    group = resp.groups[0]
    if group[4] != ASSIGNOR:
        return [] if group[2] in ("Empty", "Dead") else None
    members: list[list[Pin]] = []
    for m in group[5]:
        try:
            meta = ConsumerProtocolMemberMetadata.decode(m[-2])
        except Exception:  # a member's metadata we cannot read: it serves nothing we know of
            meta = None
        members.append(read_member_data(meta.user_data)[0] if meta is not None else [])
    return members


def waiting_for(state: RunState, serves: Sequence[Pin] | None) -> str | None:
    """The line ``calmrun status`` prints for a run no worker of the group can decide, else None."""
    if state.is_terminal() or serves is None:
        return None
    need = pin(state)
    if any(need.served_by(s) for s in serves):
        return None
    digest = f" ({state.digest})" if state.digest else ""
    return (
        f"waiting for version {state.version}{digest} of workflow {state.workflow}: "
        "no worker of this group serves it"
    )


def unready_for(new: WorkflowDef, members: list[list[Pin]] | None) -> str | None:
    """Why migrating to ``new`` now would fail (a worker that lacks it parks the command), else None."""
    if not members:
        return "no worker of the group publishes what it serves (none running?)"
    lacking = sum(1 for served in members if not any(pin_of(new).served_by(s) for s in served))
    if lacking:
        return (
            f"{lacking} of the group's {len(members)} workers do not serve {pin_of(new)}: a migrate they "
            "receive would be parked; start every worker with the new version first"
        )
    return None


async def send_migrations(
    settings: Settings, new: WorkflowDef, runs: Iterable[Takeover], *, by: str | None = None
) -> list[str]:
    """Send ``migrate`` (to ``new``) for each run that can be taken over and is in flight; their IDs."""
    sent = []
    async with Client(settings) as c:
        for t in runs:
            if t.verdict != CAN_TAKE_OVER or not t.in_flight:
                continue
            cmd = RunCommand(
                command="migrate",
                run_id=t.run_id,
                workflow=new.name,
                by=by,
                to_version=new.version,
                to_digest=new.digest,
                checked_seq=t.seq,
            )
            await c.producer.send_and_wait(c.topics.requests, c.codec.encode(cmd), key=t.run_id.encode())
            sent.append(t.run_id)
    return sent
