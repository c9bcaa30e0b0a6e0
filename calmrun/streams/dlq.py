"""The quarantine: what a dead-letter record holds, so an operator can see the cause and re-drive it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DlqRecord(BaseModel):
    """A record that could not be processed, or the task of a run quarantined after its last attempt.

    The original bytes, key and headers are kept as they were read, so a redrive can re-inject them.
    """

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(description="poison (the record itself is bad) or quarantined (a run gave up)")
    error_type: str
    error: str
    traceback: str | None = None
    workflow: str | None = None
    run_id: str | None = None
    step: str | None = None
    attempt: int = 0
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: dict[str, bytes] = Field(default_factory=dict)
    at_ms: int
