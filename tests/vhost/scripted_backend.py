"""A scripted vhost-user back-end for front-end tests: a thread on a blocking unix
socket that answers what avmm's front-end asks with the features, queue count and
config space it is given, records every request (and keeps the fds it is sent), and
can be told to misbehave (never answer GET_VRING_BASE, NACK a request).

Written by hand (struct, not avmm's protocol module), so that a test of the front-end
does not lean on the code it tests."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from avmm.vhost.protocol import Request

_HEADER = struct.Struct("<III")
_VERSION = 0x1
_REPLY = 0x4
_NEED_REPLY = 0x8
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")

#: Requests whose reply is a payload of their own (not a REPLY_ACK status).
_ANSWERED = {Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
             Request.GET_CONFIG, Request.GET_VRING_BASE}
#: Requests that carry one ring fd (payload: index | no-fd bit).
_RING_FDS = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}


class ScriptedBackend:
    """Serves one front-end connection at ``path`` (see the module docstring).

    ``answer_vring_base``: False makes the back-end take GET_VRING_BASE and never
    answer, and keep the connection open (even after the front-end shuts its side)
    until :meth:`release`, as a hung back-end would. ``nack``: requests answered with
    a REPLY_ACK failure when the front-end asks for an ack. ``drop_after``: the back-end
    dies on receiving that request (no answer; connection and listener closed), as a
    back-end that crashed right after it would.
    """

    def __init__(self, path: Path, *, features: int, protocol_features: int = 0,
                 queue_num: int = 1, config: bytes = b"", answer_vring_base: bool = True,
                 nack: frozenset[Request] = frozenset(),
                 drop_after: Request | None = None) -> None:
        self.path = path
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.config = config
        self.answer_vring_base = answer_vring_base
        self.nack = nack
        self.drop_after = drop_after
        #: Every request received, in order: (request, payload bytes).
        self.requests: list[tuple[Request, bytes]] = []
        #: The latest fd received per (request, ring index); closed at the end.
        self.ring_fds: dict[tuple[Request, int], int] = {}
        self.closed = threading.Event()
        self._released = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(20)
        self._conn: socket.socket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    # -- what tests use ---------------------------------------------------------------

    def seen(self, request: Request, index: int | None = None) -> int:
        """How many ``request`` messages arrived (for ring ``index`` if given)."""
        with self._lock:
            return sum(1 for kind, payload in self.requests if kind == request
                       and (index is None or _ring_index(kind, payload) == index))

    def release(self) -> None:
        """A hung back-end finally lets go: close the connection."""
        self._released.set()

    # -- the thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        self._conn = conn
        if self.drop_after is not None:
            self._listener.close()  # a dead back-end accepts nobody
        try:
            while True:
                message = self._receive(conn)
                if message is None:
                    break
                if message[0] == self.drop_after:
                    with self._lock:
                        self.requests.append((message[0], message[2]))
                    for fd in message[3]:
                        os.close(fd)
                    break
                self._handle(conn, *message)
        except OSError:
            pass
        finally:
            if not self.answer_vring_base:
                self._released.wait(30)
            conn.close()
            self.closed.set()

    def _receive(self, conn: socket.socket) -> tuple[Request, int, bytes, list[int]] | None:
        fds: list[int] = []
        header = b""
        while len(header) < _HEADER.size:
            data, ancillary, _flags, _ = conn.recvmsg(_HEADER.size - len(header),
                                                      socket.CMSG_SPACE(8 * 4))
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
            if not data:
                return None
            header += data
        code, flags, size = _HEADER.unpack(header)
        payload = b""
        while len(payload) < size:
            data = conn.recv(size - len(payload))
            if not data:
                return None
            payload += data
        return Request(code), flags, payload, fds

    def _handle(self, conn: socket.socket, request: Request, flags: int, payload: bytes,
                fds: list[int]) -> None:
        with self._lock:
            self.requests.append((request, payload))
        if request in _RING_FDS and fds:
            index = _ring_index(request, payload)
            with self._lock:
                old = self.ring_fds.pop((request, index), None)
                self.ring_fds[(request, index)] = fds.pop(0)
            if old is not None:
                os.close(old)
        for fd in fds:
            os.close(fd)
        answer: bytes | None = None
        if request == Request.GET_FEATURES:
            answer = _U64.pack(self.features)
        elif request == Request.GET_PROTOCOL_FEATURES:
            answer = _U64.pack(self.protocol_features)
        elif request == Request.GET_QUEUE_NUM:
            answer = _U64.pack(self.queue_num)
        elif request == Request.GET_CONFIG:
            offset, size, config_flags = struct.unpack_from("<III", payload)
            data = self.config[offset:offset + size].ljust(size, b"\0")
            answer = struct.pack("<III", offset, size, config_flags) + data
        elif request == Request.GET_VRING_BASE:
            if not self.answer_vring_base:
                return
            index, _ = _STATE.unpack(payload)
            answer = _STATE.pack(index, 0)
        elif flags & _NEED_REPLY:
            answer = _U64.pack(1 if request in self.nack else 0)
        if answer is not None:
            conn.sendall(_HEADER.pack(int(request), _VERSION | _REPLY, len(answer)) + answer)

    def __enter__(self) -> ScriptedBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._listener.close()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        with self._lock:
            fds, self.ring_fds = list(self.ring_fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _ring_index(request: Request, payload: bytes) -> int | None:
    if request in _RING_FDS and len(payload) == 8:
        return int(_U64.unpack(payload)[0]) & 0xFF
    if len(payload) >= 4 and request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE,
                                         Request.SET_VRING_ADDR, Request.GET_VRING_BASE,
                                         Request.SET_VRING_ENABLE):
        return int(struct.unpack_from("<I", payload)[0])
    return None


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0,
               what: str = "condition") -> None:
    """Poll ``predicate`` (from a thread, or a test without trio) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def scripted_backend(path: Path, **kwargs: object) -> Iterator[ScriptedBackend]:
    with ScriptedBackend(path, **kwargs) as backend:  # type: ignore[arg-type]
        yield backend
