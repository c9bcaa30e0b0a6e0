"""The peers' servers on loopback, each started fresh on free ports and stopped (and its data removed) after.

* ``restate``: ``restate-server`` (node, ingress and admin on 127.0.0.1, telemetry off) and the SDK service
  (``bench.peers.restate_app`` on hypercorn), registered with the admin API;
* ``postgres``: a private cluster (``initdb`` in a temporary directory, as the ``postgres`` user when run
  as root) listening on 127.0.0.1 only, with default durability (``fsync`` and ``synchronous_commit`` on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import ROOT
from bench.peers.install import Peers
from calmrun.localproc import free_port, tail, terminate


@dataclass
class Restate:
    ingress: str
    pids: dict[str, int]


@dataclass
class Postgres:
    url: str
    pids: dict[str, int]


def _spawn(cmd: Sequence[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        terminate(proc.pid, 20)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


async def _until_http(url: str, proc: subprocess.Popen[bytes], log: Path, wait_s: float = 60) -> None:
    end = time.monotonic() + wait_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log, 30)}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url) as resp:
                    if resp.status < 500:
                        return
            if time.monotonic() > end:
                raise TimeoutError(f"{url} did not answer within {wait_s}s:\n{tail(log, 30)}")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def restate(peers: Peers, logs: Path) -> AsyncIterator[Restate]:
    base = Path(tempfile.mkdtemp(prefix="calmrun-bench-restate-"))
    ingress, admin, node, svc = (free_port() for _ in range(4))
    env = {
        **os.environ,
        "RESTATE_INGRESS__BIND_ADDRESS": f"127.0.0.1:{ingress}",
        "RESTATE_ADMIN__BIND_ADDRESS": f"127.0.0.1:{admin}",
        "RESTATE_BIND_ADDRESS": f"127.0.0.1:{node}",
        "RESTATE_DISABLE_TELEMETRY": "true",
    }
    cmd = [str(peers.restate_server), "--base-dir", str(base), "--no-logo", "--listen-mode", "tcp"]
    server = _spawn(cmd, logs / ".restate-server.log", env=env)
    service: subprocess.Popen[bytes] | None = None
    try:
        await _until_http(f"http://127.0.0.1:{ingress}/restate/health", server, logs / ".restate-server.log")
        await _until_http(f"http://127.0.0.1:{admin}/health", server, logs / ".restate-server.log")
        service = _spawn(
            [str(peers.python), "-m", "hypercorn", "bench.peers.restate_app:app", "-b", f"127.0.0.1:{svc}"],
            logs / ".restate-service.log",
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        await _until_http(f"http://127.0.0.1:{svc}/discover", service, logs / ".restate-service.log")
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{admin}/deployments", json={"uri": f"http://127.0.0.1:{svc}"}) as r,
        ):
            if r.status >= 300:
                raise RuntimeError(f"registering the service with Restate: {r.status} {await r.text()}")
        yield Restate(f"http://127.0.0.1:{ingress}", {"server": server.pid, "SDK service": service.pid})
    finally:
        if service is not None:
            _stop(service)
        _stop(server)
        shutil.rmtree(base, ignore_errors=True)


def _as_postgres(cmd: Sequence[str], log: Path | None = None) -> None:
    user = "postgres" if os.geteuid() == 0 else None
    out = subprocess.run(cmd, user=user, capture_output=True, text=True, check=False)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{(out.stdout + out.stderr)[-2000:]}")


def _postgres_may_enter() -> str | None:
    """Where PostgreSQL's data may go: the temporary directory, unless root runs the bench with one that the
    ``postgres`` user cannot enter (``TMPDIR=$(mktemp -d)`` is mode 700), then ``/tmp``."""
    tmp = tempfile.gettempdir()
    if os.geteuid() == 0 and not os.stat(tmp).st_mode & stat.S_IXOTH:
        return "/tmp"
    return None


@contextlib.asynccontextmanager
async def postgres(peers: Peers, logs: Path) -> AsyncIterator[Postgres]:
    base = Path(tempfile.mkdtemp(prefix="calmrun-bench-pg-", dir=_postgres_may_enter()))
    data, port = base / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    bin_ = peers.pg_bin
    started = False
    try:
        init = [str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        await asyncio.to_thread(_as_postgres, init)
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c max_connections=300"
        opts += f" -c unix_socket_directories={base}"
        start = [str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-o", opts, "-w", "start"]
        await asyncio.to_thread(_as_postgres, start)
        started = True
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        yield Postgres(f"postgresql://postgres@127.0.0.1:{port}", {"PostgreSQL": postmaster})
    finally:
        if started:
            stop = [str(bin_ / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
            await asyncio.to_thread(_as_postgres, stop)
        with contextlib.suppress(OSError):
            shutil.copy(base / "pg.log", logs / ".postgres.log")
        shutil.rmtree(base, ignore_errors=True)
