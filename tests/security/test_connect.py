"""The security settings and their one mapping to client arguments (no broker: the secured tests use one)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from aiokafka.abc import AbstractTokenProvider

from calmrun.devkafka.certs import make_certs
from calmrun.errors import ConfigError
from calmrun.kafka.connect import client_kwargs, faust_credentials, mechanism
from calmrun.settings import load_settings


class StaticToken(AbstractTokenProvider):
    """An OAUTHBEARER token provider as a user plugs one in (``module:attr``)."""

    async def token(self) -> str:
        return "header.payload.signature"


def kafka(**security: Any) -> Any:
    return load_settings(kafka={"security": security}).kafka


def test_plaintext_adds_nothing() -> None:
    assert client_kwargs(kafka()) == {}
    assert faust_credentials(kafka()) == {}


def test_sasl_ssl_scram_with_the_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path, ["alice"])
    monkeypatch.setenv("KAFKA_PW", "s3cret")
    k = kafka(
        protocol="SASL_SSL",
        sasl={"mechanism": "SCRAM-SHA-512", "username": "alice", "password": "env:KAFKA_PW"},
        tls={"ca_file": str(certs.ca)},
    )
    got = client_kwargs(k)
    ctx = got.pop("ssl_context")
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert got == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "s3cret",
    }
    creds = faust_credentials(k)["broker_credentials"]
    assert (creds.username, creds.password, creds.mechanism.value) == ("alice", "s3cret", "SCRAM-SHA-512")
    assert creds.protocol.value == "SASL_SSL"
    assert "s3cret" not in repr(k) and "s3cret" not in str(k.model_dump())
    assert mechanism(k) == "SASL_SSL/SCRAM-SHA-512"


def test_mtls_from_files(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, ["alice"])
    alice = certs.users["alice"]
    k = kafka(
        protocol="SSL",
        tls={"ca_file": str(certs.ca), "cert_file": str(alice.cert), "key_file": str(alice.key)},
    )
    assert client_kwargs(k)["security_protocol"] == "SSL"
    assert faust_credentials(k)["broker_credentials"].protocol.value == "SSL"
    assert mechanism(k) == "mTLS"


def test_oauthbearer_token_provider_hook() -> None:
    k = kafka(
        protocol="SASL_SSL",
        sasl={"mechanism": "OAUTHBEARER", "oauth_token_provider": "tests.security.test_connect:StaticToken"},
    )
    got = client_kwargs(k)
    assert isinstance(got["sasl_oauth_token_provider"], StaticToken)
    assert got["sasl_mechanism"] == "OAUTHBEARER"
    with pytest.raises(ConfigError, match="AbstractTokenProvider"):
        client_kwargs(
            kafka(
                protocol="SASL_SSL",
                sasl={
                    "mechanism": "OAUTHBEARER",
                    "oauth_token_provider": "tests.security.test_connect:kafka",
                },
            )
        )


@pytest.mark.parametrize(
    ("security", "message"),
    [
        ({"protocol": "SASL_SSL", "sasl": {"username": "a"}}, "needs sasl.username and sasl.password"),
        ({"protocol": "SASL_SSL", "sasl": {"mechanism": "OAUTHBEARER"}}, "oauth_token_provider"),
        ({"protocol": "SSL", "tls": {"cert_file": "/x.crt"}}, "cert_file and key_file go together"),
        ({"protocol": "TLS"}, "security.protocol"),
        ({"protocol": "SASL_SSL", "sasl": {"mechanism": "GSSAPI"}}, "security.sasl.mechanism"),
    ],
)
def test_incomplete_settings_are_refused(security: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kafka(**security)


def test_an_unset_password_variable_is_named_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_PW", raising=False)
    k = kafka(protocol="SASL_PLAINTEXT", sasl={"username": "a", "password": "env:NOPE_PW"})
    with pytest.raises(ConfigError, match=r"\$NOPE_PW, which is not set"):
        client_kwargs(k)


def test_security_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALMRUN_KAFKA__SECURITY__PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("CALMRUN_KAFKA__SECURITY__SASL__USERNAME", "bob")
    monkeypatch.setenv("CALMRUN_KAFKA__SECURITY__SASL__PASSWORD", "file:/run/secrets/kafka")
    sec = load_settings().kafka.security
    assert (sec.protocol, sec.sasl.username) == ("SASL_PLAINTEXT", "bob")
