"""Helpers of the durable-agent tests: a scripted model served over HTTP, the agents, a worker process.

``ScriptedModelServer`` speaks the OpenAI chat-completions API on 127.0.0.1 from a thread of the test
process, so it outlives the workers a test kills: every request reaching it is kept, and a test counts them
there. Its script answers from the conversation so far: tool calls until the agent has called ``charge``
``CALLS`` times, then the final text. ``charge`` is the side effect: it appends one line per call to the file
named by ``DURABLE_CHARGES`` and, while the file ``DURABLE_HOLD`` exists, blocks at call ``DURABLE_HOLD_AT``
(default ``HOLD_AT``) after announcing itself there (the moment a test kills the worker). Its answer is about
``DURABLE_OUTPUT_BYTES`` long, ``DURABLE_BIG_BYTES`` at call ``DURABLE_BIG_AT``.

    python -m tests.agents.durable_support --bootstrap B --prefix P --base-url URL --status-file F [--calls N]

``DURABLE_LOG_LEVEL=INFO`` logs the worker's rebalances, resumes and attempts not started into its log;
``DURABLE_DUMP_S=S`` logs there, S seconds after the start and every 30 s after, the stack of every asyncio
task and what the worker owns and runs (a run that stops then says where its attempt waits).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.usage import UsageLimits

from calmrun.agents import AgentRegistry, ModelRegistry, StepContext
from calmrun.settings import ModelAlias, Settings, load_settings
from calmrun.streams.journal import KafkaJournal
from calmrun.streams.worker import Worker
from calmrun.workflow.definition import WorkflowDef, parse_workflow

Script = Callable[[list[dict[str, Any]], str], dict[str, Any]]
"""(the request's messages, the requested model) -> the assistant message to answer with."""


def charges_script(calls: int, *, tool: str = "charge", arg: Callable[[int], Any] | None = None) -> Script:
    """Call ``tool`` with ``{"order": i}`` (or ``arg(i)``), i = 0..calls-1, one per request, then answer."""

    def script(messages: list[dict[str, Any]], model: str) -> dict[str, Any]:
        done = sum(1 for m in messages if m.get("role") == "tool")
        if done < calls:
            args = arg(done) if arg is not None else {"order": done}
            call = {
                "id": f"call_{done}",
                "type": "function",
                "function": {"name": tool, "arguments": json.dumps(args)},
            }
            return {"role": "assistant", "content": None, "tool_calls": [call]}
        return {"role": "assistant", "content": f"charged {done} orders"}

    return script


class ScriptedModelServer:
    """An OpenAI-compatible chat server answering from ``script``; see the module docstring.

    Attributes:
        requests: every chat request's body, in arrival order.
    """

    def __init__(self, script: Script, usage: tuple[int, int] = (50, 10)) -> None:
        self.script, self.usage = script, usage
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                with server._lock:
                    server.requests.append(body)
                message = server.script(body.get("messages", []), body.get("model", ""))
                reply = {
                    "id": f"chatcmpl-{len(server.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": server.usage[0],
                        "completion_tokens": server.usage[1],
                        "total_tokens": sum(server.usage),
                    },
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def digests(self) -> list[str]:
        """One digest per request (its messages and model): a repeated request repeats its digest."""
        with self._lock:
            bodies = list(self.requests)
        return [
            hashlib.sha256(
                json.dumps([b.get("model"), b.get("messages")], sort_keys=True).encode()
            ).hexdigest()
            for b in bodies
        ]


payer = Agent(name="payer", instructions="Charge every order, one tool call at a time, then say so.")

HOLD_AT = 3


@payer.tool_plain
def charge(order: int) -> str:
    """Charge one order (a side effect: a line in the charges file)."""
    env = os.environ
    hold = env.get("DURABLE_HOLD")
    if hold and order == int(env.get("DURABLE_HOLD_AT", HOLD_AT)) and Path(hold).exists():
        Path(hold).write_text(f"holding {order}\n")
        time.sleep(3600)  # the test kills the worker here
    charges = env.get("DURABLE_CHARGES")
    if charges:
        with open(charges, "a") as f:
            f.write(f"{order}\n")
    big = order == int(env.get("DURABLE_BIG_AT", -1))
    size = int(env.get("DURABLE_BIG_BYTES" if big else "DURABLE_OUTPUT_BYTES", 160))
    return f"order {order} charged: " + "receipt " * (size // 8)


refunder = Agent(name="refunder", instructions="Refund the order; a person approves each refund.")


@refunder.tool_plain(requires_approval=True)
def refund(order: int) -> str:
    """Refund one order (a side effect that needs a person's approval: a line in the charges file)."""
    charges = os.environ.get("DURABLE_CHARGES")
    if charges:
        with open(charges, "a") as f:
            f.write(f"refund {order}\n")
    return f"order {order} refunded"


async def long_payer(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    """``payer`` allowed more than pydantic-ai's default 50 requests (a step function around the agent)."""
    result = await ctx.run(payer, json.dumps(inp), usage_limits=UsageLimits(request_limit=1000))
    return {"output": result.output}


def pay_flow(
    name: str = "pay", timeout_s: float = 300.0, agent: str = "payer", tool_approvers: list[str] | None = None
) -> WorkflowDef:
    return parse_workflow(
        {
            "name": name,
            "steps": [
                {
                    "name": "pay",
                    "agent": f"tests.agents.durable_support:{agent}",
                    "model": "remote",
                    "input": {"orders": "input.orders"},
                    "timeout_s": timeout_s,
                    "retry": {"max_attempts": 1},
                    "tool_approvers": tool_approvers or [],
                }
            ],
        }
    )


def durable_settings(broker: str, prefix: str, base_url: str, **worker: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap": broker, "prefix": prefix, "partitions": 4},
        worker={"commit_interval_s": 0.2, "timer_interval_s": 0.1, **worker},
        models={"remote": ModelAlias(model="openai:scripted-1", base_url=base_url, temperature=0)},
    )


async def _dump_tasks(worker: Worker, first_s: float, every_s: float = 30.0) -> None:
    """Log every asyncio task's stack and the worker's partitions and attempts, ``first_s`` after the start
    and every ``every_s`` after (``DURABLE_DUMP_S``), until cancelled."""
    await asyncio.sleep(first_s)
    while True:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            stacks.write(f"--- {task.get_name()}\n")
            task.print_stack(limit=30, file=stacks)
        logging.getLogger("calmrun.dump").warning(
            "owned %s, stable %s, %d attempts here, %s\n%s",
            sorted(worker.parts.owned),
            worker.parts.stable.is_set(),
            len(worker.tasks),
            worker.tasks.counts,
            stacks.getvalue(),
        )
        await asyncio.sleep(every_s)


async def _main(args: argparse.Namespace) -> None:
    settings = durable_settings(
        args.bootstrap,
        args.prefix,
        args.base_url,
        instance_id=args.instance_id,
        session_timeout_s=6.0,
    )
    flow = pay_flow(agent=args.agent, tool_approvers=["alice"] if args.agent == "refunder" else None)
    worker = Worker(settings, [flow], AgentRegistry(), ModelRegistry(settings.models))
    if args.journal_limit:  # records of at most this many bytes (the default is under kafka.max_request_size)
        worker.attempts.journal = KafkaJournal(settings, limit=args.journal_limit)
    status = Path(args.status_file)

    def write(state: str) -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "state": state, "owned": sorted(worker.parts.owned)}))
        tmp.replace(status)

    runner = asyncio.create_task(worker.run(lambda: write("running")))
    dump_s = float(os.environ.get("DURABLE_DUMP_S", "0"))
    dumps = asyncio.create_task(_dump_tasks(worker, dump_s)) if dump_s > 0 else None
    try:
        while not runner.done():
            await asyncio.wait({runner}, timeout=0.1)
            write("running")
    finally:
        if dumps is not None:
            dumps.cancel()
    runner.result()
    write("stopped")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tests.agents.durable_support")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--status-file", required=True)
    p.add_argument("--instance-id", default="durable-w1")
    p.add_argument("--journal-limit", type=int, default=0)
    p.add_argument("--agent", default="payer", help="payer, long_payer or refunder")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(message)s")
    # DURABLE_LOG_LEVEL=INFO: the worker's rebalances, resumes and attempts not started, in worker.log
    logging.getLogger("calmrun").setLevel(os.environ.get("DURABLE_LOG_LEVEL", "WARNING"))
    asyncio.run(_main(p.parse_args()))
