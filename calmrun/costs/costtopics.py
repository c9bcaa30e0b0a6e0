"""The cost aggregator's topics: names under one prefix, and their creation."""

from __future__ import annotations

import json
from dataclasses import dataclass

from calmrun.settings import Settings

Key = tuple[str, str, str, int]
"""A total: (dimension, value, window, bucket start ms); the source partition is added on the wire."""


@dataclass(frozen=True)
class CostTopics:
    """Names under one prefix: the aggregator's source, its output topics and its consumer group."""

    prefix: str

    @property
    def events(self) -> str:
        return f"{self.prefix}.runs.events"

    @property
    def totals(self) -> str:
        return f"{self.prefix}.costs.totals"

    @property
    def tenants(self) -> str:
        return f"{self.prefix}.costs.tenants"

    def group(self, settings: Settings) -> str:
        return settings.costs.app_id or f"{self.prefix}-costs"

    def transactional_id(self, partition: int) -> str:
        """One per source partition: a new owner of the partition fences the previous one."""
        return f"{self.prefix}.costs.tx.{partition}"


async def ensure_cost_topics(settings: Settings) -> list[str]:
    """Create the compacted output topics (same partition count as calmrun's); idempotent."""
    from calmrun.kafka.topics import create_topics

    topics = CostTopics(settings.kafka.prefix)
    compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "600000"}
    return await create_topics(
        settings.kafka, {topics.totals: compact, topics.tenants: compact, topics.events: {}}, "costs"
    )


def encode_key(key: Key, partition: int) -> bytes:
    """The ``<prefix>.costs.totals`` key: JSON ``[dim, value, window, start_ms, partition]``."""
    return json.dumps([*key, partition], separators=(",", ":")).encode()


def decode_key(raw: bytes) -> tuple[Key, int]:
    dim, value, window, start, partition = json.loads(raw)
    return (str(dim), str(value), str(window), int(start)), int(partition)
