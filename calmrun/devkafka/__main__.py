"""``python -m calmrun.devkafka {fetch,start,stop,status,certs}``: the local KRaft broker, from a shell.

``start --brokers 3`` starts a three-node cluster instead (client ports ``--port``, ``--port``+1, ...;
replication factor 3, ``min.insync.replicas`` 2; see :mod:`calmrun.devkafka.cluster`); ``stop`` and
``status`` take the same ``--brokers``.

``start --secured`` starts the secured mode (SASL_SSL, mTLS, ACLs) and writes client config files;
``certs --out DIR --host NAME`` only makes certificates (for the secured docker compose profile).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import yaml

from calmrun.devkafka import KAFKA_VERSION, DevKafka, Secured, fetch_jars, java_binary
from calmrun.devkafka.certs import load_certs, make_certs
from calmrun.devkafka.cluster import DevCluster
from calmrun.errors import DevKafkaError


def secured_mode(data_dir: Path, users: list[str]) -> Secured:
    """Certificates and passwords of the secured mode, made once in ``data_dir`` and reused on restarts.

    Writes ``clients/<user>.password`` and, per user, ``clients/<user>-sasl.yaml`` and
    ``clients/<user>-mtls.yaml``: calmrun config files (``--config``) whose password is a ``file:`` reference.
    """
    names = list(dict.fromkeys(["admin", *users]))
    certs = load_certs(data_dir / "certs", names) or make_certs(data_dir / "certs", names)
    clients = data_dir / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    passwords: dict[str, str] = {}
    for user in names:
        file = clients / f"{user}.password"
        if not file.exists():
            file.write_text(secrets.token_hex(16) + "\n")
            file.chmod(0o600)
        passwords[user] = file.read_text().strip()
    return Secured(certs, passwords)


def write_client_configs(broker: DevKafka) -> list[Path]:
    assert broker.secured is not None
    written = []
    for user in broker.secured.passwords:
        for via in ("sasl", "mtls"):
            kafka = broker.client_settings(user, via=via)
            if via == "sasl":
                kafka["security"]["sasl"]["password"] = (
                    f"file:{broker.data_dir.parent / 'clients' / user}.password"
                )
            path = broker.data_dir.parent / "clients" / f"{user}-{via}.yaml"
            path.write_text(yaml.safe_dump({"kafka": kafka}))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calmrun.devkafka", description=__doc__)
    parser.add_argument("command", choices=["fetch", "start", "stop", "status", "certs"])
    parser.add_argument("--out", type=Path, help="certs: where to write them (default <data-dir>/certs)")
    parser.add_argument("--host", action="append", default=[], help="certs: another name of the broker")
    parser.add_argument("--port", type=int, default=9092, help="client port on 127.0.0.1 (default 9092)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".calmrun/kafka"),
        help="storage, logs and PID file (default .calmrun/kafka)",
    )
    parser.add_argument("--fresh", action="store_true", help="wipe the data directory before starting")
    parser.add_argument(
        "--secured",
        action="store_true",
        help="SASL_SSL on --port, mTLS on --ssl-port, ACLs enforced (admin is the super user)",
    )
    parser.add_argument(
        "--brokers", type=int, default=1, help="nodes of a local cluster (3: replicated as in production)"
    )
    parser.add_argument("--ssl-port", type=int, default=9093, help="secured mode: the mTLS port")
    parser.add_argument(
        "--user", action="append", default=[], help="secured mode: a SCRAM/PLAIN user and cert (repeatable)"
    )
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve()
    broker = DevKafka(data_dir=data_dir, port=args.port)
    if args.secured and args.command != "start":
        broker = DevKafka(data_dir=data_dir / "kafka", port=args.port, ssl_port=args.ssl_port)
    elif args.secured:
        if args.fresh and data_dir.exists():
            import shutil

            shutil.rmtree(data_dir)
        # storage under kafka/, certificates and client configs beside it
        broker = DevKafka(
            data_dir=data_dir / "kafka",
            port=args.port,
            ssl_port=args.ssl_port,
            secured=secured_mode(data_dir, args.user),
        )
    if args.brokers > 1:
        cluster = DevCluster(data_dir, brokers=args.brokers, base_port=args.port)
        return cluster_main(args.command, cluster, args)
    try:
        if args.command == "certs":
            out = args.out or data_dir / "certs"
            made = make_certs(out, ["admin", *args.user], hosts=args.host, mode=0o644)
            print(f"CA {made.ca}, broker {made.broker.bundle}, users {sorted(made.users)} in {out}")
        elif args.command == "fetch":
            java_binary()
            print(f"Kafka {KAFKA_VERSION} jars in {fetch_jars()}")
        elif args.command == "start":
            broker.start(fresh=args.fresh and not args.secured)
            print(
                f"Kafka {KAFKA_VERSION} (KRaft) answers at {broker.bootstrap} "
                f"(pid {broker.running_pid()}, data {broker.data_dir})"
            )
            if broker.secured is not None:
                print(f"SASL_SSL at {broker.bootstrap}, mTLS at {broker.ssl_bootstrap}; client configs:")
                for path in write_client_configs(broker):
                    print(f"  {path}")
        elif args.command == "stop":
            print("stopped" if broker.stop() else f"no broker running from {broker.data_dir}")
        else:
            pid = broker.running_pid()
            print(f"running at {broker.bootstrap} (pid {pid})" if pid else "not running")
            return 0 if pid else 1
    except DevKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cluster_main(command: str, cluster: DevCluster, args: argparse.Namespace) -> int:
    """``start``/``stop``/``status`` of a local cluster of ``--brokers`` nodes."""
    try:
        if command == "start":
            cluster.start(fresh=args.fresh)
            pids = ", ".join(f"node {i} pid {cluster.pid(i)}" for i in cluster.ids)
            print(f"Kafka {KAFKA_VERSION} (KRaft), {cluster.brokers} nodes at {cluster.bootstrap} ({pids})")
        elif command == "stop":
            print("stopped" if cluster.stop() else f"no node running from {cluster.data_dir}")
        elif command == "status":
            up = [i for i in cluster.ids if cluster.pid(i)]
            print(f"{len(up)} of {cluster.brokers} nodes running ({cluster.bootstrap})")
            return 0 if len(up) == cluster.brokers else 1
        else:
            print(f"error: {command} is for one broker (drop --brokers)", file=sys.stderr)
            return 2
    except DevKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
