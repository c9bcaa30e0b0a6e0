"""Whether one broker answers: a long-lived connection, an ApiVersions request on it at most once an interval.

A lost broker and a slow one look alike for a while: neither has answered yet. :class:`Liveness` keeps what
tells them apart, and the broker watch (``calmrun.streams.brokers``) judges with it:

- **the connection**: a refused connect, or a connection closed twice in a row without an answer, means
  nothing listens there (the process is gone): the broker is *gone* at once, whatever the time;
- **the silence against the broker's own pace**: a request is unanswered for longer than :meth:`deadline`,
  at least :data:`MIN_SILENT_S` and :data:`SLOW_FACTOR` times the slowest of the broker's last
  :data:`KEPT` answers (capped at :data:`MAX_SILENT_S`): a broker that has been answering slowly sets its own,
  longer bar, so a slow answer is waited for and a broker that answered in milliseconds and then stopped is
  seen within about two seconds.

The watch adds what one connection cannot know: another broker answering a request sent *after* the silent
one's (so this process and its network work, and the silence is that broker's), and the lateness of its own
judging (a busy process may not have read an answer waiting for it yet: the silence must be longer by as
much).

One request is in flight at a time, so a slow broker is asked less often, never more. ApiVersions is the
cheapest request a broker serves and needs no authentication (SASL allows it before the handshake); on a
SASL listener each request goes on a fresh connection, since the broker accepts only one ApiVersions before
the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable

MIN_SILENT_S = 2.0
"""The shortest silence that counts: a broker answering an ApiVersions request on a busy machine."""
MAX_SILENT_S = 10.0
"""The longest bar a slow broker can set itself (the watch's poll timeout before the probes)."""
SLOW_FACTOR = 5.0
"""How many times its slowest recent answer a broker may take before its silence counts."""
KEPT = 60
"""Answer times kept per broker (a minute of them at one a second)."""

_CLIENT = b"calmrun-watch"


def _request(correlation: int) -> bytes:
    """An ApiVersions v0 request, framed (size, then api key 18, version 0, correlation, client ID)."""
    body = struct.pack(">hhih", 18, 0, correlation, len(_CLIENT)) + _CLIENT
    return struct.pack(">i", len(body)) + body


class Liveness:
    """One broker's answers to ApiVersions requests on a connection of its own (see the module docstring).

    Args:
        host: the broker's address, as the cluster's metadata names it.
        port: its port.
        ssl_context: TLS towards it (the worker's own), or None for plaintext.
        fresh_each: a new connection per request (SASL listeners).
        interval_s: the least time between two requests.

    Attributes:
        waiting_since: when the oldest unanswered request (or connect) began, on ``clock``; None when the
            last one was answered.
        answered_sent: when the last answered request was sent, on ``clock``.
        gone: nothing listens there (refused, or closed twice without an answer) since the last answer.
        requests: requests sent; ``answers``: answered; ``connects``: connections opened (what the watch
            costs the broker).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        fresh_each: bool = False,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port, self.ssl, self.fresh_each = host, port, ssl_context, fresh_each
        self.interval_s, self.clock = interval_s, clock
        self.waiting_since: float | None = None
        self.answered_sent = float("-inf")
        self.gone = False
        self.requests = self.answers = self.connects = 0
        self._times: deque[float] = deque(maxlen=KEPT)
        self._closed_unanswered = 0
        self._correlation = 0

    def deadline(self) -> float:
        """How long this broker may stay silent before it counts as lost (see the module docstring)."""
        slowest = max(self._times, default=0.0)
        return min(MAX_SILENT_S, max(MIN_SILENT_S, SLOW_FACTOR * slowest))

    def silent_for(self, now: float) -> float:
        return 0.0 if self.waiting_since is None else now - self.waiting_since

    def lost(self, now: float, slack: float = 0.0) -> bool:
        """Gone, or silent past its deadline (and ``slack`` more: this process was late to look)."""
        return self.gone or self.silent_for(now) - slack >= self.deadline()

    def _answered(self, sent: float) -> None:
        self._times.append(self.clock() - sent)
        self.answers += 1
        self.answered_sent = sent
        self.waiting_since = None
        self.gone = False
        self._closed_unanswered = 0

    async def run(self) -> None:
        """Ask until cancelled; never raises for what the network or the broker does."""
        conn: _Conn | None = None
        try:
            while True:
                began = self.clock()
                if self.waiting_since is None:
                    self.waiting_since = began
                try:
                    if conn is None:
                        self.connects += 1
                        conn = await asyncio.wait_for(self._connect(), self.deadline())
                    await self._ask(conn)
                    if self.fresh_each:
                        _close(conn)
                        conn = None
                    await asyncio.sleep(max(0.0, self.interval_s - (self.clock() - began)))
                except TimeoutError:  # no answer (or no connect) in time: ask again on a fresh connection
                    _close(conn)
                    conn = None
                except ssl.SSLError:  # a TLS listener refused the handshake: something is there and reacted
                    _close(conn)
                    conn = None
                    self._answered(began)
                    await asyncio.sleep(self.interval_s)
                except (OSError, EOFError) as exc:  # refused, reset, or closed without an answer
                    refused = conn is None or isinstance(exc, ConnectionRefusedError)
                    _close(conn)
                    conn = None
                    self._closed_unanswered += 1
                    if refused or self._closed_unanswered >= 2:
                        self.gone = True
                        await asyncio.sleep(self.interval_s)
        finally:
            _close(conn)

    async def _connect(self) -> _Conn:
        host = self.host if self.ssl else None
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl, server_hostname=host)

    async def _ask(self, conn: _Conn) -> None:
        reader, writer = conn
        sent = self.clock()
        self._correlation = (self._correlation + 1) % 2**31
        writer.write(_request(self._correlation))
        self.requests += 1
        head = await asyncio.wait_for(reader.readexactly(4), self._patience())
        await asyncio.wait_for(reader.readexactly(struct.unpack(">i", head)[0]), self._patience())
        self._answered(sent)

    def _patience(self) -> float:
        """How long to wait for an answer before asking again on a fresh connection: past the deadline, so
        a verdict is made first, and then every interval or so (a healed link is seen at once)."""
        return self.deadline() + self.interval_s


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _close(conn: _Conn | None) -> None:
    """Closes ``conn``, if any."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn[1].close()
