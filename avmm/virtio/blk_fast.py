"""virtio-blk's inner loop in C (:mod:`avmm.virtio._blk_build`), driven from Python.

:class:`BlockFastPath` serves the IN and OUT requests of a batch in one call outside the
GIL and leaves the queue, the slot's metrics and the dirty log as the Python path would
have left them: the queue's positions move past the chains the batch returned;
:meth:`~avmm.virtio.queue.VirtQueue.took` counts them (a served queue's metrics); and
while a migration runs (``memory.dirty``), the data read, the status bytes and the used
ring are marked after the batch, as every other writer marks after its writes
(avmm.migration.dirty: a log started meanwhile needs no mark for them). The device adds
the request counters to its own stats from :class:`FastBatch`.

The C loop stops before any request it does not serve (see the build script); the caller
then goes on with its Python path, which takes the ring from exactly there. Without the
compiled module, or for a memory object that cannot hand out its buffers,
:func:`fast_path` returns None / :meth:`BlockFastPath.usable` says no, and the device
keeps its Python path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._regions import RegionTable, compiled, load_ring, store_ring

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from .queue import VirtQueue

__all__ = ["BlockFastPath", "FastBatch", "fast_path"]

#: The compiled loop(s), and whether they may be used (AVMM_BLK_PYTHON=1: not in this process).
_blk_ffi, ENABLED = compiled("_blk_ffi", "AVMM_BLK_PYTHON")

if _blk_ffi is not None:
    LIMIT = _blk_ffi.lib.AVMM_BLK_LIMIT
    EMPTY = _blk_ffi.lib.AVMM_BLK_EMPTY
    SLOW = _blk_ffi.lib.AVMM_BLK_SLOW
    _WRITES = _blk_ffi.lib.AVMM_BLK_WRITES
    _INDIRECT = _blk_ffi.lib.AVMM_BLK_INDIRECT
    _MAX_CHAIN = _blk_ffi.lib.AVMM_BLK_MAX_CHAIN
else:
    LIMIT, EMPTY, SLOW = range(3)
    _WRITES, _INDIRECT, _MAX_CHAIN = 1, 2, 256

#: (address, length) pairs the C loop may record per call: a few batches' worth of
#: 4 KiB requests; a call ends (LIMIT) before a request whose marks might not fit.
MARKS = 4 * (_MAX_CHAIN + 1)


@dataclass(slots=True)
class FastBatch:
    """What one C batch did (see ``struct avmm_blk_batch``)."""

    requests: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    stop: int


def fast_path() -> BlockFastPath | None:
    """The C loop for one queue, or None where it is not available."""
    if not ENABLED:
        return None
    return BlockFastPath()


class BlockFastPath:
    """One queue's C-side buffers: the ring record, the batch result, the marks array
    and the region table of the memory object last used (one thread at a time)."""

    def __init__(self) -> None:
        assert _blk_ffi is not None
        ffi = _blk_ffi.ffi
        self._lib = _blk_ffi.lib
        self._ring = ffi.new("struct avmm_ring *")
        self._out = ffi.new("struct avmm_blk_batch *")
        self._marks = ffi.new("uint64_t[]", 2 * MARKS)
        self._table = RegionTable(ffi)

    def forget(self) -> None:
        """Drop the region table (the device stopped), so the memory can be unmapped."""
        self._table.forget()

    def usable(self, memory: MemoryAccess) -> bool:
        return self._table.usable(memory)

    def serve(self, queue: VirtQueue, memory: MemoryAccess, fd: int, capacity: int, *,
              writes: bool, limit: int) -> FastBatch:
        """Serve up to ``limit`` of the requests available now on the image ``fd`` of
        ``capacity`` sectors (see the build script). ``writes``: OUT requests may be
        served (a writable disk in writeback mode). The caller checked :meth:`usable`
        and that the queue may be taken from and holds no chain of its own."""
        record, out, table = self._ring, self._out, self._table
        s = queue.state
        load_ring(record, queue)
        flags = (_WRITES if writes else 0) | (_INDIRECT if s.indirect else 0)
        limit = max(limit, 1)  # 0 would end every call at once with nothing served
        self._lib.avmm_blk_serve(record, table.regions, table.count, fd, capacity, flags,
                                 limit, self._marks, MARKS, out)
        requests = out.requests
        store_ring(record, queue)
        if requests:
            queue.took(memory, requests, out.readable, out.used)
        if requests or out.marks:
            # Marks also where no request completed: a failed read may have written
            # part of its buffers before the Python path takes the request over.
            dirty = memory.dirty
            if dirty is not None:
                marks = self._marks
                mark = dirty.mark
                for i in range(out.marks):
                    mark(marks[2 * i], marks[2 * i + 1])
                # The used ring's elements and idx, at most a page or two.
                mark(s.used_ring, 4 + 8 * s.size)
        return FastBatch(requests, out.reads, out.writes, out.bytes_read,
                         out.bytes_written, out.stop)
