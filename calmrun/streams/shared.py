"""What the rooms of one deciding worker all read, given to each in one argument.

Each room's constructor then names only its ports (``streams.ports``) and what is its own, so
``Worker.__init__`` reads as the pipeline. Nothing here is replaced once the worker is built; the ownership
table inside changes only through ``streams.partitions`` and ``streams.restore``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from calmrun.kafka.topics import Topics
from calmrun.redact import Redactor
from calmrun.settings import Settings
from calmrun.streams.ownership import Ownership
from calmrun.wire.codec import RecordCodec
from calmrun.workflow.registry import Definitions


@dataclass(frozen=True)
class Shared:
    """The worker's settings and the things derived from them that every room reads.

    Attributes:
        workflows: the definitions served, every version (``streams.versions``).
        ownership: what is owned now: partitions, their runs and writers (``streams.ownership``).
        redactor: hides secrets in what is written or logged (``calmrun.redact``).
        clock: wall-clock milliseconds; time enters the decider only through the inputs it stamps.
    """

    settings: Settings
    topics: Topics
    codec: RecordCodec
    workflows: Definitions
    ownership: Ownership
    redactor: Redactor
    clock: Callable[[], int]

    @property
    def n(self) -> int:
        """The partition count of every calmrun topic."""
        return self.settings.kafka.partitions
