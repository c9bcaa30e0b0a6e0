"""``python -m calmrun.devregistry start``/``stop``: a local registry from a shell, as the docs give it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from calmrun.devregistry import running_pid
from calmrun.localproc import free_port, wait_gone


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "calmrun.devregistry", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_start_answers_and_stop_ends_it(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "registry"
    started = cli("start", "--port", str(port), "--data-dir", str(data))
    assert started.returncode == 0, started.stderr
    url = f"http://127.0.0.1:{port}/apis/ccompat/v7"
    pid = running_pid(data / "registry.pid")
    try:
        assert url in started.stdout and pid is not None
        again = cli("start", "--port", str(free_port()), "--data-dir", str(data))
        assert again.returncode == 1 and "already runs" in again.stderr
        with urllib.request.urlopen(url + "/subjects", timeout=10) as resp:
            assert json.loads(resp.read()) == []  # in-memory storage: every start is empty
    finally:
        stopped = cli("stop", "--data-dir", str(data))
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert wait_gone(pid, 30) and running_pid(data / "registry.pid") is None
    assert cli("stop", "--data-dir", str(data)).stdout.startswith("no registry running")
