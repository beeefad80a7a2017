"""virtio-console (virtio 1.2 §5.3) with a single port, port 0.

Queues: receiveq (0) and transmitq (1) of port 0; VIRTIO_CONSOLE_F_MULTIPORT is not
offered, so there are no control queues. Offered: VIRTIO_CONSOLE_F_EMERG_WRITE, so a
guest can print one byte at a time through the config space before (or after) its
queues work. VIRTIO_CONSOLE_F_SIZE is not offered: the console's size is the host
terminal's business, and the guest keeps its default.

Output: every byte the guest transmits is passed to ``output`` (a plain callable: the VM
decides whether that is a terminal, a file or a socket). ``output`` is called from the
event loop for the transmitq, and from a vCPU thread for an emergency write (a config
space write is a register access), so it must be thread-safe and must not block for
long. A chain's data is passed in pieces of at most :data:`OUTPUT_CHUNK` bytes, so a
huge chain never becomes one huge ``bytes``.

Input: :meth:`ConsoleDevice.send_input` hands bytes to the guest. It waits while the
guest has no receive buffers (before the driver is up, too), so input is never buffered
without bound: the device holds at most one ``send_input`` call's bytes at a time, and
the next call waits until those are in guest buffers.

Protocol violations (:class:`DeviceNeedsReset`): device-readable buffers in the
receiveq, device-writable buffers in the transmitq (§5.3.6.2).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import structlog
import trio

from ..devices._state import check_bytes, check_state_class
from .device import (
    DeviceContext,
    DeviceId,
    DeviceNeedsReset,
    VirtioDevice,
    run_together,
    serve_queue,
)

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from .queue import DescriptorChain

log = structlog.get_logger(__name__)

__all__ = [
    "OUTPUT_CHUNK",
    "VIRTIO_CONSOLE_F_EMERG_WRITE",
    "VIRTIO_CONSOLE_F_MULTIPORT",
    "VIRTIO_CONSOLE_F_SIZE",
    "ConsoleDevice",
    "ConsoleStats",
]

#: Feature bits (virtio 1.2 §5.3.3).
VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 256

#: ``struct virtio_console_config``: cols, rows, max_nr_ports, emerg_wr. Without
#: F_SIZE and F_MULTIPORT only emerg_wr means anything; the rest reads as zero.
_CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8
#: The largest piece of guest output passed to ``output`` in one call.
OUTPUT_CHUNK = 64 * 1024


@dataclass
class ConsoleStats:
    """Counters since the device was made."""

    output_bytes: int = 0
    input_bytes: int = 0
    emergency_bytes: int = 0


#: The most pending console input a restored state may bring: one send_input's data is
#: usually a line or a paste; a hostile file must not make the VMM hold gigabytes.
MAX_PENDING_INPUT = 16 << 20


@dataclass(frozen=True)
class ConsoleState:
    """A virtio console's own state in a snapshot: the host input it accepted
    (``send_input`` returned) and had not yet put into guest receive buffers. It is the
    host's data, so it survives a pause, a driver reset and a snapshot alike, and is
    delivered first once the device runs again. The one port has no other state: it is
    always open (no MULTIPORT), and the config space is fixed."""

    STATE_VERSION: ClassVar[int] = 1

    pending_input: bytes


class ConsoleDevice(VirtioDevice):
    """A one-port virtio console (see the module docstring)."""

    device_id = DeviceId.CONSOLE
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, *, output: Callable[[bytes], object], name: str = "console0") -> None:
        self.name = name
        self.output = output
        self.stats = ConsoleStats()
        self._log = log.bind(device=name)
        # Input accepted from send_input and not yet in guest buffers, from
        # _input_offset on (survives a driver reset: it is the host's data).
        self._pending_input = b""
        self._input_offset = 0
        # Capacity 0: send_input returns only once the receive task has taken the bytes,
        # and that task takes the next bytes only once the last are in guest buffers.
        self._input_send, self._input_receive = trio.open_memory_channel[bytes](0)

    # -- VirtioDevice -------------------------------------------------------------------

    def device_features(self) -> int:
        return VIRTIO_CONSOLE_F_EMERG_WRITE

    def read_config(self, offset: int, size: int) -> bytes:
        config = _CONFIG.pack(0, 0, 0, 0)  # emerg_wr is write-only: it reads as 0
        if offset < 0 or size <= 0:
            return bytes(max(size, 0))
        return config[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """An emergency write: the low byte written to ``emerg_wr`` goes to ``output``.
        Other writes are ignored (cols, rows and max_nr_ports are read-only)."""
        if offset <= EMERG_WR_OFFSET < offset + len(data):
            byte = bytes(data[EMERG_WR_OFFSET - offset:EMERG_WR_OFFSET - offset + 1])
            self.stats.emergency_bytes += 1
            self.output(byte)

    # -- snapshots ----------------------------------------------------------------------

    state_class = ConsoleState

    def save_state(self) -> ConsoleState:
        return ConsoleState(pending_input=bytes(self._pending_input[self._input_offset:]))

    def restore_state(self, state: ConsoleState) -> None:
        check_state_class(state, ConsoleState, self.name)
        check_bytes(self.name, "pending_input", state.pending_input, MAX_PENDING_INPUT)
        self._pending_input = state.pending_input
        self._input_offset = 0

    async def run(self, context: DeviceContext) -> None:
        """Serve the receive and transmit queues until cancelled."""
        await run_together(
            partial(self._receive_loop, context),
            partial(serve_queue, context, TRANSMIT_QUEUE,
                    partial(self._transmit, context.memory)),
        )

    # -- host side ----------------------------------------------------------------------

    async def send_input(self, data: bytes | bytearray | memoryview) -> None:
        """Give ``data`` to the guest as console input. Returns once the device has
        taken it; the device takes the next input only after this one is in guest
        receive buffers, so callers feel the guest's pace."""
        data = bytes(data)
        if data:
            await self._input_send.send(data)

    # -- transmit -----------------------------------------------------------------------

    async def _transmit(self, memory: MemoryAccess, chain: DescriptorChain) -> int:
        if chain.writable:
            raise DeviceNeedsReset(
                f"console transmit chain {chain.head} has device-writable buffers "
                "(the transmitq takes device-readable buffers only)"
            )
        piece: list[memoryview] = []
        piece_length = 0
        for address, length in chain.readable:
            offset = 0
            while offset < length:
                take = min(length - offset, OUTPUT_CHUNK - piece_length)
                piece.append(memory.view(address + offset, take))
                piece_length += take
                offset += take
                if piece_length == OUTPUT_CHUNK:
                    self._emit(piece)
                    piece, piece_length = [], 0
        if piece:
            self._emit(piece)
        return 0

    def _emit(self, views: list[memoryview]) -> None:
        data = b"".join(views)
        self.stats.output_bytes += len(data)
        self.output(data)

    # -- receive ------------------------------------------------------------------------

    async def _receive_loop(self, context: DeviceContext) -> None:
        queue = context.queues[RECEIVE_QUEUE]
        if queue is None:
            return  # the driver set up no receive queue: input waits in send_input
        memory = context.memory
        queue.disable_notifications(memory)
        while True:
            if self._input_offset >= len(self._pending_input):
                self._pending_input = await self._input_receive.receive()
                self._input_offset = 0
            used = 0
            while self._input_offset < len(self._pending_input):
                chain = queue.pop(memory)
                if chain is None:
                    if used:
                        context.signal_used(RECEIVE_QUEUE)
                        used = 0
                    if queue.enable_notifications(memory):
                        await trio.lowlevel.checkpoint()
                    else:
                        await context.wait_kick(RECEIVE_QUEUE)
                    queue.disable_notifications(memory)
                    continue
                if chain.readable:
                    raise DeviceNeedsReset(
                        f"console receive chain {chain.head} has device-readable buffers "
                        "(the receiveq takes device-writable buffers only)"
                    )
                written = chain.write(memory,
                                      memoryview(self._pending_input)[self._input_offset:])
                queue.push(memory, chain.head, written)
                used += 1
                self._input_offset += written
                self.stats.input_bytes += written
            if used:
                context.signal_used(RECEIVE_QUEUE)
