"""The host side of a serial port (the UART or a virtio console): where guest output
goes, where input comes from.

The UART calls :meth:`SerialPort.output` on a vCPU thread for every byte the guest
writes. Output goes straight to the configured file descriptors (terminal or log file)
from that thread, and is also kept in a bounded buffer read by :class:`SerialStream`, an
async byte stream for the trio side (``vm.serial``). Input sent to the stream is pushed
into the UART's receive FIFO as it has room.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
import trio

if TYPE_CHECKING:
    from .paths import BoundSocket

log = structlog.get_logger(__name__)

#: How much unread output ``vm.serial`` keeps before dropping the oldest bytes.
DEFAULT_BUFFER_LIMIT = 1 << 20


class SerialPort:
    """Fan-out of guest serial output, and the stream for embedding programs.

    Thread-safe: ``output`` runs on vCPU threads, everything else on the trio thread.
    """

    def __init__(self, *, sink_fds: tuple[int, ...] = (),
                 buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self._sink_fds = sink_fds
        #: Sinks a write to failed with EFBIG (said once each).
        self._full: set[int] = set()
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._limit = buffer_limit
        self._closed = False
        self._waiter: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.dropped = 0
        self.push_input: Callable[[bytes], int] | None = None
        self.send_input: Callable[[bytes], Awaitable[None]] | None = None
        self.stream = SerialStream(self)

    def attach(self, token: trio.lowlevel.TrioToken, *,
               push_input: Callable[[bytes], int] | None = None,
               send_input: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        """Connect to the event loop that reads the stream, and to the device's input:
        ``push_input`` (a UART: takes what fits, returns how much) or ``send_input``
        (a virtio console: waits until the guest has taken it)."""
        self._token = token
        self.push_input = push_input
        self.send_input = send_input

    # -- vCPU thread side ---------------------------------------------------------------

    def output(self, data: bytes) -> None:
        for fd in self._sink_fds:
            try:
                os.write(fd, data)
            except OSError as e:  # a closed terminal must not stop the guest
                if e.errno == errno.EFBIG:
                    if fd not in self._full:
                        # A jailed worker's RLIMIT_FSIZE (avmm.isolation.jail): the
                        # file stops growing, the guest goes on.
                        self._full.add(fd)
                        log.warning("guest output file reached the file size limit; "
                                    "further output to it is dropped", fd=fd)
                    continue
                log.debug("serial sink write failed", fd=fd, error=str(e))
        with self._lock:
            self._buffer += data
            overflow = len(self._buffer) - self._limit
            if overflow > 0:
                del self._buffer[:overflow]
                self.dropped += overflow
            waiter, self._waiter = self._waiter, None
        if waiter is not None and self._token is not None:
            try:
                self._token.run_sync_soon(waiter.set)
            except trio.RunFinishedError:
                pass

    # -- trio side ----------------------------------------------------------------------

    def close(self) -> None:
        """The VM stopped: readers get the remaining bytes, then end-of-stream."""
        with self._lock:
            self._closed = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()

    async def _receive(self, max_bytes: int | None) -> bytes:
        while True:
            with self._lock:
                if self._buffer:
                    size = len(self._buffer) if max_bytes is None else max_bytes
                    chunk = bytes(self._buffer[:size])
                    del self._buffer[:size]
                    break
                if self._closed:
                    chunk = b""
                    break
                waiter = self._waiter = trio.Event()
            await waiter.wait()
        await trio.lowlevel.checkpoint()
        return chunk


class SerialStream(trio.abc.Stream):
    """``vm.serial``: read what the guest writes to its serial port; send it input.

    ``receive_some`` returns b"" once the VM has stopped and all output was read.
    Output the reader does not collect is kept up to a limit (1 MiB by default), after
    which the oldest bytes are dropped (counted in ``SerialPort.dropped``).
    """

    def __init__(self, port: SerialPort) -> None:
        self._port = port

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._port._receive(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Type ``data`` into the guest's serial port, waiting while its FIFO is full."""
        remaining = bytes(data)
        if self._port.send_input is not None:
            if self._port._closed:
                raise trio.ClosedResourceError("the VM's console is closed")
            await self._port.send_input(remaining)
            return
        while remaining:
            push = self._port.push_input
            if push is None or self._port._closed:
                raise trio.ClosedResourceError("the VM's serial port is closed")
            accepted = push(remaining)
            remaining = remaining[accepted:]
            if remaining:
                # The guest drains the FIFO at its own pace and does not notify us.
                await trio.sleep(0.001)
            else:
                await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def serve_console_socket(
    listener: BoundSocket, stream: SerialStream,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``stream`` on a listening unix socket, one client at a time: the client
    receives the output and its bytes become input. Output produced while no client is
    connected stays in the stream's buffer (bounded) for the next client.

    The socket is bound by :meth:`avmm.paths.PathPolicy.bind_socket` (mode 0600, never
    over anything but a stale socket) when the VM is built; its owner closes it and
    removes its file."""
    path = str(listener.path)
    listeners = trio.SocketListener(trio.socket.from_stdlib_socket(listener.socket))
    task_status.started()
    while True:
        client = await listeners.accept()
        log.info("console client connected", path=path)
        async with client, trio.open_nursery() as nursery:

            async def to_client(client: trio.SocketStream = client,
                                scope: trio.CancelScope = nursery.cancel_scope) -> None:
                async for chunk in stream:
                    try:
                        await client.send_all(chunk)
                    except trio.BrokenResourceError:
                        break
                scope.cancel()

            async def from_client(client: trio.SocketStream = client,
                                  scope: trio.CancelScope = nursery.cancel_scope) -> None:
                try:
                    async for chunk in client:
                        await stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                scope.cancel()

            nursery.start_soon(to_client)
            nursery.start_soon(from_client)
        log.info("console client disconnected", path=path)
