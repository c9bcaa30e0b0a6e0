"""Fetching the broker: Java and Maven (installed with apt-get when missing and root), and the Kafka jars
resolved from Maven Central by ``mvn dependency:copy-dependencies`` into a cache reused by every start."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from calmrun.errors import DevKafkaError

KAFKA_VERSION = "4.4.0"
"""Newest 4.x release that aiokafka 0.14 and faust-streaming 0.15.3 were proven against here."""
LOG4J_VERSION = "2.24.3"


def default_cache_dir() -> Path:
    """Where the broker jars are cached: ``$CALMRUN_KAFKA_CACHE`` or ``$XDG_CACHE_HOME/calmrun``."""
    env = os.environ.get("CALMRUN_KAFKA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "calmrun" / f"kafka-{KAFKA_VERSION}"


def _run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise DevKafkaError(f"{what} failed ({' '.join(cmd[:3])}...):\n" + "\n".join(tail))
    return proc  # type: ignore[no-any-return]


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise DevKafkaError(
            f"{', '.join(packages)} missing: install it (apt-get install {' '.join(packages)})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-q", *packages], f"apt-get install {packages}", env=env)


def java_binary() -> str:
    """Return a Java 17+ executable, installing openjdk-17-jre-headless with apt-get when there is none."""
    java_home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(java_home) / "bin" / "java")] if java_home else []
    found = shutil.which("java")
    if found:
        candidates.append(found)
    for java in candidates:
        if _java_major(java) >= 17:
            return java
    _apt_install("openjdk-17-jre-headless")
    java = shutil.which("java") or "/usr/bin/java"
    if _java_major(java) < 17:
        raise DevKafkaError("Java 17+ is required and could not be installed")
    return java


def _java_major(java: str) -> int:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return 0
    for token in out.split():
        token = token.strip('"')
        if token[:1].isdigit():
            head = token.split(".")[0]
            return int(head) if head.isdigit() else 0
    return 0


def fetch_jars(cache_dir: Path | None = None) -> Path:
    """Resolve the broker's jars from Maven Central once; later calls reuse the cache.

    Returns:
        The directory holding the jars.
    """
    cache = cache_dir or default_cache_dir()
    jars = cache / "jars"
    stamp = cache / ".complete"
    if stamp.exists() and any(jars.glob("kafka_2.13-*.jar")):
        return jars
    if shutil.which("mvn") is None:
        _apt_install("maven")
    jars.mkdir(parents=True, exist_ok=True)
    pom = resources.files("calmrun.devkafka").joinpath("pom.xml")
    with resources.as_file(pom) as pom_path:
        _run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(pom_path),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={jars}",
                f"-Dkafka.version={KAFKA_VERSION}",
                f"-Dlog4j.version={LOG4J_VERSION}",
            ],
            "fetching Kafka jars with Maven",
        )
    stamp.write_text(KAFKA_VERSION + "\n")
    return jars


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = warn
"""
