"""Guest physical memory: memfd-backed, shared mappings, bounds-checked access.

RAM is one ``memfd`` mapped ``MAP_SHARED`` once into this process. It is split into guest
regions around the 32-bit MMIO hole (x86 puts the IOAPIC, LAPIC and device windows below
4 GiB). Because the backing is a memfd, a vhost-user backend can later map the very same
pages from the fd and an offset; the memfd is sealed against shrinking
(``F_SEAL_SHRINK``), so no process that maps it can be made to fault past its end.

Every access is by guest physical address and is checked against the region map: an
address outside RAM raises :class:`GuestAddressError`, never an ``IndexError`` deep inside
a device.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
from dataclasses import dataclass
from typing import Any, NewType, Protocol

from .errors import GuestAddressError, GuestMemoryError

GuestAddress = NewType("GuestAddress", int)
"""A guest physical address. Kept distinct from host offsets in type hints."""

MIB = 1 << 20
GIB = 1 << 30

#: The 32-bit MMIO hole: guest RAM never occupies [MMIO_HOLE_START, 4 GiB).
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000

PAGE_SIZE = 4096

# The native-width accessors below rely on the host storing integers like the guest.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("avmm runs x86 guests on little-endian hosts only")


@dataclass(frozen=True)
class MemoryRegion:
    """A contiguous range of guest RAM and where it lives in the backing memfd."""

    guest_address: int
    size: int
    #: Offset of the region's first byte in the memfd (and in this process's mapping).
    file_offset: int

    @property
    def end(self) -> int:
        """First guest address past the region."""
        return self.guest_address + self.size

    def contains(self, address: int, length: int = 1) -> bool:
        return self.guest_address <= address and address + length <= self.end


def plan_regions(size: int) -> tuple[MemoryRegion, ...]:
    """Split ``size`` bytes of RAM into regions that avoid the 32-bit MMIO hole."""
    if size <= 0 or size % PAGE_SIZE:
        raise GuestMemoryError(
            f"guest memory size must be a positive multiple of 4 KiB, got {size}"
        )
    low = min(size, MMIO_HOLE_START)
    regions = [MemoryRegion(0, low, 0)]
    if size > low:
        regions.append(MemoryRegion(MMIO_HOLE_END, size - low, low))
    return tuple(regions)


class DirtyMarker(Protocol):
    """Where writes into guest memory are recorded while a migration runs
    (:class:`avmm.migration.dirty.DirtyMarks`, a vhost-user back-end's log)."""

    def mark(self, address: int, length: int) -> None:
        """Record that ``[address, address + length)`` (guest physical) was written.
        Called from any thread, after the write."""


class MemoryAccess:
    """Reads and writes by guest physical address, built on ``view()``.

    Dirty marking: while a migration runs, ``dirty`` is a :class:`DirtyMarker`, and
    whatever writes guest memory on avmm's behalf must report it: ``write`` and
    ``write_u*`` do so themselves; code that writes through a ``view()`` (a device's
    ``preadv``, a used ring) calls :meth:`mark_dirty` after the write. When no migration
    runs ``dirty`` is ``None`` and a write pays one attribute test.

    ``read_u16/u32/u64`` and ``write_u16/u32/u64`` are single loads and stores of that
    width (a memoryview cast to a native integer format): the guest may update the same
    field at the same moment (a ring index), and a byte-by-byte access could see or
    leave half of an update. Guest memory is little-endian x86 memory, and so is ours.

    Devices and the virtqueue take any object with this interface, so that they can be
    tested on a :class:`ByteArrayMemory` and run on a :class:`GuestMemory`.
    """

    #: Set by :class:`avmm.migration.dirty.DirtyLog` while it runs; see the class doc.
    dirty: DirtyMarker | None = None

    def mark_dirty(self, address: int, length: int) -> None:
        """Report a write of ``[address, address + length)`` made through a view."""
        dirty = self.dirty
        if dirty is not None:
            dirty.mark(address, length)

    def host_buffers(self) -> tuple[tuple[int, int, Any, int], ...] | None:
        """Guest RAM as writable buffers for C code (avmm.virtio.net_fast): per region
        (guest address, size, an object with the buffer protocol, offset of the
        region's first byte in it); None where the memory cannot be handed out."""
        return None

    def view(self, address: int, length: int) -> memoryview:
        raise NotImplementedError

    def contains(self, address: int, length: int = 1) -> bool:
        raise NotImplementedError

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.view(address, length))

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        view = self.view(address, len(data))
        view[:] = data
        dirty = self.dirty
        if dirty is not None:
            dirty.mark(address, len(view))

    def read_u8(self, address: int) -> int:
        return self.view(address, 1)[0]

    def read_u16(self, address: int) -> int:
        return int(self.view(address, 2).cast("H")[0])

    def read_u32(self, address: int) -> int:
        return int(self.view(address, 4).cast("I")[0])

    def read_u64(self, address: int) -> int:
        return int(self.view(address, 8).cast("Q")[0])

    def write_u8(self, address: int, value: int) -> None:
        self.write(address, value.to_bytes(1, "little"))

    def write_u16(self, address: int, value: int) -> None:
        if not 0 <= value < 1 << 16:
            raise OverflowError(f"{value} does not fit in u16")
        self.view(address, 2).cast("H")[0] = value
        dirty = self.dirty
        if dirty is not None:
            dirty.mark(address, 2)

    def write_u32(self, address: int, value: int) -> None:
        if not 0 <= value < 1 << 32:
            raise OverflowError(f"{value} does not fit in u32")
        self.view(address, 4).cast("I")[0] = value
        dirty = self.dirty
        if dirty is not None:
            dirty.mark(address, 4)

    def write_u64(self, address: int, value: int) -> None:
        if not 0 <= value < 1 << 64:
            raise OverflowError(f"{value} does not fit in u64")
        self.view(address, 8).cast("Q")[0] = value
        dirty = self.dirty
        if dirty is not None:
            dirty.mark(address, 8)



class ByteArrayMemory(MemoryAccess):
    """Guest memory made of a plain bytearray at guest address 0: for unit tests of code
    that only reads and writes guest memory (virtqueues, devices)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.size = size
        self.regions = (MemoryRegion(0, size, 0),)

    def contains(self, address: int, length: int = 1) -> bool:
        return address >= 0 and length >= 0 and address + length <= self.size

    def host_buffers(self) -> tuple[tuple[int, int, Any, int], ...] | None:
        # By the region map (a test may remap it), as GuestMemory's.
        return tuple((region.guest_address, region.size, self.data, region.file_offset)
                     for region in self.regions)

    def view(self, address: int, length: int) -> memoryview:
        if not self.contains(address, length):
            raise GuestAddressError(address, length)
        return memoryview(self.data)[address:address + length]


class GuestMemory(MemoryAccess):
    """Guest RAM backed by one shared memfd.

    The region map is immutable for the life of the object. Reads and writes may span
    adjacent regions only if they are contiguous in guest address space (they never are
    across the MMIO hole, so such an access is an error).
    """

    def __init__(self, size: int, *, name: str = "avmm-guest-ram") -> None:
        self.regions = plan_regions(size)
        self.size = size
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise GuestMemoryError(f"memfd_create failed: {e}") from e
        try:
            os.ftruncate(self.fd, size)
            # Whoever maps this fd (a vhost-user back-end) faults with SIGBUS on any page
            # past the end should the file shrink; sealing it makes that impossible, and
            # lets a back-end require the seal before it maps anything.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            raise GuestMemoryError(
                f"cannot allocate {size // MIB} MiB of guest memory: {e}"
            ) from e
        self._view = memoryview(self._map)
        # Hot path (every ring access of every virtqueue): most addresses fall in the
        # first region, which starts at guest address 0 and file offset 0, so a guest
        # address there is its own offset into the mapping. ``_low_end`` is 0 once
        # closed, which sends every access to the slow path and its "closed" error.
        self._low_end = self.regions[0].size
        # Native u16 views of low RAM for aligned ring-index loads and stores: one C-level
        # 16-bit access each, as the MemoryAccess contract requires, without building a
        # slice and a cast per access.
        self._low_u16 = self._view[:self._low_end].cast("H")
        # The C address of our mapping, for KVM_SET_USER_MEMORY_REGION and vhost-user.
        anchor = ctypes.c_char.from_buffer(self._map)
        self.host_base = ctypes.addressof(anchor)
        del anchor
        self._closed = False

    # -- lookup -------------------------------------------------------------------------

    def region_for(self, address: int, length: int = 1) -> MemoryRegion:
        """The region holding ``[address, address+length)``, or GuestAddressError."""
        if length < 0 or address < 0:
            raise GuestAddressError(address, length)
        first = self.regions[0]
        if address + (length or 1) <= first.size:  # the common case: low RAM
            return first
        for region in self.regions:
            if region.contains(address, max(length, 1)):
                return region
        raise GuestAddressError(address, length)

    def contains(self, address: int, length: int = 1) -> bool:
        if address < 0 or length < 0:
            return False
        end = address + (length or 1)
        if end <= self.regions[0].size:  # low RAM, the usual case
            return True
        return any(region.guest_address <= address and end <= region.end
                   for region in self.regions)

    def host_buffers(self) -> tuple[tuple[int, int, Any, int], ...] | None:
        if self._closed:
            return None
        return tuple((region.guest_address, region.size, self._map, region.file_offset)
                     for region in self.regions)

    def host_address(self, region: MemoryRegion) -> int:
        """Userspace address of ``region`` in this process."""
        return self.host_base + region.file_offset

    def _offset(self, address: int, length: int) -> int:
        region = self.region_for(address, length)
        return region.file_offset + (address - region.guest_address)

    # -- access -------------------------------------------------------------------------

    def view(self, address: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM; no copy. Must not outlive ``close()``."""
        if address >= 0 and length >= 0 and address + (length or 1) <= self._low_end:
            return self._view[address:address + length]
        if self._closed:
            raise GuestMemoryError("guest memory is closed (the VM has been torn down)")
        start = self._offset(address, length)
        return self._view[start:start + length]

    def read_u16(self, address: int) -> int:
        if not address & 1 and address >= 0 and address + 2 <= self._low_end:
            return self._low_u16[address >> 1]
        return super().read_u16(address)

    def write_u16(self, address: int, value: int) -> None:
        if not address & 1 and address >= 0 and address + 2 <= self._low_end:
            # The cast view raises ValueError for a value that does not fit; keep the
            # OverflowError every MemoryAccess raises.
            if not 0 <= value < 1 << 16:
                raise OverflowError(f"{value} does not fit in u16")
            self._low_u16[address >> 1] = value
            dirty = self.dirty
            if dirty is not None:
                dirty.mark(address, 2)
            return
        super().write_u16(address, value)

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._low_end = 0
        self._low_u16.release()
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # A device still holds a view; the mapping goes away with the last view.
            pass
        os.close(self.fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
