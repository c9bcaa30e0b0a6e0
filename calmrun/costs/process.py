"""The aggregator in a child process (``python -m calmrun.costs``), for the demo, benches and tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calmrun.settings import SecuritySettings, Settings


class AggregatorProcess:
    """``with AggregatorProcess(settings) as agg:``; leaving stops it with SIGTERM (``kill()`` is kill -9).

    Args:
        settings: broker, prefix and partitions are passed on the command line; ``costs`` settings through
            the environment (``CALMRUN_COSTS__*``).
        log: where its output goes (appended); none: discarded.
        extra: more command-line arguments (``--metrics-port N``).
    """

    def __init__(self, settings: Settings, *, log: Path | None = None, extra: Sequence[str] = ()) -> None:
        self.settings, self.log_path, self.extra = settings, log, list(extra)
        self.proc: Any = None

    def start(self) -> AggregatorProcess:
        k, c = self.settings.kafka, self.settings.costs
        args = [
            sys.executable,
            "-m",
            "calmrun.costs",
            "--bootstrap",
            k.bootstrap,
            "--prefix",
            k.prefix,
            "--partitions",
            str(k.partitions),
            "--loglevel",
            "warning",
            *self.extra,
        ]
        out: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            "CALMRUN_COSTS__EMIT_INTERVAL_S": str(c.emit_interval_s),
            "CALMRUN_COSTS__SESSION_TIMEOUT_S": str(c.session_timeout_s),
            "CALMRUN_COSTS__MAX_BATCH": str(c.max_batch),
            # the child authenticates as this process does; an env:/file: secret stays a reference
            "CALMRUN_KAFKA__SECURITY": security_json(k.security),
        }
        if c.app_id:
            env["CALMRUN_COSTS__APP_ID"] = c.app_id
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        if out is not subprocess.DEVNULL:
            out.close()
        return self

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no commit, no flush (the crash a restart must survive)."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, wait_s: float = 30.0) -> None:
        """SIGTERM, then kill -9 when it has not exited within ``wait_s``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> AggregatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def security_json(sec: SecuritySettings) -> str:
    """``kafka.security`` as JSON for a child's ``CALMRUN_KAFKA__SECURITY`` (secrets as configured)."""
    data = sec.model_dump(mode="json")
    if sec.sasl.password is not None:
        data["sasl"]["password"] = sec.sasl.password.get_secret_value()
    if sec.tls.key_password is not None:
        data["tls"]["key_password"] = sec.tls.key_password.get_secret_value()
    return json.dumps(data)
