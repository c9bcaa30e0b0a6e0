"""Who is looking at the page, and what they may do.

A user is identified by a bearer token (``ui.users`` in configuration, or ``--token`` for one operator)
or by a header a trusted reverse proxy sets after authenticating them (``ui.trusted_header``). Roles:
``viewer`` reads with payloads redacted; ``operator`` also acts (approve, reject, signal, cancel,
redrive). With no authentication configured the page serves loopback only, and whoever reaches it is
the local operator.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from dataclasses import dataclass

from calmrun.errors import UiAccessError
from calmrun.settings import UiRole, UiSettings

COOKIE = "calmrun_ui_token"


@dataclass(frozen=True)
class User:
    name: str
    role: UiRole

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


LOCAL = User("local", "operator")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on the loopback interface."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(ai[4][0]).is_loopback for ai in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


class Access:
    """Maps a request's token or proxy header to a user.

    Args:
        settings: the ``ui`` settings (users with tokens, the trusted header and its roles).
        token: an extra operator token (``--token`` / ``CALMRUN_UI_TOKEN``), user name ``operator``.
    """

    def __init__(self, settings: UiSettings, token: str | None = None) -> None:
        self._tokens: dict[str, User] = {
            u.token.get_secret_value(): User(name, u.role) for name, u in settings.users.items()
        }
        if token:
            self._tokens[token] = User("operator", "operator")
        self.header = settings.trusted_header
        self.header_roles = dict(settings.header_roles)

    @property
    def configured(self) -> bool:
        return bool(self._tokens) or self.header is not None

    def check_host(self, host: str) -> None:
        """Refuse to serve off loopback without authentication.

        Raises:
            UiAccessError: ``host`` is not loopback and no token or trusted header is configured.
        """
        if not self.configured and not is_loopback(host):
            raise UiAccessError(host)

    def identify(self, token: str | None, headers: dict[str, str]) -> User | None:
        """The user of a request, or None (not authenticated)."""
        if not self.configured:
            return LOCAL
        if token:
            for known, user in self._tokens.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    return user
        if self.header is not None:
            name = headers.get(self.header.lower(), "").strip()
            if name:
                return User(name, self.header_roles.get(name, "viewer"))
        return None
