"""A local Jaeger: the real OTLP receiver of the tracing tests, the docs' screenshot and the tracing bench.

``python -m calmrun.devjaeger build`` (``make tools``) builds Jaeger from its Go module, pinned below, with
the Go toolchain (``go`` on the PATH or ``/usr/local/go/bin/go``) into a cache reused by every later start,
as ``calmrun.devkafka`` caches the broker's jars. ``DevJaeger`` starts it on free local ports with memory
storage: OTLP over HTTP in, Jaeger's HTTP query API and UI out. ``python -m calmrun.devjaeger run`` starts
one in the foreground (UI on http://127.0.0.1:16686/, OTLP on http://127.0.0.1:4318/v1/traces).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from calmrun.errors import DevJaegerError
from calmrun.localproc import free_port, tail, terminate

JAEGER_VERSION = "1.75.0"
MODULE = "github.com/jaegertracing/jaeger"

_CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 20000
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}{ui}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
"""


def default_cache_dir() -> Path:
    """Where the binary is cached: ``$CALMRUN_JAEGER_CACHE`` or ``$XDG_CACHE_HOME/calmrun/jaeger-<ver>``."""
    env = os.environ.get("CALMRUN_JAEGER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "calmrun" / f"jaeger-{JAEGER_VERSION}"


def _go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if found is None:
        raise DevJaegerError("the Go toolchain is missing: install it (apt-get install golang-go) and retry")
    return found


def build(cache_dir: Path | None = None) -> Path:
    """Build Jaeger once (``go get -tool`` of the pinned module, then ``go build``); later calls reuse it.

    Returns:
        The path of the ``jaeger`` binary.

    Raises:
        DevJaegerError: Go is missing or the build failed (the message ends with Go's output).
    """
    cache = cache_dir or default_cache_dir()
    binary = cache / "jaeger"
    if binary.exists():
        return binary
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    go = _go()
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    steps = [
        *([] if (src / "go.mod").exists() else [[go, "mod", "init", "calmrun.local/jaeger"]]),
        [go, "get", "-tool", f"{MODULE}/cmd/jaeger@v{JAEGER_VERSION}"],
        [go, "build", "-trimpath", "-o", str(binary) + ".part", f"{MODULE}/cmd/jaeger"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise DevJaegerError(f"{' '.join(cmd[:3])} failed in {src}:\n{out}")
    Path(str(binary) + ".part").rename(binary)
    return binary


class DevJaeger:
    """One Jaeger process with memory storage on free local ports; ``start()``/``stop()`` or ``with``.

    Args:
        data_dir: its configuration and log (a temporary directory by default).
        otlp_port, query_port: the OTLP/HTTP receiver's and the query API's ports (free ones by default).
        ui_assets: a built Jaeger UI (``packages/jaeger-ui/build`` of jaeger-ui) to serve: the Go module
            ships none, only a placeholder page.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        otlp_port: int | None = None,
        query_port: int | None = None,
        ui_assets: Path | None = None,
    ) -> None:
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="calmrun-jaeger-"))
        self.otlp_port = otlp_port or free_port()
        self.query_port = query_port or free_port()
        self.ui_assets = ui_assets
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def otlp_endpoint(self) -> str:
        """The URL for ``tracing.endpoint``."""
        return f"http://127.0.0.1:{self.otlp_port}/v1/traces"

    @property
    def query_url(self) -> str:
        """Jaeger's UI and HTTP query API (``/api/traces/<trace id>``)."""
        return f"http://127.0.0.1:{self.query_port}"

    def __enter__(self) -> DevJaeger:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Build if needed, start, and wait until the query API answers.

        Raises:
            DevJaegerError: it did not build, exited, or did not answer within ``timeout``.
        """
        binary = build()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "jaeger.yaml"
        ui = f"\n    ui:\n      assets_path: {self.ui_assets}" if self.ui_assets else ""
        ports = {"otlp": self.otlp_port, "query": self.query_port, "query_grpc": free_port()}
        config.write_text(_CONFIG.format(ui=ui, **ports))
        log = self.data_dir / "jaeger.log"
        with open(log, "ab") as out:
            self._proc = subprocess.Popen(
                [str(binary), "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DevJaegerError(f"jaeger exited with {self._proc.returncode}:\n{tail(log)}")
            try:
                self.get("/api/services")
                return
            except (OSError, DevJaegerError):
                time.sleep(0.3)
        self.stop()
        raise DevJaegerError(f"jaeger did not answer at {self.query_url} within {timeout:.0f}s:\n{tail(log)}")

    def stop(self) -> None:
        """End this process (only the one started here) and wait for it."""
        if self._proc is not None and self._proc.poll() is None:
            terminate(self._proc.pid, 10)
        self._proc = None

    def get(self, path: str) -> Any:
        """GET ``path`` of the query API as JSON.

        Raises:
            DevJaegerError: it answered with an HTTP error (a trace not found is a 404).
        """
        try:
            with urllib.request.urlopen(self.query_url + path, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise DevJaegerError(f"GET {path}: HTTP {exc.code}") from exc

    def trace(self, trace_id: int) -> dict[str, Any] | None:
        """A trace as Jaeger's query API gives it (``spans``, ``processes``), or None when it has none yet."""
        try:
            data = self.get(f"/api/traces/{trace_id:032x}")
        except DevJaegerError:
            return None
        traces = data.get("data") or []
        return dict(traces[0]) if traces else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m calmrun.devjaeger", description=__doc__)
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("--otlp-port", type=int, default=4318)
    parser.add_argument("--query-port", type=int, default=16686)
    parser.add_argument("--ui-assets", type=Path, help="a built Jaeger UI to serve (the module has none)")
    args = parser.parse_args(argv)
    if args.command == "build":
        started = time.monotonic()
        path = build()
        print(f"jaeger {JAEGER_VERSION}: {path} ({time.monotonic() - started:.0f} s)")
        return
    with DevJaeger(otlp_port=args.otlp_port, query_port=args.query_port, ui_assets=args.ui_assets) as jaeger:
        print(f"jaeger: OTLP {jaeger.otlp_endpoint}, UI {jaeger.query_url}/ (Ctrl-C stops it)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
