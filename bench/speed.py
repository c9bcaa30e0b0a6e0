"""The machine's speed during a bench run: one fixed piece of pure-Python work, timed four times a second.

    python -m bench.speed --out FILE [--every 0.25] [--seconds S]

This machine is a KVM guest on a shared host: the same work takes up to 1.9x as long in some seconds as in
others, in spans of seconds to minutes, on each core apart, whatever our own processes do (docs/benchmarks.md,
"The machine's speed"). Two engines measured minutes apart carry that factor in their ratio. The sampler runs
beside the bench in a process of its own (about 1 % of a core), on each core in turn, and appends ``<unix
time> <CPU µs of one unit>`` lines to FILE; ``during`` gives the median over a loop's window, which ``bench``
prints beside the loop's figures. The unit's CPU time is the thread's own (``thread_time``), so waiting for
a core does not count: only the speed of the core while it runs this process does.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

UNIT_METRIC = "machine: CPU us of one bench.speed unit (lower is faster)"


def unit() -> int:
    """The fixed work: dict stores, int-to-str and len, the interpreter's common paths (1.5-3 ms here)."""
    s, d = 0, {}
    for _ in range(5):
        for i in range(2_000):
            d[i] = str(i)
            s += len(d[i])
    return s


def sample() -> float:
    """CPU µs of one unit on this thread."""
    t0 = time.thread_time_ns()
    unit()
    return (time.thread_time_ns() - t0) / 1000


def during(path: Path, start: float, end: float) -> float | None:
    """Median µs of the units sampled between ``start`` and ``end`` (unix time), or None if none was."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    vals = [float(us) for at, us in (ln.split() for ln in lines if ln.strip()) if start <= float(at) <= end]
    return statistics.median(vals) if vals else None


def medians(path: Path | None, windows: Iterable[tuple[float, float]]) -> list[float]:
    """``during`` each (start, end) window that had samples; none if the machine was not sampled."""
    if path is None:
        return []
    got = (during(path, start, end) for start, end in windows)
    return [v for v in got if v is not None]


class Sampler:
    """``python -m bench.speed`` as a child process for the length of a ``with`` block."""

    def __init__(self, path: Path, every_s: float = 0.25) -> None:
        self.path, self.every_s = path, every_s
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sampler:
        cmd = [sys.executable, "-m", "bench.speed", "--out", str(self.path), "--every", str(self.every_s)]
        self._proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.speed")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--every", type=float, default=0.25, help="seconds between samples")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until terminated)")
    args = p.parse_args()
    end = time.time() + args.seconds if args.seconds else float("inf")
    cores = sorted(os.sched_getaffinity(0))
    with args.out.open("a") as f:
        for core in itertools.cycle(cores):  # each core in turn: their speeds move apart
            if time.time() >= end:
                break
            os.sched_setaffinity(0, {core})
            time.sleep(0.001)  # let the scheduler move this process there
            us = sample()
            f.write(f"{time.time():.3f} {us:.1f}\n")
            f.flush()
            time.sleep(args.every)


if __name__ == "__main__":
    main()
