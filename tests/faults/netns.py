"""A worker in a network namespace of the test's own, reaching the cluster through one veth link it can cut.

The brokers listen on 127.0.0.1 and advertise it, so a worker in another namespace reaches them through two
relays: inside the namespace, ``127.0.0.1:<port>`` -> the host end of the veth pair (``relay`` below, run
with ``ip netns exec``); on the host end, ``<veth address>:<port>`` -> ``127.0.0.1:<port>`` (in the test
process, :class:`HostRelay`, which can also delay every chunk: added latency). The namespace, the veth pair
and the relays are the test's own; no other traffic is touched.

A partition is a blackhole route to the host end inside the namespace: packets are dropped, connections hang
as they do when a switch fails (no reset). This kernel has no ``netem`` qdisc (``tc qdisc add ... netem``:
"Specified qdisc kind is unknown") and no nft/iptables here, so latency is added in the relay and packet
loss is not simulated.

    python -m tests.faults.netns relay --to HOST --port P [--port P...]   # the in-namespace relay
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: list[float]) -> None:
    try:
        while data := await reader.read(65536):
            if delay[0]:
                await asyncio.sleep(delay[0])
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(host: str, port: int, to_host: str, delay: list[float]) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(to_host, port)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, uw, delay), _pipe(ur, w, delay))

    return await asyncio.start_server(handle, host, port)


class Namespace:
    """A network namespace with a veth link to the host (``10.231.<n>.1`` host end, ``.2`` inside)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.ns_if = f"crw{tag}", f"crh{tag}", f"crn{tag}"
        self.net = f"10.231.{int(tag[:2], 16)}"
        self.host_ip, self.ns_ip = f"{self.net}.1", f"{self.net}.2"

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        for args in (
            ("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if),
            ("link", "set", self.ns_if, "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("netns", "exec", self.name, "ip", *args)

    def delete(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.name)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.host_if)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def partition(self) -> None:
        """Drop every packet from the namespace to the host end (connections hang, nothing is reset)."""
        _ip("netns", "exec", self.name, "ip", "route", "add", "blackhole", f"{self.host_ip}/32")

    def heal(self) -> None:
        _ip("netns", "exec", self.name, "ip", "route", "del", "blackhole", f"{self.host_ip}/32")


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


class HostRelay:
    """The host end's relays, one per broker port; ``delay_s`` is added to every chunk either way."""

    def __init__(self, ns: Namespace, ports: list[int]) -> None:
        self.ns, self.ports = ns, ports
        self.delay = [0.0]
        self.servers: list[asyncio.Server] = []
        self.inner: subprocess.Popen[bytes] | None = None

    async def start(self, log: Path) -> None:
        for port in self.ports:
            self.servers.append(await _serve(self.ns.host_ip, port, "127.0.0.1", self.delay))
        cmd = [
            *self.ns.exec_prefix(),
            sys.executable,
            "-m",
            "tests.faults.netns",
            "relay",
            "--to",
            self.ns.host_ip,
        ]
        for port in self.ports:
            cmd += ["--port", str(port)]
        self.inner = _spawn(cmd, log)

    def set_delay(self, seconds: float) -> None:
        self.delay[0] = seconds

    async def stop(self) -> None:
        if self.inner is not None and self.inner.poll() is None:
            self.inner.kill()
            self.inner.wait(10)
        for s in self.servers:
            s.close()


async def _relay_main(to: str, ports: list[int]) -> None:
    servers = [await _serve("127.0.0.1", p, to, [0.0]) for p in ports]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.faults.netns")
    p.add_argument("command", choices=["relay"])
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, action="append", default=[])
    args: Any = p.parse_args(argv)
    asyncio.run(_relay_main(args.to, args.port))


if __name__ == "__main__":
    main()
