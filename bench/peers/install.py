"""Installing the peers for ``python -m bench --peers``, from the package registries, outside the test path.

* Restate: the npm package ``@restatedev/restate-server`` (it ships the native server binary) into the npm
  prefix ``.calmrun/peers/restate``;
* a venv ``.calmrun/peers/venv`` with Restate's Python SDK, DBOS and what their load generators need
  (``requirements.txt`` beside this file): calmrun's own venv gets none of it;
* PostgreSQL for DBOS: Debian's ``postgresql`` package via apt-get (``apt-get update`` first) when no
  ``initdb`` is found.

``python -m bench.peers.install`` installs only; each step is skipped when its result is already there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT

HERE = Path(__file__).resolve().parent
HOME = ROOT / ".calmrun" / "peers"
RESTATE_SERVER = "@restatedev/restate-server@1.7.12"
"""The Restate release the README's earlier comparison used."""


class PeerInstallError(RuntimeError):
    """A peer could not be installed: the message says which command failed and how."""


@dataclass(frozen=True)
class Peers:
    python: Path  # the peers' venv interpreter
    restate_server: Path
    pg_bin: Path  # the directory holding initdb, pg_ctl and postgres
    versions: dict[str, str]


def _run(cmd: list[str], what: str, **kw: object) -> str:
    print(f"   peers: {what}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise PeerInstallError(f"{what} failed ({' '.join(cmd)} exited {done.returncode}):\n{tail}")
    return str(done.stdout)


def _venv() -> Path:
    python = HOME / "venv" / "bin" / "python"
    stamp = HOME / "venv" / ".installed"
    reqs = HERE / "requirements.txt"
    if stamp.exists() and stamp.read_text() == reqs.read_text():
        return python
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(HOME / "venv")], "venv for the peers")
    _run([str(python), "-m", "pip", "install", "-q", "-r", str(reqs)], "pip install dbos restate-sdk ...")
    stamp.write_text(reqs.read_text())
    return python


def _restate() -> Path:
    prefix = HOME / "restate"
    binary = prefix / "node_modules" / "@restatedev" / "restate-server-linux-x64" / "bin" / "restate-server"
    if binary.exists():
        return binary
    if shutil.which("npm") is None:
        raise PeerInstallError("npm is missing (apt-get install npm): Restate's server is an npm package")
    prefix.mkdir(parents=True, exist_ok=True)
    _run(
        ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", RESTATE_SERVER],
        f"npm install {RESTATE_SERVER}",
    )
    if not binary.exists():
        raise PeerInstallError(f"npm installed {RESTATE_SERVER} but {binary} is not there")
    return binary


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def _postgres() -> Path:
    found = _pg_bin()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PeerInstallError("PostgreSQL missing: apt-get install postgresql (DBOS keeps its state there)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-q", "postgresql"], "apt-get install postgresql", env=env)
    found = _pg_bin()
    if found is None:
        raise PeerInstallError("apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb exists")
    return found


def ensure() -> Peers:
    """Install whatever is missing and return where everything is, with the versions installed."""
    HOME.mkdir(parents=True, exist_ok=True)
    python = _venv()
    server = _restate()
    pg = _postgres()
    probe = "import json, importlib.metadata as m; print(json.dumps({d: m.version(d) for d in %r}))"
    dists = ("dbos", "restate-sdk", "hypercorn", "psycopg")
    versions = json.loads(_run([str(python), "-c", probe % (dists,)], "versions of the peers' packages"))
    versions["restate-server"] = _run([str(server), "--version"], "restate-server --version").split()[-1]
    versions["postgresql"] = _run([str(pg / "postgres"), "--version"], "postgres --version").split()[2]
    return Peers(python, server, pg, versions)


if __name__ == "__main__":
    print(json.dumps(ensure().versions))
