"""A real Jaeger for the session (``calmrun.devjaeger``: built by ``make tools``, started here)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from calmrun.devjaeger import DevJaeger


@pytest.fixture(scope="session")
def jaeger() -> Iterator[DevJaeger]:
    """Jaeger 1.75.0 with memory storage on free ports: OTLP/HTTP in, the query API out."""
    with DevJaeger() as running:
        yield running
