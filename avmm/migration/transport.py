"""Where a migration stream goes: ``unix:/abs/path`` or ``tcp:HOST:PORT``.

The destination listens and accepts exactly one connection, then stops listening: a
migration stream is trusted input (it becomes a running guest), so nobody else gets a
second chance at the same listener. A unix socket is created with mode 0600 from the
moment it exists (:meth:`avmm.paths.PathPolicy.bind_socket`, inside the fd of its
directory as the path policy opened it) and removed when the listener closes; a listener
given an accept timeout gives up (and closes) when no source connects in time. The
source reaches a ``unix:`` destination through what its path policy opened
(:meth:`avmm.paths.PathPolicy.socket_address`), never by a name checked earlier. TCP has
no authentication: run it on a trusted network only (README, "Live migration").

A jailed worker may be handed its daemon's listener, or the connection the daemon
accepted and what it read of it (:class:`Accepted`, whose stream gives those bytes
first: :class:`PrefixedStream`).
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from ..errors import AvmmError, ConfigError
from ..isolation import ip_sockets
from ..paths import BoundSocket, PathPolicy
from .errors import MigrationError

#: The longest address string accepted (a unix path is at most 107 bytes anyway).
ADDRESS_MAX = 300
#: Socket buffer size asked for on both ends (the kernel caps it at its wmem_max /
#: rmem_max): the default ~200 KiB of a unix socket makes the sender and the receiver
#: take turns every 200 KiB; a bigger buffer lets them copy in bigger steps.
SOCKET_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class Address:
    """A parsed migration address."""

    kind: Literal["unix", "tcp"]
    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str, *, listen: bool = False) -> Address:
    """``unix:/abs/path`` or ``tcp:HOST:PORT`` (``[v6]`` for an IPv6 HOST; PORT 0 only
    to listen, on a port the kernel picks). :class:`MigrationError` otherwise."""
    if not isinstance(text, str) or len(text) > ADDRESS_MAX:
        raise MigrationError(f"migration address must be a string of at most {ADDRESS_MAX} "
                             "characters")
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise MigrationError(f"migration address {text!r}: use unix:/abs/path or "
                             "tcp:HOST:PORT")
    if kind == "unix":
        if not rest.startswith("/") or "\0" in rest:
            raise MigrationError(f"migration address {text!r}: a unix socket needs an "
                                 "absolute path")
        return Address("unix", path=Path(rest))
    host, sep, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise MigrationError(f"migration address {text!r}: use tcp:HOST:PORT")
    port = int(port_text)
    if not (0 if listen else 1) <= port <= 65535:
        raise MigrationError(f"migration address {text!r}: port must be 1..65535")
    return Address("tcp", host=host, port=port)


def check_accept_timeout(value: object) -> float | None:
    """``value`` as seconds to wait for a source (None: no limit); a
    :class:`MigrationError` naming ``accept_timeout_s`` unless it is a positive finite
    number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise MigrationError(f"accept_timeout_s must be a positive number of seconds "
                             f"(or None for no limit), got {value!r}")
    return float(value)


class Listener:
    """A bound, listening socket that accepts one connection (:meth:`accept_one`),
    within ``accept_timeout_s`` seconds if that is not None."""

    def __init__(self, address: Address, sock: socket.socket,
                 bound: BoundSocket | None, accept_timeout_s: float | None = None) -> None:
        self._sock = sock
        self._bound = bound
        self.accept_timeout_s = accept_timeout_s
        if address.kind == "tcp":
            host, port = sock.getsockname()[:2]
            address = Address("tcp", host=host, port=port)
        #: Where it listens (a TCP port 0 replaced by the port the kernel chose).
        self.address = address

    async def accept_one(self) -> trio.SocketStream:
        """Wait for the first connection, then stop listening (the socket file of a
        unix listener is removed).

        :raises MigrationError: no source connected within the accept timeout (the
            listener is closed all the same).
        """
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        try:
            with trio.move_on_after(math.inf if self.accept_timeout_s is None
                                    else self.accept_timeout_s):
                stream = await listener.accept()
                _big_buffers(stream)
                return stream
            raise MigrationError(f"no source connected within {self.accept_timeout_s:g} s "
                                 "(accept_timeout_s)")
        finally:
            # from_stdlib_socket took the descriptor: closing the trio socket closes it.
            await listener.aclose()
            self.close()

    def fileno(self) -> int:
        """The listening socket's fd (handed to a jailed worker, which accepts on it)."""
        return self._sock.fileno()

    def close(self) -> None:
        if self._bound is not None:
            self._bound.close()  # closes the socket, removes its file if still ours
            self._bound = None
        else:
            self._sock.close()


class StreamWrapper(trio.abc.Stream):
    """A stream that hands sending and closing to ``stream``; subclasses change how
    it receives."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class PrefixedStream(StreamWrapper):
    """A connection of which ``prefix`` was received elsewhere: it is received again
    first, then the socket's own bytes, as if none had been read (a jailed worker's
    daemon read a stream's header and config to plan the jail; the worker's
    destination reads them again, and its SHA-256 covers them)."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        super().__init__(stream)
        self._socket_stream = stream
        self._prefix = memoryview(prefix)

    @property
    def socket(self) -> trio.socket.SocketType | None:
        """The socket, once the prefix has been received (:class:`~avmm.migration.
        stream.Channel` then receives straight into guest RAM); None before."""
        return None if self._prefix else self._socket_stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            return bytes(chunk)
        return await self._stream.receive_some(max_bytes)


class Accepted:
    """A source's connection accepted elsewhere, with what was read of it (a jailed
    worker's daemon accepted it and read the stream's header and CONFIG frame): a
    :class:`Listener` whose one connection has already come."""

    accept_timeout_s: float | None = None

    def __init__(self, address: Address, sock: socket.socket, prefix: bytes) -> None:
        #: Where the daemon listened (a TCP port 0 already replaced by the kernel's).
        self.address = address
        self._sock: socket.socket | None = sock
        self._prefix = prefix

    async def accept_one(self) -> trio.abc.Stream:
        """The connection, its prefix received first (once only)."""
        if self._sock is None:
            raise MigrationError("the accepted connection was already taken")
        sock, self._sock = self._sock, None
        return PrefixedStream(adopt(sock), self._prefix)

    def close(self) -> None:
        """Close the connection if it was never taken (a taken one is its stream's)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen(address: Address, paths: PathPolicy, *,
           accept_timeout_s: float | None = None) -> Listener:
    """Bind and listen (blocking: call it from a worker thread)."""
    if address.kind == "unix":
        assert address.path is not None
        try:
            bound = paths.bind_socket(address.path, "listen")
        except AvmmError as e:
            raise MigrationError(f"cannot listen on {address}: {e}") from None
        return Listener(address, bound.socket, bound, accept_timeout_s)
    try:
        # ``avmm serve`` makes IP sockets on one thread only (avmm.isolation.ip_sockets).
        sock = ip_sockets.call(_tcp_listener, address.host, address.port)
    except OSError as e:
        raise MigrationError(f"cannot listen on {address}: {e.strerror or e}") from None
    return Listener(address, sock, None, accept_timeout_s)


def _tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(address: Address, paths: PathPolicy | None = None) -> trio.SocketStream:
    """Connect to a listening destination (the caller bounds the time it takes). A
    ``unix:`` socket is opened through ``paths`` (default: anywhere) and connected
    through that open fd, so that what is reached is what the policy allowed, whatever
    happens to the path's components meanwhile."""
    try:
        if address.kind == "unix":
            stream = await _connect_unix(address,
                                         paths if paths is not None else PathPolicy())
        else:
            stream = await _connect_tcp(address)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _big_buffers(stream)
        return stream
    except OSError as e:
        raise MigrationError(f"cannot connect to {address}: {e.strerror or e}") from None


def adopt(sock: socket.socket) -> trio.SocketStream:
    """A connection made elsewhere (a jailed worker's daemon connected it) as a stream
    of this process, with the buffers :func:`connect` gives."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _big_buffers(stream)
    return stream


async def _connect_tcp(address: Address) -> trio.SocketStream:
    """Each of the host's addresses in turn, until one accepts. Resolving and making
    each socket are the IP-socket thread's work in ``avmm serve``
    (avmm.isolation.ip_sockets); the connect itself is the event loop's, on the
    non-blocking socket it got."""
    infos = await ip_sockets.run(socket.getaddrinfo, address.host, address.port,
                                 socket.AF_UNSPEC, socket.SOCK_STREAM,
                                 abandon_on_cancel=True)
    error: OSError = OSError(f"{address.host} has no address")
    for family, kind, protocol, _name, target in infos:
        sock = await ip_sockets.run(socket.socket, family,
                                    kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                                    protocol)
        trio_sock = trio.socket.from_stdlib_socket(sock)
        try:
            await trio_sock.connect(target)
        except OSError as e:
            trio_sock.close()
            error = e
            continue
        except BaseException:
            trio_sock.close()
            raise
        return trio.SocketStream(trio_sock)
    raise error


async def _connect_unix(address: Address, paths: PathPolicy) -> trio.SocketStream:
    assert address.path is not None
    try:
        # Opening may block (a path on a slow file system): a worker thread.
        target, fd = await trio.to_thread.run_sync(paths.socket_address, address.path, "to")
    except ConfigError as e:  # HostFileError, PathNotAllowedError
        raise MigrationError(f"cannot connect to {address}: {e.reason}") from None
    try:
        return await trio.open_unix_socket(target)
    finally:
        if fd is not None:
            os.close(fd)  # the connection no longer needs the path


def _big_buffers(stream: trio.SocketStream) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            stream.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:  # pragma: no cover - a smaller buffer only costs speed
            pass


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
