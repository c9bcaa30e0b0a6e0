"""The operator page's HTTP server (aiohttp): the page, its JSON API, a server-sent events stream.

Reads come from the local index (``index.py``, filled by ``tail.py``), the cost totals from the
aggregator's compacted topics, the Workers view from the broker's admin API. The writes are a redrive,
through ``Client.redrive`` (the path of ``calmrun dlq redrive``), and the people's commands (``people``:
approve, reject, signal, cancel), each with the user's name on the command; every action is also logged
on the ``calmrun.ui.audit`` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from importlib import resources
from pathlib import Path

from aiohttp import web

from calmrun.client import Client
from calmrun.costs.costtopics import CostTopics
from calmrun.costs.fold import ALL
from calmrun.costs.spend import TenantSpend
from calmrun.costs.table import CostTable
from calmrun.costs.totals import CompactedTail
from calmrun.errors import CalmrunError, ReplayError
from calmrun.replay.recorded import replay_given
from calmrun.replay.snapshot import Snapshot
from calmrun.settings import Settings
from calmrun.streams.journal import journal_entries, run_since
from calmrun.ui.access import COOKIE, Access, User
from calmrun.ui.index import RunIndex, RunQuery
from calmrun.ui.people import list_inbox, send_command
from calmrun.ui.tail import TopicTail
from calmrun.ui.views import dead_letter, family, redact_event, run_view, step_inputs
from calmrun.ui.workers import workers_view
from calmrun.wire.codec import wire_codec
from calmrun.workflow.definition import WorkflowDef

log = logging.getLogger("calmrun.ui")
audit = logging.getLogger("calmrun.ui.audit")
USER: web.RequestKey[User] = web.RequestKey("user", User)
_STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
_DIMS = ("workflow", "agent", "model", "tenant")


class UiServer:
    """The page over one broker and prefix.

    Args:
        settings: broker, prefix, ``ui`` settings (host, port, users, trusted header, index path).
        access: who may read and act.
        definitions: workflow definitions for "replay this run" (definitions are not stored in Kafka).
        index_path: where the SQLite index lives (rebuilt at start); default ``ui.index_path``, else a
            temporary file removed at stop (a file, not memory: 100,000 runs take about 490 MB).
        pool_metrics: the step-pool executors' ``/metrics`` URLs (Workers view: fencings, agents running).
    """

    def __init__(
        self,
        settings: Settings,
        access: Access,
        definitions: Sequence[WorkflowDef] = (),
        index_path: str | None = None,
        pool_metrics: Sequence[str] = (),
    ) -> None:
        self.settings, self.access, self.definitions = settings, access, list(definitions)
        self.pool_metrics = list(pool_metrics)
        path = index_path or (str(settings.ui.index_path) if settings.ui.index_path else None)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="calmrun-ui-") if path is None else None
        self.codec = wire_codec(settings.wire)
        self.index = RunIndex(
            path or str(Path(self._tmpdir.name if self._tmpdir else ".") / "index.sqlite"), self.codec
        )
        self.version = 0
        self.tail = TopicTail(settings, self.index, self._on_change)
        self.costs = CostTable()
        self._cost_tail: CompactedTail | None = None
        self._spend: TenantSpend | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _on_change(self) -> None:
        self.version += 1

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> str:
        """Start reading the topics and serving; returns the page's address.

        Raises:
            UiAccessError: the host is not loopback and no authentication is configured.
            BrokerUnavailableError: no broker answers.
        """
        ui = self.settings.ui
        self.access.check_host(ui.host)
        await self.tail.start()
        app = web.Application(middlewares=[self._auth])
        app.add_routes(
            [
                web.get("/", self.page),
                web.get("/static/{name}", self.static),
                web.get("/api/me", self.me),
                web.get("/api/runs", self.runs),
                web.get("/api/runs/{run_id}", self.run),
                web.post("/api/runs/{run_id}/replay", self.replay),
                web.get("/api/dlq", self.dlq),
                web.post("/api/redrive", self.redrive),
                web.post("/api/runs/{run_id}/command", functools.partial(send_command, self)),
                web.get("/api/inbox", functools.partial(list_inbox, self)),
                web.get("/api/costs", self.cost_view),
                web.get("/api/workers", self.workers),
                web.get("/api/stream", self.stream),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, ui.host, ui.port)
        await site.start()
        port = self._runner.addresses[0][1]
        host = f"[{ui.host}]" if ":" in ui.host else ui.host
        self.url = f"http://{host}:{port}/"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for t in (self._cost_tail, self._spend):
            if t is not None:
                await t.stop()
        await self.tail.stop()
        self.index.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    # -- access ---------------------------------------------------------------------------------------

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = request.query.get("token")
        if request.path == "/" and token:  # a link with the token: keep it in a cookie, not in the address
            if self.access.identify(token, {}) is None:
                raise web.HTTPUnauthorized(text="unknown token")
            found = web.HTTPFound("/", headers=_HEADERS)
            found.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
            raise found
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        user = self.access.identify(bearer or request.cookies.get(COOKIE), headers)
        if user is None:
            if request.path.startswith("/api/"):
                raise web.HTTPUnauthorized(text="not authenticated: a token or the proxy's user header")
            return web.Response(status=401, text=_LOGIN, content_type="text/html")
        request[USER] = user
        response = await handler(request)
        response.headers.update(_HEADERS)
        return response

    def require_operator(self, request: web.Request) -> User:
        user = request[USER]
        if not user.can_act:
            raise web.HTTPForbidden(text=f"{user.name} is a viewer: operators only")
        if request.headers.get("X-Calmrun-Action") != "1":  # a plain form post from another site has none
            raise web.HTTPForbidden(text="actions need the X-Calmrun-Action header")
        return user

    # -- pages ----------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=_asset("index.html"), content_type="text/html")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return web.Response(text=_asset(name), content_type=_STATIC[name])

    async def me(self, request: web.Request) -> web.StreamResponse:
        u = request[USER]
        return web.json_response(
            {
                "user": u.name,
                "role": u.role,
                "prefix": self.settings.kafka.prefix,
                "bootstrap": self.settings.kafka.bootstrap,
                "definitions": {
                    name: sorted({d.version for d in self.definitions if d.name == name})
                    for name in sorted({d.name for d in self.definitions})
                },
            }
        )

    async def runs(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        query = RunQuery(
            workflow=q.get("workflow") or None,
            version=q.get("version") or None,
            status=q.get("status") or None,
            outcome=q.get("outcome") or None,
            tenant=q.get("tenant") or None,
            search=q.get("q") or None,
            since_ms=_int(q.get("since")),
            until_ms=_int(q.get("until")),
            limit=_int(q.get("limit")) or 100,
            offset=_int(q.get("offset")) or 0,
        )
        page = self.index.runs(query)
        return web.json_response(
            {
                "runs": page.rows,
                "total": page.total,
                "counts": page.counts,
                "choices": self.index.choices(),
                "version": self.version,
                "caught_up": self.tail.is_caught_up,
            }
        )

    async def run(self, request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        state, events = self.index.state(run_id), self.index.events(run_id)
        if state is None and not events:
            raise web.HTTPNotFound(text=f"no run {run_id!r} in the index")
        redact = not request[USER].can_act
        wf = next(
            (d for d in self.definitions if state and (d.name, d.version) == (state.workflow, state.version)),
            None,
        )
        inputs = step_inputs(wf, state) if wf is not None and state is not None else None
        since = run_since(state.created_ms if state else None)  # the agents' requests, for the timeline
        entries = await journal_entries(self.settings, run_id, since)
        view = run_view(state, events, self.index.dead_letters(run_id=run_id), redact, inputs, entries)
        view["waiting"] = self.index.waiting(run_id=run_id)
        view.update(family(state, events, self.index.state))
        view["replayable"] = any(
            d.name == (state.workflow if state else events[0].workflow) for d in self.definitions
        )
        return web.json_response(view)

    async def replay(self, request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        state, events = self.index.state(run_id), self.index.events(run_id)
        snap = Snapshot(run_id=run_id, prefix=self.settings.kafka.prefix, state=state, events=events)
        try:
            version = request.query.get("version") or None
            verdict = replay_given(self.definitions, snap, version)
        except ReplayError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        out = verdict.to_dict()
        if not request[USER].can_act and out.get("divergence"):
            d = out["divergence"]
            d["original"] = [redact_event(e) for e in d["original"]]
            d["replay"] = [redact_event(e) for e in d["replay"]]
        return web.json_response(out)

    async def dlq(self, request: web.Request) -> web.StreamResponse:
        workflow = request.query.get("workflow") or None
        redact = not request[USER].can_act
        rows = [dead_letter(r, redact, self.codec) for r in self.index.dead_letters(workflow=workflow)]
        return web.json_response({"records": rows, "counts": self.index.dlq_counts()})

    async def redrive(self, request: web.Request) -> web.StreamResponse:
        """Body ``{"workflow": W, "run_ids": [...]}`` or ``{"workflow": W, "all": true}``."""
        user = self.require_operator(request)
        try:
            body = await request.json()
            workflow = str(body["workflow"])
            ids = None if body.get("all") else {str(r) for r in body["run_ids"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise web.HTTPBadRequest(text=f"expected workflow and run_ids (or all): {exc}") from None
        if ids is not None and not ids:
            raise web.HTTPBadRequest(text="no run to redrive")
        audit.warning(
            "redrive by=%s role=%s workflow=%s runs=%s",
            user.name,
            user.role,
            workflow,
            sorted(ids) if ids else "all",
        )
        try:
            async with Client(self.settings) as c:
                runs, records = await c.redrive(workflow, ids, by=f"ui:{user.name}")
        except CalmrunError as exc:
            raise web.HTTPBadGateway(text=str(exc)) from None
        audit.warning("redrive by=%s done: %d runs, %d records re-injected", user.name, runs, records)
        return web.json_response({"runs": runs, "records": records, "by": user.name})

    async def cost_view(self, request: web.Request) -> web.StreamResponse:
        await self._start_cost_tails()
        window = request.query.get("window", "1m")
        if window not in ("1m", "1h", "1d"):
            raise web.HTTPBadRequest(text="window: 1m, 1h or 1d")
        totals = {dim: [r.as_json() for r in self.costs.rows(dim, ALL)] for dim in _DIMS}
        series = {dim: [r.as_json() for r in self.costs.rows(dim, window)] for dim in _DIMS}
        now_ms = time.time_ns() // 1_000_000
        budgets = []
        for tenant, b in sorted(self.settings.budgets.tenants.items()):
            spent = self._spend.spent(tenant, b.window, now_ms) if self._spend else Decimal(0)
            budgets.append(
                {"tenant": tenant, "window": b.window, "budget_usd": str(b.usd), "spent_usd": str(spent)}
            )
        return web.json_response(
            {
                "available": self._cost_tail is not None,
                "window": window,
                "totals": totals,
                "series": series,
                "steps": self.index.step_costs(),
                "top_runs": self.index.top_runs(),
                "budgets": budgets,
            }
        )

    async def _start_cost_tails(self) -> None:
        """Follow the aggregator's topics once they exist (the page never creates topics)."""
        if self._cost_tail is not None and (self._spend is not None or not self.settings.budgets.tenants):
            return
        topics = CostTopics(self.settings.kafka.prefix)
        names = await self.tail.topic_names()
        if self._cost_tail is None and topics.totals in names:
            tail = CompactedTail(self.settings, topics.totals, self.costs.apply)
            await tail.start()
            with contextlib.suppress(TimeoutError):
                await tail.caught_up(10)
            self._cost_tail = tail
        if self._spend is None and topics.tenants in names and self.settings.budgets.tenants:
            spend = TenantSpend(self.settings)
            await spend._tail.start()  # not spend.start(): that creates the topic, and the page only reads
            with contextlib.suppress(TimeoutError):
                await spend.caught_up(10)
            self._spend = spend

    async def workers(self, request: web.Request) -> web.StreamResponse:
        try:
            view = await workers_view(self.settings, self.definitions, self.index, self.pool_metrics)
        except CalmrunError as exc:
            raise web.HTTPBadGateway(text=str(exc)) from None
        view["in_flight"] = self.index.in_flight()
        view["index"] = {**self.index.sizes(), "rebuild_s": self.tail.rebuild_s, "records": self.tail.records}
        return web.json_response(view)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``change`` with the index version after the index changed (at most 4/s)."""
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        sent, quiet_since = -1, time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while True:
                if self.version != sent:
                    sent, quiet_since = self.version, time.monotonic()
                    payload = json.dumps({"version": sent, "caught_up": self.tail.is_caught_up})
                    await resp.write(f"event: change\ndata: {payload}\n\n".encode())
                elif time.monotonic() - quiet_since > 15:
                    quiet_since = time.monotonic()
                    await resp.write(b": keep-alive\n\n")
                await asyncio.sleep(0.25)
        return resp


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        raise web.HTTPBadRequest(text=f"not a number: {v!r}") from None


def _asset(name: str) -> str:
    return resources.files("calmrun.ui").joinpath("static", name).read_text()


_HEADERS = {
    # the page's own files only; the waterfall sets widths with style attributes
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # a first visit carries the token in its address
    "X-Content-Type-Options": "nosniff",
}

_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>calmrun: sign in</title></head>
<body><main><h1>calmrun</h1><p>Not authenticated. Open the link with your token
(<code>/?token=...</code>) or sign in through your reverse proxy.</p></main></body></html>"""
