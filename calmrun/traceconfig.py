"""The ``tracing:`` section of the settings (``Settings.tracing``); the tracing is ``calmrun.tracing``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TracingSettings(BaseModel):
    """OpenTelemetry traces of every run, exported with OTLP over HTTP (``docs/traces.md``).

    Off while ``endpoint`` is unset: no span is made, no header written, OpenTelemetry's SDK not imported.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces; unset: tracing off"
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="sent with every export (an API key of a hosted backend)"
    )
    sampling: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of runs traced; decided from the run's trace ID, so every worker and executor "
        "of a run decides alike",
    )
    service_name: str = Field("calmrun", description="pool executors report as <service_name>.pool.<pool>")
    include_content: bool = Field(
        False,
        description="put prompts and model responses on pydantic-ai's spans (they may hold personal data)",
    )
