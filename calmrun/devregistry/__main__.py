"""``python -m calmrun.devregistry {build,start,stop,run}``: the local Apicurio Registry, from a shell."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from calmrun.devregistry import APICURIO_VERSION, DevRegistry, build, running_pid
from calmrun.errors import DevRegistryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calmrun.devregistry", description=__doc__)
    parser.add_argument("command", choices=["build", "start", "stop", "run"])
    parser.add_argument("--port", type=int, default=8081, help="the HTTP port (Confluent's default: 8081)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".calmrun/registry"), help="its log and pid file (start/stop)"
    )
    args = parser.parse_args(argv)
    registry = DevRegistry(args.data_dir.resolve(), port=args.port)
    try:
        if args.command == "build":
            started = time.monotonic()
            path = build()
            print(f"Apicurio Registry {APICURIO_VERSION}: {path} ({time.monotonic() - started:.0f} s)")
        elif args.command == "stop":
            found = running_pid(registry.pid_file) is not None
            registry.stop()
            print("stopped" if found else f"no registry running from {registry.data_dir}")
        elif running_pid(registry.pid_file) is not None:
            print(f"error: a registry from {registry.data_dir} already runs", file=sys.stderr)
            return 1
        elif args.command == "start":
            registry.start()
            print(
                f"Apicurio Registry {APICURIO_VERSION}: Confluent API at {registry.url} (log {registry.log})"
            )
        else:
            with registry:
                print(
                    f"Apicurio Registry {APICURIO_VERSION}: Confluent API at {registry.url} (Ctrl-C stops it)"
                )
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    except DevRegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
