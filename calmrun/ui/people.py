"""The page's people-in-the-loop endpoints: the Inbox and the actions on one run (``actions``).

An action is one ``RunCommand`` on the requests topic, as ``calmrun approve|reject|signal|cancel`` sends
it, with the user's name; it is logged on the ``calmrun.ui.audit`` logger before it is sent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from calmrun.client import Client
from calmrun.errors import CalmrunError
from calmrun.ui.actions import Refused, command_for

if TYPE_CHECKING:
    from calmrun.ui.server import UiServer

audit = logging.getLogger("calmrun.ui.audit")


async def send_command(server: UiServer, request: web.Request) -> web.StreamResponse:
    """Body ``{"command": "approve"|"reject"|"signal"|"cancel", ...}`` (see ``actions.command_for``):
    one ``RunCommand`` on the requests topic, with the user's name, as the CLI sends it."""
    user = server.require_operator(request)
    run_id = request.match_info["run_id"]
    try:
        body = await request.json()
        kind = str(body["command"])
    except (ValueError, KeyError, TypeError) as exc:
        raise web.HTTPBadRequest(text=f"expected a JSON object with a command: {exc}") from None
    state = server.index.state(run_id)
    if state is None:
        raise web.HTTPNotFound(text=f"no run {run_id!r} in the index")
    waiting = server.index.waiting(run_id=run_id)
    try:
        cmd = command_for(kind, body, state, user.name, waiting)
    except Refused as exc:
        return web.json_response({"error": exc.message}, status=exc.status)
    detail = {"step": cmd.step, "comment": cmd.comment, "name": cmd.name, "reason": cmd.reason}
    audit.warning(
        "%s by=%s role=%s run=%s %s",
        kind,
        user.name,
        user.role,
        run_id,
        " ".join(f"{k}={v!r}" for k, v in detail.items() if v is not None),
    )
    try:
        async with Client(server.settings) as c:
            await c.command(cmd)
    except CalmrunError as exc:
        raise web.HTTPBadGateway(text=str(exc)) from None
    return web.json_response({"sent": kind, "run_id": run_id, "by": cmd.by})


async def list_inbox(server: UiServer, request: web.Request) -> web.StreamResponse:
    """Every step waiting for a person; ``?approver=NAME``: the approvals NAME may answer."""
    every = server.index.waiting()
    approver = request.query.get("approver") or None
    rows = every if approver is None else server.index.waiting(approver)
    return web.json_response(
        {
            "waiting": rows,
            "approvers": sorted({a for r in every for a in r["approvers"]}),
            "caught_up": server.tail.is_caught_up,
        }
    )
