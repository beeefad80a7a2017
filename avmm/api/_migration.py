"""The request bodies of live migration: ``POST /vms/incoming`` and
``POST /vms/{id}/migrate``, checked before anything reaches the Host.

Addresses are ``unix:/abs/path`` (a socket path: absolute, at most 107 bytes) or
``tcp:HOST:PORT`` (a host name, an IPv4 address or a bracketed IPv6 address, and a port
1-65535). A bad one is a 400 that names the key; where a ``unix:`` path may be is the
Host's :class:`~avmm.paths.PathPolicy` (403).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from ..paths import UNIX_SOCKET_PATH_MAX
from ._errors import HttpError, absolute_path

__all__ = ["DOWNTIME_MS_MAX", "IncomingRequest", "MigrateRequest", "parse_address",
           "parse_incoming", "parse_migrate"]

#: The largest downtime budget accepted (ms): past it, stopping the VM to copy is cheaper.
DOWNTIME_MS_MAX: Final = 600_000
DOWNTIME_MS_DEFAULT: Final = 300
#: The keys of each request body.
INCOMING_KEYS: Final = ("listen", "config", "start", "accept_timeout_s")
MIGRATE_KEYS: Final = ("to", "downtime_ms")
#: A DNS name: labels of letters, digits and '-', separated by dots.
_HOST_NAME: Final = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                               r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_TCP: Final = re.compile(r"tcp:(?P<host>\[[^\]]*\]|[^:\[\]]*):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class IncomingRequest:
    listen: str
    config: dict[str, Any] | None
    start: bool
    accept_timeout_s: float | None = None


@dataclass(frozen=True)
class MigrateRequest:
    to: str
    downtime_ms: int


def parse_address(value: Any, key: str, *, listen: bool = False) -> str:
    """``value`` if it is a migration address (see the module docstring; port 0, a
    port the kernel picks, only to ``listen``), else a 400 naming ``key``."""
    if not isinstance(value, str):
        raise HttpError(400, f'{key} must be a string ("unix:/abs/path" or '
                        f'"tcp:HOST:PORT"), got {type(value).__name__}', {"key": key})
    if value.startswith("unix:"):
        path = absolute_path(value[len("unix:"):], key)
        size = len(path.encode())
        if size > UNIX_SOCKET_PATH_MAX:
            raise HttpError(400, f"{key}: the socket path is {size} bytes long; a unix "
                            f"socket path has at most {UNIX_SOCKET_PATH_MAX}", {"key": key})
        return value
    match = _TCP.fullmatch(value)
    if match is None:
        raise HttpError(400, f'{key} must be "unix:/abs/path" or "tcp:HOST:PORT", got '
                        f"{value[:200]!r}", {"key": key})
    host, port = match["host"], int(match["port"])
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise HttpError(400, f"{key}: {host[:80]!r} is not an IPv6 address",
                            {"key": key}) from None
    elif not _HOST_NAME.fullmatch(host):
        raise HttpError(400, f"{key}: {host[:80]!r} is not a host name or IPv4 address "
                        "(write an IPv6 address in brackets)", {"key": key})
    if not (0 if listen else 1) <= port <= 65535:
        raise HttpError(400, f"{key}: port {port} is not between "
                        f"{0 if listen else 1} and 65535", {"key": key})
    return value


def _only(data: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    extra = [key for key in data if key not in keys]
    if extra:
        raise HttpError(400, f"unknown key {extra[0]!r} in {what}; it takes "
                        + ", ".join(f'"{key}"' for key in keys), {"key": extra[0]})


def parse_incoming(data: dict[str, Any]) -> IncomingRequest:
    """The body of ``POST /vms/incoming``: ``listen``, optional ``config`` (an object
    with the vm.toml schema, validated later against the files), ``start`` and
    ``accept_timeout_s`` (seconds to wait for the source; null or left out: no
    limit)."""
    _only(data, INCOMING_KEYS, "the incoming request")
    if "listen" not in data:
        raise HttpError(400, 'the incoming request needs "listen": "unix:/abs/path" or '
                        '"tcp:HOST:PORT"', {"key": "listen"})
    listen = parse_address(data["listen"], "listen", listen=True)
    config = data.get("config")
    if config is not None and not isinstance(config, dict):
        raise HttpError(400, "config must be an object with the vm.toml schema, got "
                        f"{type(config).__name__}", {"key": "config"})
    start = data.get("start", True)
    if not isinstance(start, bool):
        raise HttpError(400, f"start must be true or false, got {type(start).__name__}",
                        {"key": "start"})
    accept_timeout_s = data.get("accept_timeout_s")
    if accept_timeout_s is not None and (
            isinstance(accept_timeout_s, bool)
            or not isinstance(accept_timeout_s, int | float)
            or not math.isfinite(accept_timeout_s) or accept_timeout_s <= 0):
        raise HttpError(400, "accept_timeout_s must be a positive number of seconds (or "
                        f"null for no limit), got {str(accept_timeout_s)[:40]}",
                        {"key": "accept_timeout_s"})
    return IncomingRequest(listen, config, start, accept_timeout_s)


def parse_migrate(data: dict[str, Any]) -> MigrateRequest:
    """The body of ``POST /vms/{id}/migrate``: ``to`` and optional ``downtime_ms``."""
    _only(data, MIGRATE_KEYS, "the migrate request")
    if "to" not in data:
        raise HttpError(400, 'the migrate request needs "to": the destination\'s address, '
                        '"unix:/abs/path" or "tcp:HOST:PORT"', {"key": "to"})
    to = parse_address(data["to"], "to")
    downtime_ms = data.get("downtime_ms", DOWNTIME_MS_DEFAULT)
    if isinstance(downtime_ms, bool) or not isinstance(downtime_ms, int):
        raise HttpError(400, "downtime_ms must be an integer (milliseconds), got "
                        f"{type(downtime_ms).__name__}", {"key": "downtime_ms"})
    if not 1 <= downtime_ms <= DOWNTIME_MS_MAX:
        raise HttpError(400, f"downtime_ms must be between 1 and {DOWNTIME_MS_MAX}, got "
                        f"{downtime_ms}", {"key": "downtime_ms"})
    return MigrateRequest(to, downtime_ms)
