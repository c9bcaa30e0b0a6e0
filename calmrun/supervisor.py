"""``calmrun worker --processes N``: N worker processes of one group on one machine, kept running.

Each child is a full ``calmrun worker`` with the same arguments minus ``--processes``; they join the same
consumer group, so the group spreads the partitions over them as over workers on separate machines. What a
child may not share with its siblings it gets from its environment: with ``worker.instance_id`` set, child
``i`` (from 0) has the static instance id ``<instance_id>-<i>``; with ``metrics.port`` set, it serves
``/metrics`` on ``port + i``.

A child that dies is started again after a backoff (1 s, doubling to 30 s while it keeps dying within a
minute of its start); meanwhile the group gives its partitions to its siblings (after the session timeout
for a killed child, at once for one that left cleanly), and a restarted child takes its share back. A child
that exits with an error before it reported itself running (a bad configuration, credentials or ACLs, no
broker) is not restarted: restarting would not heal it, so the supervisor stops the other children and exits
with that child's exit code. A child reports itself running by writing a line to the file descriptor named
in ``CALMRUN_READY_FD`` (see :func:`report_ready`). SIGINT or SIGTERM to the supervisor sends SIGTERM to
every child and waits for each to stop cleanly (SIGKILL after ``stop_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence

from calmrun.settings import Settings

log = logging.getLogger("calmrun.supervisor")

READY_FD_ENV = "CALMRUN_READY_FD"
"""The environment variable naming the pipe a child writes ``ready`` to once its worker runs."""


def report_ready() -> None:
    """In a child: tell the supervisor that the worker is running (a no-op outside a supervisor)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), b"ready\n")
        os.close(int(fd))


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line of a child: ``python -m calmrun.cli`` and ``argv`` without ``--processes``.

    Args:
        argv: the supervisor's own arguments after the program name (``worker -w f.yaml --processes 2``).
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return [sys.executable, "-m", "calmrun.cli", *out]


def child_env(settings: Settings, i: int) -> dict[str, str]:
    """What child ``i`` gets in its environment beyond the supervisor's: its instance id and metrics port."""
    env: dict[str, str] = {}
    if settings.worker.instance_id is not None:
        env["CALMRUN_WORKER__INSTANCE_ID"] = f"{settings.worker.instance_id}-{i}"
    if settings.metrics.port:
        env["CALMRUN_METRICS__PORT"] = str(settings.metrics.port + i)
    return env


def exit_text(code: int) -> str:
    """A child's exit status for a log line: ``exit code 1`` or ``signal SIGKILL``."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Keeps one child process per entry of ``envs`` running; see the module docstring.

    Args:
        argv: the command line of every child.
        envs: one entry per child: what it gets in its environment beyond the supervisor's.
        backoff_s: the first restart delay; it doubles up to ``max_backoff_s`` while a child keeps dying
            within ``healthy_s`` of its start, and is reset after a child ran that long.
        stop_timeout_s: how long a child may take to stop after SIGTERM before it is killed.
    """

    def __init__(
        self,
        argv: Sequence[str],
        envs: Sequence[Mapping[str, str]],
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        healthy_s: float = 60.0,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self.argv, self.envs = list(argv), [dict(e) for e in envs]
        self.backoff_s, self.max_backoff_s, self.healthy_s = backoff_s, max_backoff_s, healthy_s
        self.stop_timeout_s = stop_timeout_s
        self.pids: dict[int, int] = {}  # child index -> pid of its live process
        self.restarts = 0
        self._stopping = asyncio.Event()
        self._code = 0

    def stop(self) -> None:
        """Ask every child to stop; :meth:`run` returns once they have."""
        self._stopping.set()

    async def run(self) -> int:
        """Run the children until SIGINT/SIGTERM or a child that cannot start.

        Returns:
            0 after a stop, or the exit code of the child that failed before it was running.
        """
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        try:
            await asyncio.gather(*(self._keep(i) for i in range(len(self.envs))))
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        return self._code

    async def _keep(self, i: int) -> None:
        backoff = self.backoff_s
        while not self._stopping.is_set():
            proc, ready = await self._spawn(i)
            t0 = time.monotonic()
            stopping = asyncio.ensure_future(self._stopping.wait())
            waiting = asyncio.ensure_future(proc.wait())
            await asyncio.wait({stopping, waiting}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not waiting.done():
                await self._terminate(i, proc)
            code = await waiting
            ran = time.monotonic() - t0
            self.pids.pop(i, None)
            was_ready = await ready
            if self._stopping.is_set():
                log.info("child %d (pid %d) stopped: %s", i, proc.pid, exit_text(code))
                return
            if code > 0 and not was_ready:
                log.error(
                    "child %d (pid %d) failed at startup (%s after %.1f s): not restarting it; stopping",
                    i,
                    proc.pid,
                    exit_text(code),
                    ran,
                )
                self._code = code
                self.stop()
                return
            if ran >= self.healthy_s:
                backoff = self.backoff_s
            log.warning(
                "child %d (pid %d) died (%s after %.1f s); its partitions move to the others; restarting "
                "it in %.1f s",
                i,
                proc.pid,
                exit_text(code),
                ran,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            self.restarts += 1

    async def _spawn(self, i: int) -> tuple[asyncio.subprocess.Process, asyncio.Future[bool]]:
        r, w = os.pipe()
        env = {**os.environ, **self.envs[i], READY_FD_ENV: str(w)}
        try:
            proc = await asyncio.create_subprocess_exec(*self.argv, env=env, pass_fds=(w,))
        finally:
            os.close(w)
        self.pids[i] = proc.pid
        log.info("child %d started: pid %d", i, proc.pid)
        return proc, asyncio.ensure_future(asyncio.to_thread(_read_ready, r))

    async def _terminate(self, i: int, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            log.error("child %d (pid %d) did not stop: killing it", i, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _read_ready(fd: int) -> bool:
    """Block until the child wrote its ready line (True) or exited without (False); closes ``fd``."""
    try:
        return bool(os.read(fd, 16))
    finally:
        os.close(fd)


def supervise(settings: Settings, n: int, argv: Sequence[str]) -> int:
    """Run ``n`` children of the worker command ``argv`` (the supervisor's own arguments); see the module.

    Returns:
        The supervisor's exit code.
    """
    sup = Supervisor(child_argv(argv), [child_env(settings, i) for i in range(n)])
    log.info("supervising %d worker processes", n)
    return asyncio.run(sup.run())
