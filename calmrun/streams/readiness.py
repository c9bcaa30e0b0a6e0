"""Is a worker ready to decide? ``worker ready`` on the console and ``/ready`` on the metrics port.

A worker that has started is not yet deciding anything: the consumer group must assign it its partitions,
and it must fence their last owner, restore their runs from the state topic and seek to the committed
offsets (``streams.partitions``, ``streams.restore``). Requests sent before then wait for that. So a worker
is ready once the group gave it its partitions (none is an answer too: more workers than partitions) and
every one of them is taken over; not while it stops or after it failed. ``/ready`` answers 200 then and 503
before, with the reason as plain text.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from calmrun.streams.ownership import Ownership
    from calmrun.streams.runtime import Runtime

ASK_TIMEOUT_S = 5.0
"""How long ``/ready`` waits for the worker's event loop to answer (a blocked loop is not ready)."""


@dataclass(frozen=True)
class Readiness:
    ready: bool
    why: str


def readiness(worker: Runtime, parts: Ownership) -> Readiness:
    """The worker's readiness now, from its lifecycle and its ownership (call it on the worker's loop)."""
    if worker.failure is not None:
        return Readiness(False, f"failed: {worker.failure!r}")
    if worker.closing:
        return Readiness(False, "stopping")
    if parts.restoring:
        return Readiness(False, f"taking over partitions {sorted(parts.restoring)} (restoring their runs)")
    if not parts.assigned_once.is_set():
        return Readiness(False, "waiting for the consumer group to assign partitions")
    return Readiness(True, f"ready: partitions {sorted(parts.owned)}")


async def wait_ready(worker: Runtime, parts: Ownership) -> Readiness:
    """Return once the worker is ready for the first time (or has failed or is stopping)."""
    while True:
        now = readiness(worker, parts)
        if now.ready or worker.failure is not None or worker.closing:
            return now
        await asyncio.sleep(0.05)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr (as prometheus_client's own server)."""


def serve(
    host: str, port: int, registry: CollectorRegistry, ask: Callable[[], Readiness]
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` (and every other path, as prometheus_client does) and ``/ready``, in a thread.

    Args:
        ask: the readiness, called from the server's thread.
    """
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/ready":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        now = ask()
        status = "200 OK" if now.ready else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [now.why.encode() + b"\n"]

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    httpd = make_server(host, port, app, Server, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="calmrun-http", daemon=True)
    thread.start()
    return httpd, thread


def asker(now: Callable[[], Readiness], loop: asyncio.AbstractEventLoop) -> Callable[[], Readiness]:
    """``now()`` (a worker's readiness) computed on ``loop`` for a caller in another thread."""

    async def on_loop() -> Readiness:
        return now()

    def ask() -> Readiness:
        try:
            return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(ASK_TIMEOUT_S)
        except TimeoutError:
            return Readiness(False, f"the worker's event loop did not answer within {ASK_TIMEOUT_S:g}s")
        except RuntimeError as exc:  # the loop is closed
            return Readiness(False, f"stopped ({exc})")

    return ask
