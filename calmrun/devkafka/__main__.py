"""``python -m calmrun.devkafka {fetch,start,stop,status}``: the local KRaft broker from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calmrun.devkafka import KAFKA_VERSION, DevKafka, fetch_jars, java_binary
from calmrun.errors import DevKafkaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calmrun.devkafka", description=__doc__)
    parser.add_argument("command", choices=["fetch", "start", "stop", "status"])
    parser.add_argument("--port", type=int, default=9092, help="client port on 127.0.0.1 (default 9092)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".calmrun/kafka"),
        help="storage, logs and PID file (default .calmrun/kafka)",
    )
    parser.add_argument("--fresh", action="store_true", help="wipe the data directory before starting")
    args = parser.parse_args(argv)
    broker = DevKafka(data_dir=args.data_dir.resolve(), port=args.port)
    try:
        if args.command == "fetch":
            java_binary()
            print(f"Kafka {KAFKA_VERSION} jars in {fetch_jars()}")
        elif args.command == "start":
            broker.start(fresh=args.fresh)
            print(
                f"Kafka {KAFKA_VERSION} (KRaft) answers at {broker.bootstrap} "
                f"(pid {broker.running_pid()}, data {broker.data_dir})"
            )
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


if __name__ == "__main__":
    sys.exit(main())
