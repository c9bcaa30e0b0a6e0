"""A refused connection fails within seconds with an error naming the broker, the mechanism and the refusal.

Each case starts a real worker (in process, and once as the ``calmrun worker`` command) against the secured
broker with one thing wrong. The elapsed time is printed (``pytest -s``); it is not asserted beyond "it
ended" because timing belongs in bench/, but the test's own timeout bounds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from calmrun.agents import AgentRegistry, ModelRegistry
from calmrun.devkafka import DevKafka
from calmrun.devkafka.certs import make_certs
from calmrun.errors import KafkaAuthError
from calmrun.settings import load_settings
from calmrun.streams.worker import Worker
from tests.runtime_support import add_one, linear

ROOT = Path(__file__).resolve().parents[2]


def _case(secured: DevKafka, name: str, tmp: Path) -> dict[str, Any]:
    assert secured.secured is not None
    good = secured.client_settings("alice")
    ca = str(secured.secured.certs.ca)
    if name == "wrong password":
        good["security"]["sasl"]["password"] = "not-her-password"
        return good
    if name == "unknown user":
        good["security"]["sasl"]["username"] = "mallory"
        return good
    if name == "untrusted broker certificate":
        other = make_certs(tmp / "other-ca", ["alice"])
        good["security"]["tls"]["ca_file"] = str(other.ca)
        return good
    if name == "plaintext client":
        return {"bootstrap": secured.bootstrap}
    if name == "no client certificate":
        return {"bootstrap": secured.ssl_bootstrap, "security": {"protocol": "SSL", "tls": {"ca_file": ca}}}
    if name == "client certificate of another CA":
        other = make_certs(tmp / "rogue-ca", ["alice"]).users["alice"]
        tls = {"ca_file": ca, "cert_file": str(other.cert), "key_file": str(other.key)}
        return {"bootstrap": secured.ssl_bootstrap, "security": {"protocol": "SSL", "tls": tls}}
    raise AssertionError(name)


EXPECTED = {
    "wrong password": ("SASL_SSL/SCRAM-SHA-512", "authentication failed for user 'alice'"),
    "unknown user": ("SASL_SSL/SCRAM-SHA-512", "authentication failed for user 'mallory'"),
    "untrusted broker certificate": ("SASL_SSL/SCRAM-SHA-512", "certificate is not trusted"),
    "plaintext client": ("PLAINTEXT", "expects TLS or SASL"),
    "no client certificate": ("TLS", "no client certificate was sent"),
    "client certificate of another CA": ("mTLS", "a client certificate was refused"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
async def test_worker_fails_fast_with_what_was_refused(
    secured: DevKafka, prefix: str, name: str, tmp_path: Path
) -> None:
    settings = load_settings(kafka={**_case(secured, name, tmp_path), "prefix": prefix})
    worker = Worker(settings, [linear()], AgentRegistry({"add_one": add_one}), ModelRegistry({}))
    started = time.monotonic()
    with pytest.raises(KafkaAuthError) as caught:
        await worker.start()
    elapsed = time.monotonic() - started
    print(f"\n{name}: refused after {elapsed:.2f}s: {caught.value}")
    mechanism, detail = EXPECTED[name]
    assert caught.value.broker == settings.kafka.bootstrap
    assert caught.value.mechanism == mechanism
    assert detail in caught.value.detail
    assert secured.secured is not None
    for password in secured.secured.passwords.values():
        assert password not in str(caught.value)


def test_worker_command_exits_with_the_refusal(secured: DevKafka, prefix: str, tmp_path: Path) -> None:
    """``calmrun worker`` with a wrong password (given as env:NAME) exits 1 with one line, in seconds."""
    bad = _case(secured, "wrong password", tmp_path)
    bad["security"]["sasl"]["password"] = "env:CALMRUN_TEST_BAD_PW"
    cfg = tmp_path / "bad.yaml"
    models = yaml.safe_load((ROOT / "examples" / "triage" / "models.yaml").read_text())["models"]
    cfg.write_text(yaml.safe_dump({"kafka": {**bad, "prefix": prefix}, "models": models}))
    env = {**os.environ, "CALMRUN_TEST_BAD_PW": "wrong-and-secret", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "calmrun.cli",
            "worker",
            "-w",
            "examples/triage/workflow.yaml",
            "-c",
            str(cfg),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    print(f"\ncalmrun worker exited {proc.returncode} after {elapsed:.2f}s (process start included)")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    stderr = " ".join(proc.stderr.split())
    assert f"Kafka broker {secured.bootstrap} refused the connection (SASL_SSL/SCRAM-SHA-512)" in stderr
    assert "authentication failed for user 'alice'" in stderr
    assert "wrong-and-secret" not in proc.stdout + proc.stderr


async def test_tls_client_against_a_plaintext_broker(broker: str, secured: DevKafka, prefix: str) -> None:
    """The project's plain broker: a SASL_SSL client is told the listener does not speak TLS."""
    k = {**secured.client_settings("alice"), "bootstrap": broker, "prefix": prefix}
    worker = Worker(
        load_settings(kafka=k), [linear()], AgentRegistry({"add_one": add_one}), ModelRegistry({})
    )
    started = time.monotonic()
    with pytest.raises(KafkaAuthError) as caught:
        await worker.start()
    print(f"\nTLS to PLAINTEXT: refused after {time.monotonic() - started:.2f}s: {caught.value}")
    assert caught.value.broker == broker
    assert "does not speak TLS" in caught.value.detail
