"""OpenTelemetry traces of every run (``docs/traces.md``): one trace per run, across workers and restarts.

The shell holds a ``Tracing`` (the port) and calls its hooks; ``tracing_for`` gives the one the settings ask
for: ``NO_TRACING`` while ``tracing.endpoint`` is unset (OpenTelemetry's SDK is then never imported), else
an ``OtelTracing`` exporting with OTLP over HTTP. Install the ``tracing`` extra to switch it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calmrun.errors import ConfigError
from calmrun.tracing.ids import TRACEPARENT, SpanRef, parse_traceparent, run_ids
from calmrun.tracing.port import NO_TRACING, Tracing

if TYPE_CHECKING:
    from calmrun.settings import Settings

__all__ = ["NO_TRACING", "TRACEPARENT", "SpanRef", "Tracing", "parse_traceparent", "run_ids", "tracing_for"]


def tracing_for(settings: Settings, *, pool: str | None = None, role: str = "worker") -> Tracing:
    """The tracing of one worker or pool executor, as ``settings.tracing`` says.

    Args:
        settings: ``tracing`` and ``kafka.prefix``.
        pool: the pool this process executes (``"default"`` for a deciding worker, None if it only decides).
        role: ``"worker"`` or ``"pool"``; a pool executor's ``service.name`` ends with ``.pool.<name>``.

    Raises:
        ConfigError: ``tracing.endpoint`` is set but the ``tracing`` extra is not installed.
    """
    t = settings.tracing
    if t.endpoint is None:
        return NO_TRACING
    try:
        from calmrun.tracing.otel import OtelTracing
    except ImportError as exc:
        raise ConfigError(
            f"tracing.endpoint is set but OpenTelemetry's SDK is missing ({exc.name}): "
            "pip install 'calmrun[tracing]'"
        ) from exc
    service = t.service_name if role == "worker" else f"{t.service_name}.pool.{pool}"
    return OtelTracing(settings, pool=pool, service=service)
