"""virtio-blk's inner loop in C (:mod:`avmm.virtio._blk_build`), driven from Python.

:class:`BlockFastPath` serves the IN and OUT requests of a batch in one call outside the
GIL and leaves the queue, the slot's metrics and the dirty log as the Python path would
have left them: the queue's positions move past the chains the batch returned;
:meth:`~avmm.virtio.queue.VirtQueue.took` counts them (a served queue's metrics); and
while a migration runs (``memory.dirty``), the data read, the status bytes and the used
ring are marked after the batch, as every other writer marks after its writes
(avmm.migration.dirty: a log started meanwhile needs no mark for them). The device adds
the request counters to its own stats from :class:`FastBatch`.

:meth:`BlockFastPath.run` is the I/O thread's whole loop in C: batches as ``serve`` serves
them, the driver's notifications turned off and on, the interrupts (``should_notify``'s
rules, written to the irqfd) and the waits for kicks in poll(2), so that a request at
queue depth 1 takes the GIL not at all. In a process that runs many VMs (dense mode) that
keeps the other VMs' Python out of this disk's latency. It comes back to Python for the
first chain the C loop does not serve, when its marks array fills, when asked to
(:meth:`BlockFastPath.interrupt`: a stop, a new rate limit) and :data:`PUBLISH_NS` after
the first completion it has not reported, so that the counters, which Python adds up
then, are never older than that.

The C loop stops before any request it does not serve (see the build script); the caller
then goes on with its Python path, which takes the ring from exactly there. Without the
compiled module, or for a memory object that cannot hand out its buffers,
:func:`fast_path` returns None / :meth:`BlockFastPath.usable` says no, and the device
keeps its Python path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    STOPPED = _blk_ffi.lib.AVMM_BLK_STOPPED
    PUBLISH = _blk_ffi.lib.AVMM_BLK_PUBLISH
    _WRITES = _blk_ffi.lib.AVMM_BLK_WRITES
    _INDIRECT = _blk_ffi.lib.AVMM_BLK_INDIRECT
    _EVENT_IDX = _blk_ffi.lib.AVMM_BLK_EVENT_IDX
    _NONE_SIGNALLED = _blk_ffi.lib.AVMM_BLK_NONE_SIGNALLED
    _MAX_CHAIN = _blk_ffi.lib.AVMM_BLK_MAX_CHAIN
else:
    LIMIT, EMPTY, SLOW, STOPPED, PUBLISH = range(5)
    _WRITES, _INDIRECT, _EVENT_IDX, _NONE_SIGNALLED, _MAX_CHAIN = 1, 2, 4, 0x10000, 256

#: (address, length) pairs the C loop may record per call: a few batches' worth of
#: 4 KiB requests; a call ends (LIMIT) before a request whose marks might not fit.
MARKS = 4 * (_MAX_CHAIN + 1)
#: The same for a run, which reports every PUBLISH_NS: room for ~8,000 4 KiB requests
#: (two marks each), more than 20 ms holds at the rates seen. 16 bytes a pair; the
#: array is allocated on the first run, its pages touched only as far as marks go.
RUN_MARKS = 64 * (_MAX_CHAIN + 1)
#: How long a run may keep a completion before its counters reach Python (metrics, the
#: queue's counts, the dirty marks); under load also how often the run takes the GIL.
PUBLISH_NS = 20_000_000
#: The longest a run looks for the driver's next request after a batch before it re-arms
#: notifications and sleeps (``spin`` in the build script; looks that keep finding
#: nothing are rested, see SPIN_MISSES there): longer than a polling driver takes to
#: submit its next request after a completion.
SPIN_NS = 50_000
_LONGEST_NS = 60 * 10**9


@dataclass(slots=True)
class FastBatch:
    """What one C batch did (see ``struct avmm_blk_batch``)."""

    requests: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    stop: int
    #: A run's (:meth:`BlockFastPath.run`): the driver's notifications it read, the
    #: interrupts it sent, the batches that served a request, and the errno where
    #: poll(2) or the read of the kick eventfd failed (0: none).
    kicks: int = 0
    signals: int = 0
    batches: int = 0
    error: int = 0


def _apply_marks(memory: MemoryAccess, marks: Any, count: int, used_ring: int,
                 used_length: int) -> None:
    """The C loop's ``count`` (address, length) marks and the used ring's bytes into the
    dirty log, where a migration runs one (after the writes: a log started meanwhile
    needs no mark for them)."""
    dirty = memory.dirty
    if dirty is not None:
        mark = dirty.mark
        for i in range(count):
            mark(marks[2 * i], marks[2 * i + 1])
        mark(used_ring, used_length)


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
        self._wait = ffi.new("struct avmm_blk_wait *")
        self._run_marks: Any = None

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
            # part of its buffers before the Python path takes the request over. The
            # used ring's elements and idx, at most a page or two.
            _apply_marks(memory, self._marks, out.marks, s.used_ring, 4 + 8 * s.size)
        return FastBatch(requests, out.reads, out.writes, out.bytes_read,
                         out.bytes_written, out.stop)

    def arm(self) -> None:
        """Forget an earlier :meth:`interrupt`. The caller arms, then looks at what
        interrupts ask it to look at (a stop, the throttle), then runs: an interrupt
        made after that look is seen by the run."""
        self._wait.control = 0

    def interrupt(self) -> None:
        """Make a run return at its next look (any thread): between batches, or after a
        wait that something ends (a kick; a stop also writes the stop eventfd)."""
        self._wait.control = 1

    def run(self, queue: VirtQueue, memory: MemoryAccess, fd: int, capacity: int, *,
            writes: bool, kick_fd: int, stop_fd: int, call_fd: int,
            publish_ns: int | None = None, spin_ns: int | None = None) -> FastBatch:
        """Serve the queue in C, waiting for the driver's kicks on ``kick_fd`` and
        interrupting it through ``call_fd``, until something needs Python (``stop``
        says what: SLOW, LIMIT, STOPPED, PUBLISH). The queue's positions, counts and
        ``signalled_used`` and the dirty marks are brought up to date before it returns
        (as :meth:`serve` does); the caller adds the request counters to its stats,
        reports ``kicks``, then raises ``error`` if there is one (poll(2) or the read of
        ``kick_fd`` failed; what was served before is in the counters). Same
        preconditions as :meth:`serve`, and the caller has armed (:meth:`arm`) before
        looking for a reason not to run.
        """
        assert _blk_ffi is not None
        record, out, table, wait = self._ring, self._out, self._table, self._wait
        marks = self._run_marks
        if marks is None:
            marks = self._run_marks = _blk_ffi.ffi.new("uint64_t[]", 2 * RUN_MARKS)
        s = queue.state
        load_ring(record, queue)
        flags = ((_WRITES if writes else 0) | (_INDIRECT if s.indirect else 0)
                 | (_EVENT_IDX if s.event_idx else 0))
        wait.kick_fd = kick_fd
        wait.stop_fd = stop_fd
        wait.call_fd = call_fd
        # Bounded so that the C loop's deadlines cannot overflow.
        wait.publish_ns = min(PUBLISH_NS if publish_ns is None else publish_ns, _LONGEST_NS)
        wait.spin_ns = min(SPIN_NS if spin_ns is None else spin_ns, _LONGEST_NS)
        wait.signalled = _NONE_SIGNALLED if s.signalled_used is None else s.signalled_used
        error = self._lib.avmm_blk_run(record, table.regions, table.count, fd, capacity,
                                       flags, marks, RUN_MARKS, wait, out)
        store_ring(record, queue)
        signalled = wait.signalled
        s.signalled_used = None if signalled == _NONE_SIGNALLED else signalled
        requests = out.requests
        if requests:
            queue.took(memory, requests, out.readable, out.used)
        # The used ring whatever was served: the run also wrote its flags (NO_NOTIFY)
        # or, past the elements, avail_event, as enable/disable_notifications do.
        _apply_marks(memory, marks, out.marks, s.used_ring, 6 + 8 * s.size)
        return FastBatch(requests, out.reads, out.writes, out.bytes_read, out.bytes_written,
                         out.stop, wait.kicks, wait.signals, wait.batches, max(-error, 0))
