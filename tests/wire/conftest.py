"""A real Schema Registry for the session: ``CALMRUN_REGISTRY_URL`` (its Confluent API), else Apicurio
Registry (``calmrun.devregistry``: built by ``make tools``, started here with in-memory storage)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from calmrun.devregistry import DevRegistry


@pytest.fixture(scope="session")
def registry_url() -> Iterator[str]:
    """The Confluent-compatible API of a real registry, shared by the session: tests name their subjects
    after their own topic prefix, so they never meet."""
    existing = os.environ.get("CALMRUN_REGISTRY_URL")
    if existing:
        yield existing.rstrip("/")
        return
    with DevRegistry(Path(tempfile.mkdtemp(prefix="calmrun-test-registry-"))) as registry:
        yield registry.url
