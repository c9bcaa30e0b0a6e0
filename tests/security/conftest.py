"""A secured broker for the session (SASL_SSL + mTLS + ACLs), started by the project's launcher.

Certificates are made for this run (trustme) in a temp dir; the SCRAM passwords are random. ``admin`` is
the super user; ``alice`` (team A) and ``bob`` (team B) may do only what ACLs allow them.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calmrun.devkafka import DevKafka, Secured
from calmrun.devkafka.certs import make_certs
from calmrun.localproc import free_port
from calmrun.settings import Settings, load_settings

USERS = ("admin", "alice", "bob")


@pytest.fixture(scope="package")
def secured() -> Iterator[DevKafka]:
    """The secured broker, for tests/security only: stopped when they are done, so that the tests after
    them (the fault tests among them) do not share the two cores with a second broker."""
    data = Path(tempfile.mkdtemp(prefix="calmrun-test-secured-"))
    certs = make_certs(data / "certs", USERS)
    passwords = {u: secrets.token_hex(12) for u in USERS}
    kafka = DevKafka(data_dir=data / "kafka", port=free_port(), secured=Secured(certs, passwords))
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


def settings_as(kafka: DevKafka, user: str, prefix: str, via: str = "sasl", **more: Any) -> Settings:
    """Settings with which ``user`` reaches the secured broker under ``prefix``."""
    k = {**kafka.client_settings(user, via=via), "prefix": prefix}  # type: ignore[arg-type]
    return load_settings(kafka=k, worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1}, **more)
