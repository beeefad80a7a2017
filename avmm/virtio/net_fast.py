"""virtio-net's inner loops in C (:mod:`avmm.virtio._net_build`), driven from Python.

:class:`NetFastPath` moves whole batches of frames between a tap and the rings of the
usual layouts in one call outside the GIL, and leaves the queue, the device's counters,
the slot's metrics and the dirty log as the Python path would have left them: the queue's
positions move past the chains the batch returned; :meth:`took` on the queue counts them
(a served queue's metrics); and while a migration runs (``memory.dirty``), the buffers
and the used ring the batch wrote are marked after the batch, as every other writer marks
after its writes (avmm.migration.dirty: a log started meanwhile needs no mark for them).

The C loop stops before any chain or frame it does not handle (see the build script);
the caller then goes on with its Python path, which takes the ring from exactly there.
Without the compiled module, or for a memory object that cannot hand out its buffers
(:meth:`avmm.memory.MemoryAccess.host_buffers`), :func:`fast_path` returns None and the
device keeps its Python path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._regions import RegionTable, compiled, load_ring, store_ring

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from .queue import VirtQueue

__all__ = ["FastBatch", "NetFastPath", "fast_path"]

#: The compiled loop(s), and whether they may be used (AVMM_NET_PYTHON=1: not in this process).
_net_ffi, ENABLED = compiled("_net_ffi", "AVMM_NET_PYTHON")

if _net_ffi is not None:
    LIMIT = _net_ffi.lib.AVMM_NET_LIMIT
    EMPTY = _net_ffi.lib.AVMM_NET_EMPTY
    SLOW = _net_ffi.lib.AVMM_NET_SLOW
    TAP_BLOCKED = _net_ffi.lib.AVMM_NET_TAP_BLOCKED
    TAP_ERROR = _net_ffi.lib.AVMM_NET_TAP_ERROR
    OVERFLOW = _net_ffi.lib.AVMM_NET_OVERFLOW
    NO_BUFFERS = _net_ffi.lib.AVMM_NET_NO_BUFFERS
else:
    LIMIT, EMPTY, SLOW, TAP_BLOCKED, TAP_ERROR, OVERFLOW, NO_BUFFERS = range(7)


@dataclass
class FastBatch:
    """What one C batch did (see ``struct avmm_net_batch``)."""

    frames: int
    dropped: int
    bytes: int
    stop: int
    error: int = 0
    #: OVERFLOW: bytes read (virtio header included), of which ``first`` are in the
    #: buffer of the chain at the queue's position.
    total: int = 0
    first: int = 0
    #: OVERFLOW: the guest address of that buffer.
    address: int = 0
    #: Receive: a runt was read into the buffer of the chain at the queue's position,
    #: which the C loop did not take (the caller takes it, as its Python path would).
    kept: bool = False


def fast_path(bounce: bytearray | None) -> NetFastPath | None:
    """The C loops for one queue (receive: with the device's bounce buffer; transmit:
    None), or None where they are not available (see the module docstring)."""
    if not ENABLED:
        return None
    return NetFastPath(bounce)


class NetFastPath:
    """One queue's C-side buffers: the ring record, the batch result, the region table
    of the memory object last used, and (receive) the bounce buffer and the marks array.
    A device has one per queue, so its transmit and receive threads share nothing here:
    a region table is replaced (a new memory object: a restore, a new vhost-user memory
    table) only by the thread that uses it, between its batches."""

    #: Receive batches read at most this many frames (the marks array's size).
    MAX_RECEIVE = 256

    def __init__(self, bounce: bytearray | None) -> None:
        assert _net_ffi is not None
        ffi = _net_ffi.ffi
        self._lib = _net_ffi.lib
        self._ring = ffi.new("struct avmm_ring *")
        self._out = ffi.new("struct avmm_net_batch *")
        self._bounce = (ffi.NULL if bounce is None
                        else ffi.from_buffer("uint8_t[]", bounce, require_writable=True))
        self._bounce_length = 0 if bounce is None else len(bounce)
        self._marks = ffi.new("uint64_t[]", 2 * self.MAX_RECEIVE)
        self._table = RegionTable(ffi)

    def forget(self) -> None:
        """Drop the region table (the device stopped): the memory's buffers are no
        longer exported from here, so the memory can be unmapped."""
        self._table.forget()

    def usable(self, memory: MemoryAccess) -> bool:
        """Whether ``memory`` can be handed to C (building its region table once)."""
        return self._table.usable(memory)

    def _store(self, record: Any, queue: VirtQueue, memory: MemoryAccess,
               frames: int, readable_bytes: int, written_bytes: int) -> None:
        s = queue.state
        store_ring(record, queue)
        if frames:
            queue.took(memory, frames, readable_bytes, written_bytes)
            dirty = memory.dirty
            if dirty is not None:
                # After the writes (see the module docstring): the used ring's
                # elements and idx, at most a page or two.
                dirty.mark(s.used_ring, 4 + 8 * s.size)

    def transmit(self, queue: VirtQueue, memory: MemoryAccess, tap_fd: int,
                 limit: int, offloads: int) -> FastBatch:
        """Send the frames of up to ``limit`` available chains (see the build script),
        with the header avmm.virtio.net.transmit_header builds for ``offloads``. The
        caller checked :meth:`usable` and that the queue is ready and holds no chain."""
        record, out = self._ring, self._out
        load_ring(record, queue)
        self._lib.avmm_net_transmit(record, self._table.regions, self._table.count, tap_fd,
                                    limit, offloads, out)
        frames = out.frames
        self._store(record, queue, memory, frames, out.chain_bytes, 0)
        return FastBatch(frames, 0, out.bytes, out.stop)

    def receive(self, queue: VirtQueue, memory: MemoryAccess, tap_fd: int, limit: int,
                mergeable: bool, keep_header: bool) -> FastBatch:
        """Read up to ``limit`` frames from the tap into single-buffer receive chains (see
        the build script); with ``keep_header`` only num_buffers of the kernel's header
        is rewritten. The caller checked as for :meth:`transmit`."""
        limit = min(limit, self.MAX_RECEIVE)
        record, out = self._ring, self._out
        load_ring(record, queue)
        self._lib.avmm_net_receive(record, self._table.regions, self._table.count, tap_fd,
                                   limit, int(mergeable), int(keep_header), self._bounce,
                                   self._bounce_length, self._marks, out)
        frames = out.frames
        frame_bytes = out.bytes
        # The used lengths: each frame's bytes plus its header.
        self._store(record, queue, memory, frames, 0,
                    frame_bytes + frames * _HEADER_SIZE)
        if out.marks:
            dirty = memory.dirty
            if dirty is not None:
                marks = self._marks
                for i in range(out.marks):
                    dirty.mark(marks[2 * i], marks[2 * i + 1])
        return FastBatch(frames, out.dropped, frame_bytes, out.stop, out.error,
                         out.total, out.first, out.address, bool(out.kept))


#: ``struct virtio_net_hdr`` with num_buffers (avmm.virtio.net.NET_HEADER_SIZE).
_HEADER_SIZE = 12
