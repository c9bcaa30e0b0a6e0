"""Certificates for the secured development broker, made on the spot with ``trustme`` (a dev dependency).

One throw-away CA signs the broker's certificate (for 127.0.0.1 and localhost) and one client certificate
per user, whose common name is the user's name: the broker maps ``CN=alice,...`` to ``User:alice``.
Nothing here is ever committed; every test run makes its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from calmrun.errors import DevKafkaError


@dataclass(frozen=True)
class ClientCert:
    """One user's PEM files: ``cert`` (the chain) and ``key`` for Python clients, ``bundle`` (key then
    chain) for a Kafka PEM key store."""

    cert: Path
    key: Path
    bundle: Path


@dataclass(frozen=True)
class Certs:
    """The CA file and the certificates of the broker and of each user, under one directory."""

    ca: Path
    broker: ClientCert
    users: dict[str, ClientCert]


def load_certs(folder: Path, users: Iterable[str], *, broker_name: str = "broker") -> Certs | None:
    """The certificates :func:`make_certs` wrote into ``folder`` before, or None when any is missing."""

    def paths(name: str) -> ClientCert:
        return ClientCert(folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.pem")

    certs = Certs(folder / "ca.pem", paths(broker_name), {u: paths(u) for u in users})
    every = [certs.ca, *(p for c in (certs.broker, *certs.users.values()) for p in (c.cert, c.key, c.bundle))]
    return certs if all(p.exists() for p in every) else None


def make_certs(
    folder: Path,
    users: Iterable[str],
    *,
    broker_name: str = "broker",
    hosts: Iterable[str] = (),
    mode: int = 0o600,
) -> Certs:
    """Write a fresh CA, a broker certificate and one client certificate per user into ``folder``.

    The broker certificate names 127.0.0.1, localhost and ``hosts`` (a compose service name...). Keys are
    unencrypted PKCS#8 (what Kafka's PEM key store reads); files get ``mode`` (owner only by default; a
    container running as another user needs 0o644).

    Raises:
        DevKafkaError: trustme (the ``dev`` extra) is not installed.
    """
    try:
        import trustme
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:
        raise DevKafkaError(
            "the secured broker makes its certificates with trustme: pip install -e '.[dev]'"
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="calmrun devkafka")
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    def issue(name: str, *identities: str) -> ClientCert:
        leaf = ca.issue_cert(*(identities or (name,)), common_name=name)
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
        pkcs8 = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        paths = ClientCert(folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.pem")
        for path, data in ((paths.cert, chain), (paths.key, pkcs8), (paths.bundle, pkcs8 + chain)):
            path.write_bytes(data)
            path.chmod(mode)
        return paths

    broker = issue(broker_name, "127.0.0.1", "localhost", *hosts)
    return Certs(ca_file, broker, {name: issue(name) for name in users})
