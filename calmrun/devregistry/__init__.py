"""A local Schema Registry: Apicurio Registry 2.x, whose Confluent-compatible API the wire tests use.

``python -m calmrun.devregistry build`` (``make tools``) builds the runnable application once, with Maven,
from ``io.apicurio:apicurio-registry-app`` on Maven Central (``pom.xml`` beside this file says how and what
it replaces) into a cache reused by every later start, as ``calmrun.devkafka`` caches the broker's jars.
``DevRegistry`` starts it on a free local port with in-memory (H2) storage; its Confluent API is
:attr:`DevRegistry.url` (``http://127.0.0.1:<port>/apis/ccompat/v7``). ``python -m calmrun.devregistry
start`` starts one in the background, ``stop`` ends it, ``run`` runs one in the foreground.

It has no authentication (Apicurio's needs an OpenID Connect server): it ignores the basic-auth header.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from calmrun.devkafka.jars import java_binary
from calmrun.errors import DevRegistryError
from calmrun.localproc import free_port, tail, terminate

APICURIO_VERSION = "2.4.2.Final"
"""The newest 2.x whose dependencies the Maven mirror here serves, given the two replacements in pom.xml
(2.5.11 needs apicurio-registry-utils-kafka 2.5.11, 2.6.x apicurio-registry-schema-util-provider: neither
is served)."""
QUARKUS_VERSION = "2.16.4.Final"
"""The Quarkus of that release (the apicurio-registry parent POM's ``quarkus.version``)."""
_JAVA_SOURCE = "NoDynamicProperties.java"
_RUNNER = "devregistry-1-runner.jar"


def default_cache_dir() -> Path:
    """Where the build is cached: ``$CALMRUN_REGISTRY_CACHE``, else ``$XDG_CACHE_HOME/calmrun/apicurio-<ver>``
    (``~/.cache`` when unset)."""
    env = os.environ.get("CALMRUN_REGISTRY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "calmrun" / f"apicurio-{APICURIO_VERSION}"


def build(cache_dir: Path | None = None) -> Path:
    """Build the registry once (``mvn package`` of ``pom.xml`` in the cache); later calls reuse it.

    Returns:
        The runner jar (its libraries in ``lib/`` beside it).

    Raises:
        DevRegistryError: Maven is missing or the build failed (the message ends with Maven's output).
    """
    cache = cache_dir or default_cache_dir()
    runner = cache / "src" / "target" / _RUNNER
    stamp = cache / ".complete"
    if stamp.exists() and runner.exists():
        return runner
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # test sessions started at once build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and runner.exists()):
            _maven_package(cache / "src", runner)
            stamp.write_text(APICURIO_VERSION + "\n")
    return runner


def _maven_package(src: Path, runner: Path) -> None:
    if shutil.which("mvn") is None:
        raise DevRegistryError("Maven is missing: install it (apt-get install maven) and retry")
    java = java_binary()
    here = resources.files("calmrun.devregistry")
    code = src / "src" / "main" / "java" / "local" / "calmrun" / "devregistry"
    code.mkdir(parents=True, exist_ok=True)
    (src / "pom.xml").write_text(here.joinpath("pom.xml").read_text())
    (code / _JAVA_SOURCE).write_text(here.joinpath(_JAVA_SOURCE).read_text())
    env = {**os.environ, "JAVA_HOME": str(Path(java).resolve().parents[1])}
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(src / "pom.xml"),
        "clean",
        "package",
        "-DskipTests",
        f"-Dapicurio.version={APICURIO_VERSION}",
        f"-Dquarkus.version={QUARKUS_VERSION}",
    ]
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not runner.exists():
        out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise DevRegistryError(f"building Apicurio Registry {APICURIO_VERSION} failed in {src}:\n{out}")


class DevRegistry:
    """One Apicurio Registry process on a free local port; ``start()``/``stop()`` or ``with``. Each start
    is empty unless ``storage`` names a directory: by default the storage lives and dies with the process.

    Args:
        data_dir: its log and pid file (a temporary directory by default).
        port: the HTTP port (a free one by default).
        tls: a server certificate chain and its key (PEM files): serve HTTPS only, on ``port``.
        storage: a directory for its H2 database, kept across restarts (by default it is in memory).
        heap_mb: the JVM's maximum heap.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        tls: tuple[Path, Path] | None = None,
        storage: Path | None = None,
        heap_mb: int = 384,
    ) -> None:
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="calmrun-registry-"))
        self.port = port or free_port()
        self.tls = tls
        self.storage = storage
        self.heap_mb = heap_mb
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The Confluent-compatible API, for ``wire.registry.url``."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/apis/ccompat/v7"

    @property
    def log(self) -> Path:
        return self.data_dir / "registry.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "registry.pid"

    def __enter__(self) -> DevRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self) -> list[str]:
        """The java command line that runs it (built first if need be)."""
        runner = build()
        props = {
            "quarkus.http.host": "127.0.0.1",
            # one connection is plenty for a test registry (the release's prod profile opens 20)
            "quarkus.datasource.jdbc.initial-size": "1",
            "quarkus.datasource.jdbc.min-size": "1",
            "quarkus.log.level": "WARN",
            'quarkus.log.category."io.apicurio".level': "WARN",
        }
        if self.tls is None:
            props["quarkus.http.port"] = str(self.port)
        else:
            props |= {
                "quarkus.http.ssl-port": str(self.port),
                "quarkus.http.port": str(free_port()),
                "quarkus.http.insecure-requests": "disabled",
                "quarkus.http.ssl.certificate.files": str(self.tls[0]),
                "quarkus.http.ssl.certificate.key-files": str(self.tls[1]),
            }
        return [
            java_binary(),
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # starts faster; a test registry answers few calls
            *(f"-D{k}={v}" for k, v in props.items()),
            "-jar",
            str(runner),
        ]

    def start(self, timeout: float = 120.0) -> None:
        """Build if needed, start, and wait until ``GET /subjects`` answers.

        Raises:
            DevRegistryError: it did not build, exited, or did not answer within ``timeout``.
        """
        cmd = self.command()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.storage is not None:  # the release's prod profile reads the URL from this variable
            self.storage.mkdir(parents=True, exist_ok=True)
            env["REGISTRY_DATASOURCE_URL"] = f"jdbc:h2:file:{self.storage.resolve() / 'registry'}"
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(  # cwd: CI finds one left behind by its data dir
                cmd,
                cwd=self.data_dir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DevRegistryError(f"the registry exited with {self._proc.returncode}:\n{tail(self.log)}")
            if self.answers():
                return
            time.sleep(0.5)
        self.stop()
        raise DevRegistryError(
            f"the registry did not answer at {self.url} within {timeout:.0f}s:\n{tail(self.log)}"
        )

    def answers(self) -> bool:
        """Whether ``GET /subjects`` answers 200 now (TLS: without checking the certificate)."""
        ctx = None
        if self.tls:  # only asks whether it is up
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with urllib.request.urlopen(self.url + "/subjects", timeout=5, context=ctx) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """End the process started here (or the one its pid file names, from ``start`` in a shell)."""
        pid = self._proc.pid if self._proc is not None else running_pid(self.pid_file)
        if pid is not None and (self._proc is None or self._proc.poll() is None):
            terminate(pid, 15)
        self._proc = None
        self.pid_file.unlink(missing_ok=True)


def running_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` when that process is still this registry, else None."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if _RUNNER.encode() in cmdline else None
