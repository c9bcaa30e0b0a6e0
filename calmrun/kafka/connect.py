"""How every Kafka client calmrun starts authenticates: settings -> aiokafka (and faust) keyword arguments.

One mapping, :func:`client_kwargs`, is applied to every producer, consumer and admin client (worker, CLI,
replay, cost reader); :func:`faust_credentials` maps the same settings onto faust's credential objects for
the cost aggregator. When a client cannot start, :func:`diagnose` opens one connection with the same
settings and turns what the broker refused into a :class:`~calmrun.errors.KafkaAuthError` naming the
broker, the mechanism and the refusal, instead of aiokafka's "Unable to bootstrap".

Secrets (the SASL password, a key password) are the value itself, ``env:NAME`` or ``file:PATH``; they are
read when a client is built and are never part of a message, a log line or a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ssl
from typing import Any

from aiokafka import errors as ke

from calmrun.errors import (
    BrokerUnavailableError,
    CalmrunError,
    ConfigError,
    KafkaAuthError,
    KafkaAuthorizationError,
)
from calmrun.secret import resolve_secret
from calmrun.settings import KafkaSettings, SecuritySettings

PROBE_TIMEOUT_S = 5.0
"""How long :func:`diagnose` waits for one broker to answer the handshake before calling it refused."""


def ssl_context(sec: SecuritySettings) -> ssl.SSLContext:
    """A client TLS context: the CA file (or the system store), an mTLS certificate, hostname checks.

    Raises:
        ConfigError: a file is missing or not PEM, or the key does not match the certificate.
    """
    tls = sec.tls
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"kafka.security.tls.ca_file {tls.ca_file}: {exc}") from None
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.cert_file is not None and tls.key_file is not None:
        password = (
            resolve_secret(tls.key_password, "kafka.security.tls.key_password") if tls.key_password else None
        )
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"kafka.security.tls: cannot load cert_file {tls.cert_file} "
                f"with key_file {tls.key_file}: {exc}"
            ) from None
    return ctx


def token_provider(ref: str) -> Any:
    """Import ``module:attr``: an ``AbstractTokenProvider`` instance, or a no-argument factory of one.

    Raises:
        ConfigError: the reference does not import or does not give a token provider.
    """
    from aiokafka.abc import AbstractTokenProvider

    module, _, attr = ref.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"kafka.security.sasl.oauth_token_provider {ref!r}: {exc}") from None
    if not isinstance(found, AbstractTokenProvider) and callable(found):
        found = found()
    if not isinstance(found, AbstractTokenProvider):
        raise ConfigError(
            f"kafka.security.sasl.oauth_token_provider {ref!r} is not an aiokafka.abc.AbstractTokenProvider"
        )
    return found


def client_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """The keyword arguments that make an aiokafka producer, consumer or admin client authenticate as
    configured (``security_protocol``, ``ssl_context``, ``sasl_*``); empty for PLAINTEXT.

    Raises:
        ConfigError: a secret, a file or the token provider cannot be read.
    """
    sec = k.security
    if sec.protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = ssl_context(sec)
    if sec.protocol.startswith("SASL_"):
        out["sasl_mechanism"] = sec.sasl.mechanism
        if sec.sasl.mechanism == "OAUTHBEARER":
            assert sec.sasl.oauth_token_provider is not None  # the settings validator requires it
            out["sasl_oauth_token_provider"] = token_provider(sec.sasl.oauth_token_provider)
        else:
            assert sec.sasl.password is not None  # the settings validator requires it
            out["sasl_plain_username"] = sec.sasl.username
            out["sasl_plain_password"] = resolve_secret(sec.sasl.password, "kafka.security.sasl.password")
    return out


def faust_credentials(k: KafkaSettings) -> dict[str, Any]:
    """The same settings as faust ``App`` options: ``broker_credentials`` (faust's SASL, OAuth or SSL
    credential object); empty for PLAINTEXT.

    faust is not a dependency of calmrun (which runs on aiokafka alone): install the ``faust`` extra
    (``pip install 'calmrun[faust]'``) to use this helper.

    Raises:
        ConfigError: faust is not installed, or a secret, a file or the token provider cannot be read.
    """
    try:
        import faust
        from faust.auth import OAuthCredentials
    except ImportError as exc:
        raise ConfigError(
            "faust_credentials needs faust-streaming, which calmrun does not install: "
            "pip install 'calmrun[faust]'"
        ) from exc

    sec = k.security
    if sec.protocol == "PLAINTEXT":
        return {}
    ctx = ssl_context(sec) if sec.protocol in ("SSL", "SASL_SSL") else None
    if sec.protocol == "SSL":
        assert ctx is not None
        return {"broker_credentials": faust.SSLCredentials(ctx)}
    if sec.sasl.mechanism == "OAUTHBEARER":
        assert sec.sasl.oauth_token_provider is not None
        return {
            "broker_credentials": OAuthCredentials(
                oauth_cb=token_provider(sec.sasl.oauth_token_provider), ssl_context=ctx
            )
        }
    assert sec.sasl.password is not None
    return {
        "broker_credentials": faust.SASLCredentials(
            username=sec.sasl.username,
            password=resolve_secret(sec.sasl.password, "kafka.security.sasl.password"),
            ssl_context=ctx,
            mechanism=sec.sasl.mechanism,
        )
    }


def mechanism(k: KafkaSettings) -> str:
    """How this client authenticates, in short: ``PLAINTEXT``, ``TLS``, ``mTLS``, ``SASL_SSL/PLAIN``..."""
    sec = k.security
    if sec.protocol == "SSL":
        return "mTLS" if sec.tls.cert_file else "TLS"
    if sec.protocol.startswith("SASL_"):
        return f"{sec.protocol}/{sec.sasl.mechanism}"
    return "PLAINTEXT"


async def diagnose(k: KafkaSettings, cause: BaseException | None = None) -> CalmrunError:
    """Why no client could start: one handshake per bootstrap broker with the configured security.

    Returns (does not raise) the error to raise: :class:`KafkaAuthError` when a broker answered but refused
    (a certificate not trusted or not sent, credentials refused, another protocol on that port), else
    :class:`BrokerUnavailableError`. Each probe is bounded by :data:`PROBE_TIMEOUT_S`.
    """
    from aiokafka.conn import create_conn

    try:
        kwargs = client_kwargs(k)
    except ConfigError as exc:
        return exc
    how = mechanism(k)
    unreachable: list[str] = []
    for server in k.bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        broker = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host,
                    int(port),
                    client_id=f"{k.client_id}-probe",
                    request_timeout_ms=int(PROBE_TIMEOUT_S * 1000),
                    **kwargs,
                ),
                PROBE_TIMEOUT_S,
            )
        except OSError as exc:
            if isinstance(exc, ssl.SSLError | ConnectionResetError | BrokenPipeError):
                return KafkaAuthError(broker, mechanism=how, detail=_tls_refusal(exc, k))
            unreachable.append(f"{broker}: {exc.strerror or exc}")
            continue
        except TimeoutError:
            return KafkaAuthError(
                broker,
                mechanism=how,
                detail=f"no handshake answer within {PROBE_TIMEOUT_S:.0f}s: "
                f"does this listener speak {k.security.protocol}?",
            )
        except Exception as exc:  # aiokafka's errors: classified below, never swallowed
            return KafkaAuthError(broker, mechanism=how, detail=_kafka_refusal(exc, k))
        try:
            from aiokafka.protocol.metadata import MetadataRequest

            await asyncio.wait_for(conn.send(MetadataRequest([])), PROBE_TIMEOUT_S)
        except Exception as exc:  # the listener accepted the handshake but not a request
            return KafkaAuthError(broker, mechanism=how, detail=_kafka_refusal(exc, k))
        finally:
            conn.close()
    if unreachable:
        return BrokerUnavailableError(k.bootstrap, "; ".join(unreachable))
    return BrokerUnavailableError(k.bootstrap, str(cause) if cause else "")


def _tls_refusal(exc: OSError, k: KafkaSettings) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the broker's certificate is not trusted ({exc.verify_message}); "
            "check kafka.security.tls.ca_file"
        )
    reason = getattr(exc, "reason", None) or str(exc)
    text = str(reason).upper()
    if "WRONG_VERSION" in text or "RECORD_LAYER" in text or "PACKET_LENGTH" in text:
        return f"TLS handshake failed ({reason}): this listener does not speak TLS"
    # alerts the broker sends about our certificate (none, unknown issuer, refused)
    if any(
        a in text for a in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "UNKNOWN_CA")
    ):
        sent = (
            "a client certificate was refused"
            if k.security.tls.cert_file
            else "no client certificate was sent"
        )
        return f"the broker requires a trusted client certificate and {sent} ({reason})"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return (
            f"the broker closed the connection during the TLS handshake ({type(exc).__name__}): "
            "this listener does not speak TLS, or expects another protocol"
        )
    return f"TLS failed: {reason}"


def _kafka_refusal(exc: BaseException, k: KafkaSettings) -> str:

    sec = k.security
    who = f"user {sec.sasl.username!r}" if sec.sasl.username else "the token"
    if isinstance(exc, ke.SaslAuthenticationFailed | ke.AuthenticationFailedError):
        return f"authentication failed for {who} with {sec.sasl.mechanism}: {exc}"
    if isinstance(exc, ke.UnsupportedSaslMechanismError):
        return str(exc)
    if isinstance(exc, ke.IllegalSaslStateError):
        return f"SASL handshake refused: {exc}"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError | ConnectionResetError):
        return _tls_refusal(cause, k)
    if sec.protocol == "PLAINTEXT":
        return (
            f"the broker closed the connection ({type(exc).__name__}): it expects TLS or SASL; "
            "set kafka.security.protocol"
        )
    if sec.protocol == "SSL" and not sec.tls.cert_file:
        return (
            f"the broker closed the connection after the TLS handshake ({type(exc).__name__}): "
            "it may require a client certificate (kafka.security.tls.cert_file) or SASL"
        )
    if sec.protocol == "SSL":
        return (
            f"the broker closed the connection after the TLS handshake ({type(exc).__name__}): "
            "it refused the client certificate, or expects SASL"
        )
    return f"the broker closed the connection ({type(exc).__name__}: {exc}): does it speak {sec.protocol}?"


_REFUSED_BY_ACL: dict[type[BaseException], str] = {
    ke.TopicAuthorizationFailedError: "topic",
    ke.GroupAuthorizationFailedError: "group",
    ke.TransactionalIdAuthorizationFailed: "transactional_id",
    ke.ClusterAuthorizationFailedError: "cluster",
}
AUTHORIZATION_ERRORS: tuple[type[BaseException], ...] = tuple(_REFUSED_BY_ACL)
"""aiokafka's errors for an operation an ACL refused."""


def authorization_error(exc: BaseException) -> CalmrunError | None:
    """aiokafka's refusal by an ACL as a :class:`KafkaAuthorizationError` naming the resource; else None."""
    for kind, resource in _REFUSED_BY_ACL.items():
        if isinstance(exc, kind):
            name = str(exc.args[0]) if exc.args else ""
            return KafkaAuthorizationError(resource, name, detail=type(exc).__name__)
    return None


async def start_error(k: KafkaSettings, exc: BaseException) -> CalmrunError:
    """What to raise when a client did not start: an ACL refusal, a refused connection or no broker."""
    return authorization_error(exc) or await diagnose(k, exc)


async def start_checked(client: Any, k: KafkaSettings) -> None:
    """Start an aiokafka producer or consumer; on failure stop it and raise what the broker refused.

    Raises:
        KafkaAuthError: a broker answered and refused TLS, SASL or the protocol.
        BrokerUnavailableError: no broker answers at the bootstrap address.
    """
    try:
        await client.start()
    except (ke.KafkaConnectionError, *AUTHORIZATION_ERRORS) as exc:
        with contextlib.suppress(Exception):
            await client.stop()
        raise (await start_error(k, exc)) from exc


TXN_RETRY_BACKOFF_MS = 5
"""The transactional producers' retry backoff (aiokafka's default is 100 ms): how soon a refused request of a
transaction (the coordinator loading, a produce request answered NOT_ENOUGH_REPLICAS) is sent again."""

TXN_BUSY_RETRY_MS = 1.0
"""How soon, by default, the first request of a transaction is sent again when the broker answers
CONCURRENT_TRANSACTIONS (``kafka.txn_busy_retry_ms``).

The worker begins a partition's next transaction as soon as the last one committed, and the broker is then
usually still writing that one's markers: the AddPartitionsToTxn that opens the next transaction is refused
until they are written, which on an idle broker takes about a millisecond. aiokafka 0.14 retries it after a
fixed 20 ms (``BACKOFF_OVERRIDE``, the Java client's KAFKA-5477 figure), whatever ``retry_backoff_ms``
says; librdkafka retries after its ``retry.backoff.ms``. 1 ms took about 3.5 ms off a three-step run one
at a time against 5 ms on a quiet machine, with no change in CPU per run (docs/performance.md, section 1)."""


def retry_busy_transactions_soon(ms: float = TXN_BUSY_RETRY_MS) -> None:
    """Make aiokafka retry a transaction refused with CONCURRENT_TRANSACTIONS after ``ms``.

    Process-wide (the value is a constant of aiokafka's sender module: the last worker made in a process
    sets it for all), idempotent; called where a transactional producer is made (``calmrun.streams.clients``).

    Raises:
        RuntimeError: the installed aiokafka has no such constant any more (its sender was rewritten):
            the worker would still be correct, only slower, so this says so at once instead.
    """
    from aiokafka.producer import sender

    if not hasattr(sender, "BACKOFF_OVERRIDE"):
        raise RuntimeError("aiokafka.producer.sender.BACKOFF_OVERRIDE is gone: see TXN_BUSY_RETRY_MS")
    sender.BACKOFF_OVERRIDE = ms / 1000
