"""Secrets in configuration: the value itself, ``env:NAME`` (read when a client starts) or ``file:PATH``.

Used for the SASL password, a TLS key's password and the Schema Registry's password; a secret is never
logged, written to a topic or exported.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from calmrun.errors import ConfigError


def resolve_secret(value: SecretStr, what: str) -> str:
    """The secret itself: as given, or read from ``env:NAME`` or ``file:PATH``.

    Raises:
        ConfigError: the variable is unset or the file unreadable or empty (the message never holds it).
    """
    raw = value.get_secret_value()
    if raw.startswith("env:"):
        found = os.environ.get(raw[4:])
        if not found:
            raise ConfigError(f"{what} names ${raw[4:]}, which is not set")
        return found
    if raw.startswith("file:"):
        path = Path(raw[5:]).expanduser()
        try:
            found = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from None
        if not found:
            raise ConfigError(f"the {what} file {path} is empty")
        return found
    return raw
