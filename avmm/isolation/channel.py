"""The private channel between ``avmm serve`` and one VM's worker process (process
isolation): a SOCK_SEQPACKET socketpair, one JSON object per packet.

Seqpacket keeps message boundaries, so a message is one ``recv`` and a peer cannot make
the other side buffer without bound: a packet over :data:`MAX_MESSAGE` is an error, not
a larger read. Either side treats what comes from the other as untrusted data (the worker
runs the guest's device models; the daemon's checks do not rely on it behaving): a
message that is not a JSON object is a :class:`ChannelError`, and the connection is then
given up.

Requests carry ``"id"`` and ``"op"``; their answers carry the same ``"id"`` and either
``"result"`` or ``"error"`` (``{"type": ..., "message": ..., "key": ...}``). Messages
without ``"id"`` are events (``"event"``: ``status``, ``console``).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import AvmmError

#: The largest message either side sends or accepts (a VM's status, a console chunk in
#: base64). A SEQPACKET send is bounded by the socket's send buffer (SO_SNDBUF, about
#: 208 KiB by default): a limit above that could not be reached.
MAX_MESSAGE = 128 * 1024
#: The most fds one message carries (a snapshot's two files, a restore's directory).
MAX_FDS = 4


class ChannelError(AvmmError):
    """The other end of a worker channel broke the protocol or went away."""


class ChannelClosed(ChannelError):
    """The other end went away (closed its end, or its process died)."""


def socketpair() -> tuple[socket.socket, socket.socket]:
    """The two ends: the daemon keeps the first, the worker inherits the second."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ChannelError(f"a channel message of {len(data)} bytes is over the "
                           f"{MAX_MESSAGE}-byte limit")
    return data


def decode(data: bytes) -> dict[str, Any]:
    if not data:
        raise ChannelClosed("the other end closed the channel")
    try:
        message = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        # ValueError: not JSON, not UTF-8, NaN/Infinity, an integer of over 4300 digits;
        # RecursionError: nesting deeper than the parser's stack.
        raise ChannelError(f"a channel message is not plain JSON: {str(e)[:200]}") from None
    if not isinstance(message, dict):
        raise ChannelError("a channel message is not a JSON object")
    return message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class Channel:
    """One end of the channel, used from trio. Sending is serialised (one packet per
    message, so concurrent senders never interleave); one task receives."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """One message, with ``fds`` (SCM_RIGHTS; the caller keeps and closes its own)."""
        data = encode(message)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
            if fds else []
        async with self._send_lock:
            try:
                await self._sock.sendmsg([data], ancillary)
            except OSError as e:
                raise ChannelClosed(f"the channel is broken: {e.strerror}") from None

    async def receive(self) -> dict[str, Any]:
        """One message; fds that came with it are closed (none is expected here)."""
        message, fds = await self.receive_with_fds()
        close_fds(fds)
        return message

    async def receive_with_fds(self) -> tuple[dict[str, Any], list[int]]:
        """One message and the fds that came with it (at most :data:`MAX_FDS`; the
        caller closes them)."""
        try:
            # One byte more than the limit: a packet that fills it was cut (MSG_TRUNC).
            data, ancillary, flags, _ = await self._sock.recvmsg(
                MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4))
        except OSError as e:
            raise ChannelClosed(f"the channel is broken: {e.strerror}") from None
        fds: list[int] = []
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
            close_fds(fds)
            raise ChannelError(f"a channel message is over the {MAX_MESSAGE}-byte limit "
                               f"(or carries over {MAX_FDS} fds)")
        try:
            return decode(data), fds
        except ChannelError:
            close_fds(fds)
            raise

    def close(self) -> None:
        self._sock.close()


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def error_payload(error: BaseException) -> dict[str, Any]:
    """How an exception travels: its class name, its one line, and what the API's
    answer needs of it (a config key, a start step, an HTTP status)."""
    key = getattr(error, "key", None)
    payload: dict[str, Any] = {"type": type(error).__name__, "message": str(error),
                               "key": key if isinstance(key, str) else None}
    step = getattr(error, "step", None)
    if isinstance(step, str):
        payload["step"] = step
        payload["bad_input"] = bool(getattr(error, "bad_input", False))
    status = getattr(error, "status", None)
    if isinstance(status, int):
        payload["status"] = status
    return payload
