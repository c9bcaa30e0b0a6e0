"""A real single-node Apache Kafka (KRaft) for development, tests and the demo, started without Docker.

The broker jars come from Maven Central through ``mvn dependency:copy-dependencies`` (the pom beside
this file) into a cache directory reused by every later start. One combined broker+controller binds to
127.0.0.1; a PID file in the data directory lets ``stop`` end exactly that process.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from calmrun.devkafka.certs import Certs
from calmrun.devkafka.jars import (
    _LOG4J2,
    KAFKA_VERSION,
    LOG4J_VERSION,
    _run,
    default_cache_dir,
    fetch_jars,
    java_binary,
)
from calmrun.errors import DevKafkaError
from calmrun.localproc import free_port, tail, terminate

__all__ = [
    "KAFKA_VERSION",
    "LOG4J_VERSION",
    "DevKafka",
    "Secured",
    "answers_metadata",
    "default_cache_dir",
    "fetch_jars",
    "java_binary",
]


SCRAM_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")


@dataclass(frozen=True)
class Secured:
    """The secured mode: certificates (see :mod:`calmrun.devkafka.certs`) and SASL users.

    Every user in ``passwords`` can log in with SCRAM-SHA-512, SCRAM-SHA-256 (credentials written at
    format time) and PLAIN; every user in ``certs.users`` with its client certificate. ``super_users``
    bypass ACLs (the broker's own certificate always does); everyone else needs ACLs.
    """

    certs: Certs
    passwords: dict[str, str]
    super_users: tuple[str, ...] = ("admin",)


@dataclass
class DevKafka:
    """One local KRaft broker+controller bound to 127.0.0.1.

    Attributes:
        data_dir: storage, config, log and PID file of this broker.
        port: the client port: PLAINTEXT, or SASL_SSL in secured mode; ``controller_port`` is the KRaft
            quorum port.
        secured: when set, no PLAINTEXT listener: SASL_SSL on ``port``, SSL requiring client certificates
            on ``ssl_port`` (also the inter-broker and controller listener), the StandardAuthorizer with
            ``allow.everyone.if.no.acl.found=false``.
    """

    data_dir: Path
    port: int = 9092
    controller_port: int = 0
    heap: str = "512m"
    cache_dir: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    secured: Secured | None = None
    ssl_port: int = 0
    cluster_id: str | None = None
    """The KRaft cluster ID the storage is formatted with (a random one when None); the nodes of one
    cluster share it (see :mod:`calmrun.devkafka.cluster`)."""

    @property
    def bootstrap(self) -> str:
        """The client listener: PLAINTEXT, or SASL_SSL in secured mode."""
        return f"127.0.0.1:{self.port}"

    @property
    def ssl_bootstrap(self) -> str:
        """The mTLS listener of the secured mode."""
        return f"127.0.0.1:{self.ssl_port}"

    def client_settings(
        self, user: str, *, via: Literal["sasl", "mtls"] = "sasl", mechanism: str = "SCRAM-SHA-512"
    ) -> dict[str, Any]:
        """``kafka`` settings (bootstrap and security) with which ``user`` reaches this secured broker.

        The SASL password is given as is: pass ``password="env:NAME"`` style settings in real configs.
        """
        sec = self.secured
        if sec is None:
            return {"bootstrap": self.bootstrap}
        if via == "mtls":
            cert = sec.certs.users[user]
            tls = {"ca_file": str(sec.certs.ca), "cert_file": str(cert.cert), "key_file": str(cert.key)}
            return {"bootstrap": self.ssl_bootstrap, "security": {"protocol": "SSL", "tls": tls}}
        return {
            "bootstrap": self.bootstrap,
            "security": {
                "protocol": "SASL_SSL",
                "sasl": {"mechanism": mechanism, "username": user, "password": sec.passwords[user]},
                "tls": {"ca_file": str(sec.certs.ca)},
            },
        }

    def _secured_properties(self, sec: Secured) -> dict[str, str]:
        plain_users = " ".join(f'user_{u}="{p}"' for u, p in sec.passwords.items())
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        supers = ";".join(f"User:{u}" for u in ("broker", *sec.super_users))
        listeners = (
            f"SASL_SSL://127.0.0.1:{self.port},SSL://127.0.0.1:{self.ssl_port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}"
        )
        props = {
            "listeners": listeners,
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{self.port},SSL://127.0.0.1:{self.ssl_port}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "SSL",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(sec.certs.broker.bundle),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(sec.certs.ca),
            "ssl.endpoint.identification.algorithm": "https",
            "listener.name.ssl.ssl.client.auth": "required",
            "listener.name.controller.ssl.client.auth": "required",
            # CN=alice,OU=...,O=... -> User:alice
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+),.*$/$1/,DEFAULT",
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": ",".join((*SCRAM_MECHANISMS, "PLAIN")),
            "listener.name.sasl_ssl.plain.sasl.jaas.config": (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
            ),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": supers,
        }
        for mech in SCRAM_MECHANISMS:
            props[f"listener.name.sasl_ssl.{mech.lower()}.sasl.jaas.config"] = scram
        return props

    def _probe_kwargs(self) -> dict[str, Any]:
        """How the readiness probe connects: PLAINTEXT, or mTLS with the broker's own certificate."""
        if self.secured is None:
            return {}
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.secured.certs.ca))
        broker = self.secured.certs.broker
        ctx.load_cert_chain(str(broker.cert), str(broker.key))
        return {"security_protocol": "SSL", "ssl_context": ctx}

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def properties(self) -> dict[str, str]:
        """Broker settings for a test box: one replica, small segments, fast compaction, transactions."""
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "log.segment.bytes": str(1024 * 1024),
            "log.cleaner.backoff.ms": "1000",
            "log.cleaner.min.compaction.lag.ms": "0",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.retention.check.interval.ms": "10000",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
        }
        if self.secured is not None:
            props.update(self._secured_properties(self.secured))
        props.update(self.extra)
        return props

    def running_pid(self) -> int | None:
        """The PID of this broker if its PID file names a live Java process, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"kafka.Kafka" in cmdline else None

    def start(self, *, timeout: float = 90.0, fresh: bool = False) -> None:
        """Fetch jars if needed, format storage on first use, start the broker and wait until it answers.

        Raises:
            DevKafkaError: Java or Maven missing and not installable, a port taken, or no answer in time.
        """
        proc = self.launch(fresh=fresh)
        self.wait_ready(proc, timeout=timeout)

    def launch(self, *, fresh: bool = False) -> subprocess.Popen[bytes]:
        """Format storage on first use and start the process, without waiting for it to answer (the nodes
        of a KRaft quorum answer only once a majority runs).

        Raises:
            DevKafkaError: Java or Maven missing and not installable, or formatting failed.
        """
        if self.running_pid():
            raise DevKafkaError(f"a broker from {self.data_dir} already runs (pid {self.running_pid()})")
        if fresh and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        if not self.controller_port:
            self.controller_port = free_port()
        if self.secured is not None and not self.ssl_port:
            self.ssl_port = free_port()
        java = java_binary()
        jars = fetch_jars(self.cache_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        config.chmod(0o600)  # the secured mode's PLAIN passwords
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.log_file, level="INFO"))
        classpath = f"{jars}/*"
        base = [java, f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
        if not (Path(self.properties()["log.dirs"]) / "meta.properties").exists():
            cluster_id = self.cluster_id or "-"
            while cluster_id.startswith("-"):  # a leading '-' would read as an option of StorageTool
                cluster_id = new_cluster_id()
            scram: list[str] = []
            for user, password in self.secured.passwords.items() if self.secured else ():
                for mech in SCRAM_MECHANISMS:
                    scram += ["--add-scram", f"{mech}=[name={user},password={password}]"]
            _run(
                [*base, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config), *scram],
                "formatting KRaft storage",
            )
        with open(self.data_dir / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                [
                    *base,
                    f"-Xmx{self.heap}",
                    f"-Xms{self.heap}",
                    "-XX:+UseG1GC",
                    "-Djava.awt.headless=true",
                    "kafka.Kafka",
                    str(config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], *, timeout: float = 90.0) -> None:
        """Wait until the process started by ``launch`` answers a metadata request; stop it if it does not.

        Raises:
            DevKafkaError: the process exited, or gave no answer within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DevKafkaError(
                    f"broker exited with {proc.returncode}; see {self.log_file}\n"
                    + tail(self.data_dir / "stdout.log")
                )
            probe = self.ssl_bootstrap if self.secured else self.bootstrap
            if answers_metadata(probe, **self._probe_kwargs()):
                return
            time.sleep(0.3)
        self.stop()
        raise DevKafkaError(
            f"broker did not answer at {self.bootstrap} within {timeout:.0f}s; see {self.log_file}"
        )

    def stop(self, *, timeout: float = 30.0) -> bool:
        """End exactly the process named in the PID file and wait for it; kill -9 after ``timeout``.

        Returns:
            True when a broker was running and has stopped.
        """
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)
        return True


def new_cluster_id() -> str:
    """A random KRaft cluster ID (a URL-safe base64 UUID, as ``kafka-storage.sh random-uuid`` prints)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def answers_metadata(bootstrap: str, timeout: float = 5.0, **security: Any) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request (not just a TCP connect).

    ``security``: aiokafka's ``security_protocol``, ``ssl_context``... for a secured listener.
    """
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            pass
    except OSError:
        return False

    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **security
        )
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.describe_cluster(), timeout)
            return True
        except Exception:  # any failure here only means "not ready yet"
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())
