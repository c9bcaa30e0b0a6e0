"""Replay: offsets into a shadow namespace, recorded runs re-decided, runs re-executed live and compared."""

from typing import TYPE_CHECKING, Any

from calmrun.errors import ReplayArgumentError, ReplayError, SnapshotError
from calmrun.replay.recorded import (
    BatchRecorded,
    Divergence,
    RecordedReplay,
    pick_definition,
    replay_given,
    replay_recorded,
    replay_recorded_many,
)
from calmrun.replay.reproduce import REPLAYED_FROM, OffsetReplay, replay_offsets
from calmrun.replay.snapshot import Snapshot, fetch_snapshot, fetch_snapshots, load_snapshot

if TYPE_CHECKING:
    from calmrun.replay.live import LiveReplay, replay_live

__all__ = [
    "REPLAYED_FROM",
    "BatchRecorded",
    "Divergence",
    "LiveReplay",
    "OffsetReplay",
    "RecordedReplay",
    "ReplayArgumentError",
    "ReplayError",
    "Snapshot",
    "SnapshotError",
    "fetch_snapshot",
    "fetch_snapshots",
    "load_snapshot",
    "pick_definition",
    "replay_given",
    "replay_live",
    "replay_offsets",
    "replay_recorded",
    "replay_recorded_many",
]


def __getattr__(name: str) -> Any:
    """Live replay runs agents, so it is imported only when asked for (the CLI starts without pydantic-ai)."""
    if name in ("LiveReplay", "replay_live"):
        from calmrun.replay import live

        return getattr(live, name)
    raise AttributeError(f"module 'calmrun.replay' has no attribute {name!r}")
