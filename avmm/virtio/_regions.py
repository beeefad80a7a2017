"""What the devices' C loops share on the Python side: their compiled modules
(:func:`compiled`) and guest RAM as a C region table (``struct avmm_region[]``).

One table per queue's loop, built from :meth:`avmm.memory.MemoryAccess.host_buffers` the
first time a memory object is used and kept while that object stays the same. The
buffers it points into stay exported (``ffi.from_buffer``) until :meth:`forget`, which
the device calls once it stops so that the memory can be unmapped.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from .queue import VirtQueue

__all__ = ["VIRTQ_ABI", "RegionTable", "compiled", "load_ring", "store_ring"]

log = structlog.get_logger(__name__)

#: avmm/virtio/_virtq.h's AVMM_VIRTQ_ABI: the modules these Python sides can read.
VIRTQ_ABI = 3


def compiled(module: str, python_only: str) -> tuple[Any, bool]:
    """The cffi module ``avmm.virtio.<module>`` (None where it was not built: a source
    tree without ``make venv``) and whether its loop may be used: built, and the
    environment variable ``python_only`` not ``1`` (which keeps the Python path for a
    whole process; tests and benchmarks also flip the device module's ``ENABLED``)."""
    try:
        ffi_module = importlib.import_module(f"avmm.virtio.{module}")
    except ImportError:
        return None, False
    if getattr(ffi_module.lib, "AVMM_VIRTQ_ABI", None) != VIRTQ_ABI:
        # Built from other sources than these (a venv not rebuilt after a pull): its
        # records may not be laid out as this Python side reads them.
        log.warning("compiled device loop out of date, Python path used; run make venv",
                    module=module)
        return None, False
    return ffi_module, os.environ.get(python_only, "") != "1"


class RegionTable:
    """The region table of the memory object last used, for the cffi module ``ffi``
    (each module has its own ``struct avmm_region``). Used by one thread at a time: a
    table is replaced (a new memory object: a restore, a new vhost-user memory table)
    only by the thread that uses it, between its batches."""

    def __init__(self, ffi: Any) -> None:
        self._ffi = ffi
        self._memory: MemoryAccess | None = None
        #: ``struct avmm_region[]`` and its length, valid after :meth:`usable` said yes.
        self.regions: Any = None
        self.count = 0
        # The buffers the table points into, kept exported while it is in use.
        self._anchors: list[Any] = []

    def forget(self) -> None:
        """Drop the table: the memory's buffers are no longer exported from here."""
        self._memory = None
        self.regions = None
        self.count = 0
        for anchor in self._anchors:
            self._ffi.release(anchor)
        self._anchors = []

    def usable(self, memory: MemoryAccess) -> bool:
        """Whether ``memory`` can be handed to C (building its table once)."""
        if memory is self._memory:
            return self.regions is not None
        self.forget()
        buffers = memory.host_buffers()
        self._memory = memory
        if buffers is None:
            return False
        ffi = self._ffi
        regions = ffi.new("struct avmm_region[]", max(len(buffers), 1))
        for i, (guest, size, buffer, offset) in enumerate(buffers):
            try:
                anchor = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
            except (ValueError, TypeError, BufferError):
                # A mapping closed meanwhile (a vhost-user memory table replaced): the
                # Python path, which checks every access, says what is wrong.
                self.forget()
                self._memory = memory
                return False
            self._anchors.append(anchor)
            if offset < 0 or size < 0 or offset + size > len(anchor):
                self.forget()
                self._memory = memory
                return False
            regions[i].guest = guest
            regions[i].size = size
            regions[i].host = anchor + offset
        self.regions = regions
        self.count = len(buffers)
        return True


def load_ring(record: Any, queue: VirtQueue) -> None:
    """``queue``'s layout and positions into a ``struct avmm_ring`` for a C loop."""
    s = queue.state
    record.desc = s.descriptor_table
    record.avail = s.available_ring
    record.used = s.used_ring
    record.size = s.size
    record.next_avail = s.next_available
    record.next_used = s.next_used


def store_ring(record: Any, queue: VirtQueue) -> None:
    """The positions a C loop moved back into ``queue``'s state."""
    s = queue.state
    s.next_available = record.next_avail
    s.next_used = record.next_used
