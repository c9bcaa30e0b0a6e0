"""A Schema Registry stand-in for the tests: Confluent's REST API (v1) as its documentation states it.

Most tests use a real registry (``conftest.py``: Apicurio Registry, built by ``calmrun.devregistry``).
This stand-in serves the two things that one cannot: basic auth (Apicurio authenticates through an
OpenID Connect server, which does not run here), and a log of the calls it answers (the cache tests count
them). It answers the calls calmrun makes with the status codes, error codes and message texts of
Confluent's API reference (40401 subject not found, 40403 schema not found, 409 on an incompatible schema,
401 without valid basic auth), assigns one global ID per distinct schema (as Confluent does: the same
schema under two subjects has one ID) and applies BACKWARD/FORWARD/FULL/NONE with a simple rule (same
record name; a field without a default must be on the other side). It runs in its own thread, because
calmrun's registry client blocks: a server on the test's event loop would never answer it.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class RegistryStub:
    """The registry's state: schemas by ID, versions per subject, compatibility rules, users."""

    def __init__(self, users: dict[str, str] | None = None, compatibility: str = "BACKWARD") -> None:
        self.users = users or {}
        self.global_rule = compatibility
        self.rules: dict[str, str] = {}
        self.schemas: list[str] = []  # ID - 1 -> canonical text
        self.subjects: dict[str, list[int]] = {}
        self.calls: list[tuple[str, str, str | None]] = []  # (method, path, user)
        self.lock = threading.Lock()

    def answer(
        self, method: str, path: str, query: dict[str, list[str]], auth: str | None, body: Any
    ) -> tuple[int, Any]:
        user = self._user(auth)
        with self.lock:
            self.calls.append((method, path, user))
        if self.users and user is None:
            return 401, {"error_code": 401, "message": "Unauthorized"}
        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self.lock:
            return self._route(method, parts, query, body)

    def _user(self, auth: str | None) -> str | None:
        if not auth or not auth.startswith("Basic "):
            return None
        name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return name if self.users.get(name) == password else None

    def _route(self, method: str, p: list[str], query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if method == "GET" and p == ["subjects"]:
            return 200, sorted(self.subjects)
        if method == "GET" and len(p) == 3 and p[:2] == ["schemas", "ids"]:
            i = int(p[2])
            if 1 <= i <= len(self.schemas):
                return 200, {"schema": self.schemas[i - 1]}
            return 404, {"error_code": 40403, "message": f"Schema {i} not found"}
        if method == "POST" and len(p) == 3 and p[0] == "subjects" and p[2] == "versions":
            return self._register(p[1], body["schema"])
        if method == "POST" and len(p) == 2 and p[0] == "subjects":
            return self._lookup(p[1], body["schema"])
        if method == "POST" and p[:2] == ["compatibility", "subjects"] and p[3:] == ["versions", "latest"]:
            subject = p[2]
            if subject not in self.subjects:
                return 404, {"error_code": 40401, "message": f"Subject '{subject}' not found."}
            problems = self._problems(subject, body["schema"])
            return 200, {"is_compatible": not problems, "messages": problems}
        if p == ["config"]:
            if method == "PUT":
                self.global_rule = body["compatibility"]
                return 200, {"compatibility": self.global_rule}
            return 200, {"compatibilityLevel": self.global_rule}
        if len(p) == 2 and p[0] == "config":
            if method == "PUT":
                self.rules[p[1]] = body["compatibility"]
                return 200, {"compatibility": body["compatibility"]}
            if p[1] in self.rules:
                return 200, {"compatibilityLevel": self.rules[p[1]]}
            if query.get("defaultToGlobal") == ["true"]:
                return 200, {"compatibilityLevel": self.global_rule}
            return 404, {
                "error_code": 40408,
                "message": f"Subject '{p[1]}' does not have subject-level compatibility configured",
            }
        return 404, {"error_code": 404, "message": "HTTP 404 Not Found"}

    def _canonical(self, text: str) -> str:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))

    def _id_of(self, text: str) -> int:
        canon = self._canonical(text)
        for i, known in enumerate(self.schemas):
            if self._canonical(known) == canon:
                return i + 1
        self.schemas.append(text)
        return len(self.schemas)

    def _register(self, subject: str, text: str) -> tuple[int, Any]:
        versions = self.subjects.get(subject, [])
        canon = self._canonical(text)
        for i in versions:
            if self._canonical(self.schemas[i - 1]) == canon:
                return 200, {"id": i}
        problems = self._problems(subject, text) if versions else []
        if problems:
            return 409, {
                "error_code": 409,
                "message": f"Schema being registered is incompatible with an earlier schema for subject "
                f'"{subject}", details: {problems}',
            }
        schema_id = self._id_of(text)
        self.subjects.setdefault(subject, []).append(schema_id)
        return 200, {"id": schema_id}

    def _lookup(self, subject: str, text: str) -> tuple[int, Any]:
        if subject not in self.subjects:
            return 404, {"error_code": 40401, "message": f"Subject '{subject}' not found."}
        canon = self._canonical(text)
        for version, i in enumerate(self.subjects[subject], 1):
            if self._canonical(self.schemas[i - 1]) == canon:
                return 200, {"subject": subject, "version": version, "id": i, "schema": self.schemas[i - 1]}
        return 404, {"error_code": 40403, "message": "Schema not found"}

    def _problems(self, subject: str, text: str) -> list[str]:
        rule = self.rules.get(subject, self.global_rule)
        if rule.startswith("NONE") or subject not in self.subjects:
            return []
        new, old = json.loads(text), json.loads(self.schemas[self.subjects[subject][-1] - 1])
        if (new.get("namespace"), new.get("name")) != (old.get("namespace"), old.get("name")):
            return [
                "{errorType:'NAME_MISMATCH', description:'The name of the schema has changed (path "
                "'/name')', "
                f"additionalInfo:'expected: {old.get('namespace')}.{old.get('name')}'}}"
            ]
        out = []
        if rule.startswith(("BACKWARD", "FULL")):
            out += _missing_defaults(reader=new, writer=old)
        if rule.startswith(("FORWARD", "FULL")):
            out += _missing_defaults(reader=old, writer=new)
        return out


def _missing_defaults(reader: dict[str, Any], writer: dict[str, Any]) -> list[str]:
    written = {f["name"] for f in writer.get("fields", [])}
    return [
        f"{{errorType:'READER_FIELD_MISSING_DEFAULT_VALUE', description:'The field '{f['name']}' at path "
        f"'/fields/{i}' in the new schema has no default value and is missing in the old schema'}}"
        for i, f in enumerate(reader.get("fields", []))
        if f["name"] not in written and "default" not in f
    ]


@contextmanager
def serving(stub: RegistryStub, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Serve ``stub`` on 127.0.0.1 in a thread; yields its base URL (``https`` with ``tls``: the
    server's certificate chain and key, PEM)."""

    class Handler(BaseHTTPRequestHandler):
        def _do(self) -> None:
            url = urlsplit(self.path)
            size = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(size)) if size else None
            status, answer = stub.answer(
                self.command, url.path, parse_qs(url.query), self.headers.get("Authorization"), body
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _do

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
