"""A worker in a network namespace of the test's own, reaching the cluster through one veth link it can cut.

The brokers listen on 127.0.0.1 and advertise it, so a worker in another namespace reaches them through two
relays: inside the namespace, ``127.0.0.1:<port>`` -> the host end of the veth pair (``relay`` below, run
with ``ip netns exec``); on the host end, ``<veth address>:<port>`` -> ``127.0.0.1:<port>`` (in the test
process, :class:`HostRelay`, which can also delay every chunk: added latency). The namespace, the veth pair
and the relays are the test's own; no other traffic is touched.

A partition is a blackhole route to the host end inside the namespace: packets are dropped, connections hang
as they do when a switch fails (no reset). Packet loss is an nftables table inside the namespace
(:meth:`Namespace.set_loss`): on the output and input hooks, a packet leaving or arriving on the namespace's
veth end is dropped at random (``numgen random mod 100 < N drop``), both directions; the host's own rules
are never touched (``nft`` runs only under ``ip netns exec``), and the namespace's loopback, where the worker
meets the in-namespace relay, loses nothing. This kernel has no ``netem`` qdisc (``tc qdisc add ... netem``:
"Specified qdisc kind is unknown"), so latency is added in the relay instead.

    python -m tests.faults.netns relay --to HOST --port P [--port P...]   # the in-namespace relay
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


LOSS_TABLE = "calmrun_loss"
"""The namespace's nftables table that drops packets (``inet`` family: IPv4 and IPv6)."""


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

    def _nft(self, *args: str, script: str | None = None) -> str:
        """``nft`` inside the namespace, never on the host (``script``: read from stdin, one transaction)."""
        cmd = [*self.exec_prefix(), "nft", *args, *(["-f", "-"] if script is not None else [])]
        return subprocess.run(cmd, input=script, text=True, check=True, capture_output=True).stdout

    def set_loss(self, percent: int) -> None:
        """Drop ``percent`` % of the packets on the namespace's veth link, each direction on its own.

        Replaces any earlier loss at once (one nft transaction); ``0`` clears it. Every packet seen and every
        packet dropped is counted (:meth:`loss_counts`) from the first call on; a new percentage keeps no
        counts of the earlier one.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss is a percentage, got {percent}")
        script = f"table inet {LOSS_TABLE}\ndelete table inet {LOSS_TABLE}\n"  # gone, whether there or not
        if percent:
            chains = []
            for chain, hook, match in (("out", "output", "oifname"), ("in", "input", "iifname")):
                chains.append(
                    f"  chain {chain} {{ type filter hook {hook} priority 0; policy accept;\n"
                    f'    {match} "{self.ns_if}" counter\n'
                    f'    {match} "{self.ns_if}" numgen random mod 100 < {percent} counter drop\n  }}'
                )
            script += f"table inet {LOSS_TABLE} {{\n" + "\n".join(chains) + "\n}\n"
        self._nft(script=script)

    def clear_loss(self) -> None:
        """No packet is dropped on the link any more (the counts go with the table)."""
        self.set_loss(0)

    def loss_counts(self) -> dict[str, tuple[int, int]]:
        """Per direction (``out``, ``in``): (packets seen, packets dropped) since the percentage was set."""
        listing = json.loads(self._nft("-j", "list", "table", "inet", LOSS_TABLE))
        counts: dict[str, list[int]] = {}
        for item in listing.get("nftables", []):
            rule = item.get("rule")
            if rule is None:
                continue
            packets = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
            counts.setdefault(rule["chain"], []).append(packets)
        return {chain: (seen, dropped) for chain, (seen, dropped) in counts.items()}


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
