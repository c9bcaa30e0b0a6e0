"""Test harness: one real KRaft broker for the session (or ``CALMRUN_BOOTSTRAP``), a topic prefix per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from calmrun.devkafka import DevKafka
from calmrun.localproc import free_port


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap address of a real broker: ``CALMRUN_BOOTSTRAP`` if set, else one started for this session.

    The started broker is stopped at session end even when tests fail; its data lives in a temp dir.
    """
    existing = os.environ.get("CALMRUN_BOOTSTRAP")
    if existing:
        yield existing
        return
    data = Path(tempfile.mkdtemp(prefix="calmrun-test-kafka-"))
    kafka = DevKafka(data_dir=data, port=free_port())
    kafka.start()
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's records."""
    return f"t{uuid4().hex[:10]}"
