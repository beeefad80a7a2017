"""A man in the middle of a migration stream, for fault tests: it forwards the stream
both ways, follows its frames (avmm.migration.stream) and, at a chosen point, cuts the
connection, drops a frame, flips a byte or holds a frame back until told."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from avmm.migration.stream import FRAME_HEADER, FRAME_HEADER_SIZE, HEADER, MAGIC, Kind


@dataclass(frozen=True)
class Fault:
    """Where to strike, source → destination unless ``backwards``: at the frame of
    ``kind`` number ``index`` (0 = the first of that kind); ``action`` is "cut" (after
    ``at`` bytes of that frame's payload, or before its header with ``at=-1``),
    "drop" (the destination's frame is never forwarded: the connection closes),
    "flip" (one bit of that payload changed, the stream goes on), or "hold" (the frame
    waits in the proxy, :attr:`Proxy.holding` set, until :meth:`Proxy.let_go`
    forwards it or :meth:`Proxy.cut` closes the connection there)."""

    name: str
    kind: Kind | None  # None: the stream header
    index: int = 0
    action: str = "cut"
    at: int = -1
    backwards: bool = False


class Proxy:
    def __init__(self, listen: Path, target: str, fault: Fault) -> None:
        self.listen = listen
        self.target = target
        self.fault = fault
        self.struck = False
        #: Set once a frame is held back (action "hold").
        self.holding = trio.Event()
        self._decided = trio.Event()
        self._forward_held = False

    def let_go(self) -> None:
        """Forward the frame held back (action "hold"); the stream goes on."""
        self._forward_held = True
        self._decided.set()

    def cut(self) -> None:
        """Close the connection where the frame is held back (action "hold")."""
        self._decided.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.listen))
        sock.listen(1)
        listener = trio.SocketListener(sock)
        task_status.started()
        source = await listener.accept()
        await listener.aclose()
        destination = await trio.open_unix_socket(self.target.removeprefix("unix:"))
        async with source, destination, trio.open_nursery() as nursery:
            nursery.start_soon(self._forward, source, destination, False, nursery.cancel_scope)
            nursery.start_soon(self._forward, destination, source, True, nursery.cancel_scope)

    async def _forward(self, reader: trio.SocketStream, writer: trio.SocketStream,
                       backwards: bool, scope: trio.CancelScope) -> None:
        fault = self.fault
        mine = fault.backwards == backwards
        buffer = bytearray()
        seen: dict[Kind, int] = {}
        header_done = backwards  # the destination sends no stream header

        async def more() -> bool:
            try:
                chunk = await reader.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                return False
            buffer.extend(chunk)
            return True

        async def send(data: bytes) -> None:
            try:
                await writer.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                scope.cancel()

        async def strike() -> None:
            self.struck = True
            scope.cancel()

        while True:
            if not header_done:
                while len(buffer) < len(MAGIC) + 5:
                    if not await more():
                        scope.cancel()
                        return
                size = len(MAGIC) + 5 + buffer[len(MAGIC) + 4]
                while len(buffer) < size:
                    if not await more():
                        scope.cancel()
                        return
                HEADER.parse(bytes(buffer[:size]))
                if mine and fault.kind is None:
                    await send(bytes(buffer[:5]))
                    await strike()
                    return
                await send(bytes(buffer[:size]))
                del buffer[:size]
                header_done = True
                continue
            while len(buffer) < FRAME_HEADER_SIZE:
                if not await more():
                    scope.cancel()
                    return
            header = FRAME_HEADER.parse(bytes(buffer[:FRAME_HEADER_SIZE]))
            total = FRAME_HEADER_SIZE + header.length
            while len(buffer) < total:
                if not await more():
                    scope.cancel()
                    return
            kind = Kind(header.kind)
            number = seen.get(kind, 0)
            seen[kind] = number + 1
            frame = bytes(buffer[:total])
            del buffer[:total]
            if mine and not self.struck and kind is fault.kind and number == fault.index:
                if fault.action == "hold":
                    self.struck = True
                    self.holding.set()
                    await self._decided.wait()
                    if self._forward_held:
                        await send(frame)
                        continue
                    scope.cancel()
                    return
                if fault.action == "flip":
                    self.struck = True
                    flipped = bytearray(frame)
                    flipped[-1] ^= 0x01  # the last byte of the payload (page data)
                    await send(bytes(flipped))
                    continue
                if fault.action == "cut" and fault.at >= 0:
                    await send(frame[:FRAME_HEADER_SIZE + fault.at])
                await strike()
                return
            await send(frame)
