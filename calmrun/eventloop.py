"""Which event loop runs a calmrun process: uvloop where it is installed, the standard library's otherwise.

uvloop (libuv under asyncio's API) takes 3-9 % off a worker's CPU per run at 100 runs in flight
(docs/performance.md, "uvloop"): its sockets, callbacks and timers are C. Only the process's owner picks
the loop (the CLI's worker command, the benchmark worker), never a library: a loop is per process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from calmrun.errors import ConfigError

EventLoop = Literal["auto", "uvloop", "asyncio"]
"""``auto``: uvloop if installed (it is a dependency on Linux and macOS), else asyncio's."""

T = TypeVar("T")


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the loop ``choice`` names; ``uvloop`` when not installed is a configuration error."""
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "worker.event_loop is 'uvloop' but uvloop is not installed: pip install uvloop, "
                "or set it to 'auto' or 'asyncio'"
            ) from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what a process says it runs on."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(coro: Coroutine[Any, Any, T], choice: EventLoop) -> T:
    """``asyncio.run`` on the loop ``choice`` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(coro)
