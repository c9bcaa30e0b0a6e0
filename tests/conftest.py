"""Test harness: one real KRaft broker for the session (or ``CALMRUN_BOOTSTRAP``), a topic prefix per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

import pytest

from calmrun.devkafka import DevKafka
from calmrun.localproc import free_port
from tests.fault_bound import FaultBound

if TYPE_CHECKING:
    from tests.runtime_support import WorkerProcs


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(FaultBound(), "calmrun-fault-bound")  # the fault marker's bound


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


@pytest.fixture
def procs(broker: str, prefix: str, tmp_path: Path) -> Iterator[WorkerProcs]:
    """Worker processes of this test (``tests.worker_proc``); every one still alive is killed when the test
    ends, however it ends."""
    from tests.runtime_support import WorkerProcs

    p = WorkerProcs(broker, prefix, tmp_path)
    try:
        yield p
    finally:
        p.kill_all()
