"""DBOS's side (peers' venv): the workflow as a DBOS app on PostgreSQL, driven in the same process.

    python -m bench.peers.dbos_load --database postgresql://postgres@127.0.0.1:PORT [--runs N ...]

DBOS is a library: its workflows run in the application's process and checkpoint each step to Postgres
before the next, so the app and the load generator are one process here (threads keep ``--concurrency``
runs in flight, each under its own workflow ID).
"""

from __future__ import annotations

from typing import Any

import psycopg
from dbos import DBOS, DBOSConfig, SetWorkflowID

from bench.peers import loadgen


@DBOS.step()
def _step(n: int, label: str) -> dict[str, Any]:
    return loadgen.step(n, label)


@DBOS.workflow()
def lin(item: dict[str, Any]) -> dict[str, Any]:
    out = item
    for name in ("s1", "s2", "s3"):
        out = _step(int(out["n"]), f"{name}:1")
    return out


def call(run_id: str) -> None:
    with SetWorkflowID(run_id):
        out = lin({"n": 0})
    if out.get("n") != 3:
        raise RuntimeError(f"run {run_id}: {out}")


def main() -> None:
    parser = loadgen.parser(__doc__ or "")
    parser.add_argument("--database", required=True, help="server URL; database 'bench' is created")
    parser.add_argument("--pool", type=int, default=120, help="DBOS system database connections")
    parser.set_defaults(self_name="app + load generator")
    a = parser.parse_args()
    with psycopg.connect(a.database + "/postgres", autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS bench")
        conn.execute("CREATE DATABASE bench")
    config: DBOSConfig = {
        "name": "calmrun-bench",
        "system_database_url": a.database + "/bench",
        "sys_db_pool_size": a.pool,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        loadgen.measure_threads(a, call)
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    main()
