"""A client of a Confluent-compatible Schema Registry's REST API (Confluent, Apicurio ccompat, Karapace).

Blocking (``urllib``) on purpose: the codec that calls it is synchronous, and it calls it once per
subject written and once per schema ID read by this process; every answer is cached (a schema ID never
changes meaning), so a running worker asks the registry nothing after its first records.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from calmrun.errors import RegistryAuthError, RegistryError, SchemaIncompatibleError
from calmrun.secret import resolve_secret
from calmrun.wire.settings import RegistrySettings

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402


class RegistryClient:
    """Registers, looks up and fetches Avro schemas; thread-safe, answers cached.

    Args:
        settings: the registry's URL, basic auth and TLS.
    """

    def __init__(self, settings: RegistrySettings) -> None:
        if settings.url is None:
            raise ValueError("RegistryClient needs wire.registry.url")
        self.url = settings.url.rstrip("/")
        self.user = settings.username
        self._timeout = settings.timeout_s
        self._auth: str | None = None
        if settings.username is not None and settings.password is not None:
            secret = resolve_secret(settings.password, "wire.registry.password")
            token = base64.b64encode(f"{settings.username}:{secret}".encode()).decode()
            self._auth = f"Basic {token}"
        self._ssl = _ssl_context(settings) if self.url.startswith("https://") else None
        self._schemas: dict[int, str] = {}
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def schema(self, schema_id: int) -> str:
        """The schema (JSON text) registered under ``schema_id``.

        Raises:
            RegistryError: no such ID (``code`` 40403), no answer, or a refusal (``RegistryAuthError``).
        """
        with self._lock:
            found = self._schemas.get(schema_id)
        if found is None:
            found = str(self._call("GET", f"/schemas/ids/{schema_id}")["schema"])
            with self._lock:
                self._schemas[schema_id] = found
        return found

    def register(self, subject: str, schema: str) -> int:
        """Register ``schema`` under ``subject`` (idempotent: the same schema gets its existing ID).

        Raises:
            SchemaIncompatibleError: the subject's compatibility rule refuses it (HTTP 409).
            RegistryError: no answer, or a refusal (``RegistryAuthError``).
        """
        return self._id(subject, schema, register=True)

    def lookup(self, subject: str, schema: str) -> int:
        """The ID of ``schema`` already registered under ``subject``.

        Raises:
            RegistryError: not registered there (``code`` 40401/40403), no answer, or a refusal.
        """
        return self._id(subject, schema, register=False)

    def _id(self, subject: str, schema: str, *, register: bool) -> int:
        with self._lock:
            found = self._ids.get((subject, schema))
        if found is not None:
            return found
        path = f"/subjects/{quote(subject, safe='')}" + ("/versions" if register else "")
        try:
            answer = self._call("POST", path, {"schema": schema})
        except RegistryError as exc:
            if register and exc.status == 409:
                raise SchemaIncompatibleError(self.url, subject=subject, messages=[exc.detail]) from None
            raise
        schema_id = int(answer["id"])
        with self._lock:
            self._ids[(subject, schema)] = schema_id
            self._schemas.setdefault(schema_id, schema)
        return schema_id

    def incompatibilities(self, subject: str, schema: str) -> list[str]:
        """Why ``schema`` may not follow the latest version of ``subject``; empty when it may (or when
        the subject has no version yet).

        Raises:
            RegistryError: no answer, or a refusal (``RegistryAuthError``).
        """
        path = f"/compatibility/subjects/{quote(subject, safe='')}/versions/latest?verbose=true"
        try:
            answer = self._call("POST", path, {"schema": schema})
        except RegistryError as exc:
            if exc.code in (SUBJECT_NOT_FOUND, VERSION_NOT_FOUND) or (exc.status == 404 and exc.code is None):
                return []
            raise
        if answer.get("is_compatible", False):
            return []
        messages = answer.get("messages") or []
        if not messages and answer.get("reason"):  # Apicurio's Confluent API: one text, not a list
            messages = [answer["reason"]]
        return [str(m) for m in messages] or ["the registry answered is_compatible: false"]

    def compatibility(self, subject: str) -> str:
        """The compatibility rule in force for ``subject`` (its own, else the registry's default)."""
        try:
            answer = self._call("GET", f"/config/{quote(subject, safe='')}?defaultToGlobal=true")
        except RegistryError as exc:
            if exc.status != 404:
                raise
            answer = self._call("GET", "/config")
        return str(answer.get("compatibilityLevel") or answer.get("compatibility") or "?")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", CONTENT_TYPE)
        if data is not None:
            req.add_header("Content-Type", CONTENT_TYPE)
        if self._auth is not None:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")[:500]
            code, message = _error_body(text)
            if status in (401, 403):
                raise RegistryAuthError(self.url, status=status, user=self.user, detail=message) from None
            raise RegistryError(self.url, status=status, code=code, detail=message) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(self.url, status=None, detail=f"{method} {path}: {reason}") from None
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            raise RegistryError(self.url, status=200, detail=f"{method} {path}: not JSON") from None
        if not isinstance(parsed, dict):
            raise RegistryError(self.url, status=200, detail=f"{method} {path}: not a JSON object")
        return parsed


def _error_body(text: str) -> tuple[int | None, str]:
    """The registry's ``error_code`` and ``message`` from an error answer, else the text itself."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return None, text.strip() or "(empty answer)"
    if not isinstance(parsed, dict):
        return None, text.strip()
    code = parsed.get("error_code")
    return (int(code) if isinstance(code, int) else None), str(parsed.get("message") or text.strip())


def _ssl_context(settings: RegistrySettings) -> ssl.SSLContext:
    tls = settings.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None and tls.key_file is not None:
        password = None
        if tls.key_password is not None:
            password = resolve_secret(tls.key_password, "wire.registry.tls.key_password")
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=password)
    return ctx
