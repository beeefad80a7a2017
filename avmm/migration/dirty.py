"""Dirty page tracking for live migration: which pages of guest RAM changed since the
last look.

Three sources, merged by :meth:`DirtyLog.collect` (DESIGN.md, "State, snapshot and
migration"); missing one loses data silently:

* KVM's dirty log: every page the guest (or KVM on its behalf: kvmclock, steal time)
  wrote, per memory slot (KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG).
* avmm's own marks (:class:`DirtyMarks`): every write the VMM itself makes into guest
  memory (used rings, blk reads, net RX, console, rng). KVM never sees those: they go
  through our mapping, not through the guest's page tables. Writers call
  ``memory.mark_dirty(address, length)`` (or ``memory.dirty.mark``) *after* the write:
  a mark that lands after a collect shows in the next one, so no write is ever lost
  (a mark before the write could be collected, and the page sent, before the data lands).
* Added sources (:meth:`DirtyLog.add_source`): a vhost-user back-end's log, anything
  else that writes guest RAM behind our back.

Pages are numbered by their offset in the guest RAM memfd / 4096 (as
:mod:`avmm.state.memory_file` numbers them), not by guest physical address: the memfd
has no hole, and that is what a migration stream copies.

Threading: :meth:`DirtyMarks.mark` may be called from any thread (device I/O threads);
:meth:`DirtyLog.collect` from one thread at a time (it issues KVM_GET_DIRTY_LOG, a short
ioctl that does not block on the guest; for a large VM call it from a worker thread).
When no migration runs, ``memory.dirty`` is ``None`` and a write pays one attribute test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import structlog

from ..errors import AvmmError, KvmError
from ..memory import PAGE_SIZE, MemoryRegion

if TYPE_CHECKING:
    from ..kvm import Vm
    from ..memory import GuestMemory

__all__ = ["PAGE_SHIFT", "DirtyLog", "DirtyLogError", "DirtyMarks", "PageSet"]

log = structlog.get_logger(__name__)

PAGE_SHIFT = 12
assert 1 << PAGE_SHIFT == PAGE_SIZE
#: Bitmaps are kept in whole u64 words, as KVM hands them out.
_WORD_BYTES = 8
#: Iteration skips runs of this many zero bytes at C speed.
_SCAN_BYTES = 4096
_FULL_WORD = (1 << 64) - 1


class DirtyLogError(AvmmError):
    """Dirty logging could not be started or read (the message says why)."""


def _bitmap_bytes(pages: int) -> int:
    """Bytes of a bitmap of ``pages`` bits, rounded up to whole u64 words."""
    return (pages + 63) // 64 * _WORD_BYTES


class PageSet:
    """A set of page numbers in ``range(size)``, kept as a bitmap (bit ``p % 8`` of byte
    ``p // 8`` is page ``p``: KVM's and vhost-user's layout on little-endian hosts).

    Compact (one bit per page: 32 KiB per GiB of RAM), ``len()`` counts set bits at C
    speed, iteration yields pages in ascending order and skips empty stretches quickly,
    :meth:`runs` yields ``(first, count)`` runs of consecutive pages. ``|=`` merges a
    set of the same ``size``.
    """

    __slots__ = ("_bits", "size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"a page set cannot hold {size} pages")
        self.size = size
        self._bits = bytearray(_bitmap_bytes(size))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_bitmap(cls, bitmap: bytes | bytearray | memoryview, size: int,
                    first_page: int = 0) -> PageSet:
        """A set of ``size`` pages holding those set in ``bitmap`` (bit 0 = page
        ``first_page``). Bits past ``size`` are ignored."""
        pages = cls(size)
        pages.or_bitmap(bitmap, first_page)
        return pages

    @classmethod
    def from_pages(cls, size: int, pages: Iterable[int]) -> PageSet:
        result = cls(size)
        for page in pages:
            result.add(page)
        return result

    @classmethod
    def full(cls, size: int) -> PageSet:
        """Every page: what the first round of a migration sends."""
        result = cls(size)
        result.add_range(0, size)
        return result

    def copy(self) -> PageSet:
        result = PageSet(0)
        result.size = self.size
        result._bits = bytearray(self._bits)
        return result

    # -- changes ------------------------------------------------------------------------

    def add(self, page: int) -> None:
        if not 0 <= page < self.size:
            raise ValueError(f"page {page} is outside this set of {self.size} pages")
        self._bits[page >> 3] |= 1 << (page & 7)

    def add_range(self, first: int, count: int) -> None:
        """Add pages ``first .. first + count - 1``."""
        if count <= 0:
            return
        if first < 0 or first + count > self.size:
            raise ValueError(f"pages {first}..{first + count - 1} are outside this set "
                             f"of {self.size} pages")
        _set_bits(self._bits, first, first + count - 1)

    def discard(self, page: int) -> None:
        if 0 <= page < self.size:
            self._bits[page >> 3] &= ~(1 << (page & 7)) & 0xFF

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))

    def or_bitmap(self, bitmap: bytes | bytearray | memoryview, first_page: int = 0) -> None:
        """Add the pages set in ``bitmap``, whose bit 0 stands for page ``first_page``
        (a memory slot's log placed at the slot's first page). Bits that would fall
        past ``size`` are dropped."""
        if first_page < 0:
            raise ValueError(f"negative first page {first_page}")
        room = self.size - first_page
        if room <= 0 or not len(bitmap):
            return
        incoming = int.from_bytes(bitmap, "little")
        if not incoming:
            return
        if incoming.bit_length() > room:
            incoming &= (1 << room) - 1
        if not first_page & 7:
            # Byte-aligned (every slot of avmm's own layout): OR only the bytes it covers.
            start = first_page >> 3
            length = (incoming.bit_length() + 7) >> 3
            mine = int.from_bytes(self._bits[start:start + length], "little")
            self._bits[start:start + length] = (mine | incoming).to_bytes(length, "little")
            return
        merged = int.from_bytes(self._bits, "little") | (incoming << first_page)
        self._bits[:] = merged.to_bytes(len(self._bits), "little")

    def __ior__(self, other: PageSet) -> PageSet:
        if not isinstance(other, PageSet):
            return NotImplemented
        if other.size != self.size:
            raise ValueError(f"cannot merge a set of {other.size} pages into one of "
                             f"{self.size}")
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        self._bits[:] = merged.to_bytes(len(self._bits), "little")
        return self

    def __or__(self, other: PageSet) -> PageSet:
        result = self.copy()
        result |= other
        return result

    # -- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def __bool__(self) -> bool:
        return any(self._bits)

    def __contains__(self, page: object) -> bool:
        if not isinstance(page, int) or not 0 <= page < self.size:
            return False
        return bool(self._bits[page >> 3] >> (page & 7) & 1)

    def _words(self) -> Iterator[tuple[int, int]]:
        """``(first page, u64 word)`` of every non-zero word, ascending; all-zero
        stretches are skipped a chunk at a time."""
        bits = self._bits
        words = memoryview(bits).cast("Q")
        per_chunk = _SCAN_BYTES // _WORD_BYTES
        for start in range(0, len(bits), _SCAN_BYTES):
            if not int.from_bytes(bits[start:start + _SCAN_BYTES], "little"):
                continue
            first_word = start // _WORD_BYTES
            for index in range(first_word, min(first_word + per_chunk, len(words))):
                word = words[index]
                if word:
                    yield index << 6, word

    def __iter__(self) -> Iterator[int]:
        for base, word in self._words():
            while word:
                low = word & -word
                yield base + low.bit_length() - 1
                word ^= low

    def runs(self) -> Iterator[tuple[int, int]]:
        """``(first, count)`` for every maximal run of consecutive pages, ascending."""
        first = -1
        end = -1  # one past the last page of the open run
        for base, word in self._words():
            if word == _FULL_WORD:
                if base != end:
                    if first >= 0:
                        yield first, end - first
                    first = base
                end = base + 64
                continue
            # A run of set bits at a time (not a page at a time): its lowest bit, then
            # how many ones follow from there.
            while word:
                low = (word & -word).bit_length() - 1
                ones = word >> low
                length = (ones ^ (ones + 1)).bit_length() - 1
                word = (ones >> length) << (low + length)
                page = base + low
                if page != end:
                    if first >= 0:
                        yield first, end - first
                    first = page
                end = page + length
        if first >= 0:
            yield first, end - first

    def bitmap(self) -> bytes:
        """The bitmap (whole u64 words; bits past ``size`` are 0)."""
        return bytes(self._bits)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageSet):
            return NotImplemented
        return self.size == other.size and self._bits == other._bits

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PageSet(size={self.size}, pages={len(self)})"


def _set_bits(bits: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive) of ``bits``."""
    first_byte, last_byte = first >> 3, last >> 3
    if first_byte == last_byte:
        bits[first_byte] |= ((1 << (last - first + 1)) - 1) << (first & 7)
        return
    bits[first_byte] |= (0xFF << (first & 7)) & 0xFF
    if last_byte > first_byte + 1:
        bits[first_byte + 1:last_byte] = b"\xff" * (last_byte - first_byte - 1)
    bits[last_byte] |= (1 << ((last & 7) + 1)) - 1


class _Region(Protocol):
    guest_address: int
    size: int
    file_offset: int


class DirtyMarks:
    """avmm's own dirty bitmap: the pages the VMM wrote, marked by guest address.

    Put on a memory object as ``memory.dirty`` while a migration runs; writers call
    :meth:`mark` after each write into guest RAM. Thread-safe: a lock orders marks
    against :meth:`take`, so a mark is in exactly one taken bitmap (an unlocked
    read-modify-write of a byte could lose a bit another thread set, or land in a
    bitmap that was already taken and read).
    """

    def __init__(self, regions: Sequence[_Region], pages: int) -> None:
        self.pages = pages
        self._regions = tuple(regions)
        # Guest addresses below this are their own memfd offset (avmm's low RAM).
        first = self._regions[0] if self._regions else None
        self._identity_end = (first.size if first is not None and first.guest_address == 0
                              and first.file_offset == 0 else 0)
        self._lock = threading.Lock()
        self._bits = bytearray(_bitmap_bytes(pages))

    def mark(self, address: int, length: int) -> None:
        """Mark the pages of ``[address, address + length)`` (guest physical) written.
        Addresses outside RAM are ignored: the write they stand for failed."""
        if length <= 0:
            return
        if address >= 0 and address + length <= self._identity_end:
            offset = address
        else:
            offset = self._offset(address, length)
            if offset < 0:
                return
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        with self._lock:
            bits = self._bits
            if first == last:
                bits[first >> 3] |= 1 << (first & 7)
            else:
                _set_bits(bits, first, last)

    def _offset(self, address: int, length: int) -> int:
        for region in self._regions:
            if region.guest_address <= address and address + length <= (
                    region.guest_address + region.size):
                return region.file_offset + address - region.guest_address
        return -1

    def take(self) -> bytearray:
        """The marks so far (a bitmap by memfd page), leaving none."""
        fresh = bytearray(len(self._bits))
        with self._lock:
            taken, self._bits = self._bits, fresh
        return taken


DirtySource = Callable[[], PageSet]


class DirtyLog:
    """Dirty page tracking for one VM being migrated: KVM's log of every memory slot,
    avmm's own marks, and any added source, merged by :meth:`collect`.

    ``slots`` are the KVM memory slots that hold guest RAM, each ``(slot number,
    region)`` with the region's guest address, size and memfd offset exactly as the slot
    was registered; avmm registers slot ``i`` for ``memory.regions[i]``, so
    ``slots=enumerate(memory.regions)`` is the usual argument.

    ``start()`` turns logging on (KVM_MEM_LOG_DIRTY_PAGES on every slot, and
    ``memory.dirty``), ``collect()`` fetches and clears everything dirtied since the
    last collect (or since start), ``stop()`` turns logging off; also a context manager
    (start on enter, stop on exit).
    """

    def __init__(self, kvm_vm: Vm, memory: GuestMemory, *,
                 slots: Iterable[tuple[int, MemoryRegion]]) -> None:
        self.kvm_vm = kvm_vm
        self.memory = memory
        self.pages = memory.size >> PAGE_SHIFT
        self.slots = _check_slots(memory, slots)
        self._sources: list[DirtySource] = []
        self._marks: DirtyMarks | None = None
        self._logging: list[tuple[int, MemoryRegion]] = []
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._marks is not None

    def add_source(self, source: DirtySource) -> None:
        """Add a source of dirty pages: a callable returning a :class:`PageSet` (of
        ``self.pages`` pages) of what it saw dirtied since its last call."""
        self._sources.append(source)

    def remove_source(self, source: DirtySource) -> None:
        self._sources.remove(source)

    def start(self) -> None:
        """Turn logging on; from here every write to guest RAM is seen by ``collect``.
        Raises DirtyLogError (and leaves logging off) if KVM refuses or another log
        already runs on this memory."""
        with self._lock:
            if self._marks is not None:
                raise DirtyLogError("dirty logging is already running for this VM")
            if getattr(self.memory, "dirty", None) is not None:
                raise DirtyLogError("another dirty log already runs on this VM's memory "
                                    "(one migration at a time)")
            marks = DirtyMarks(self.memory.regions, self.pages)
            # Our marks first: a device write between the two steps is then not missed.
            self.memory.dirty = marks
            self._marks = marks
            try:
                for slot, region in self.slots:
                    self._set_logging(slot, region, True)
                    self._logging.append((slot, region))
            except KvmError as e:
                self._stop_locked()
                raise DirtyLogError(f"KVM refused dirty logging on memory slot {slot}: "
                                    f"{e}") from e
            log.debug("dirty logging started", slots=len(self.slots), pages=self.pages)

    def collect(self) -> PageSet:
        """Every page dirtied since the last collect (or since start), from every
        source; each source's record is cleared as it is read."""
        with self._lock:
            marks = self._marks
            if marks is None:
                raise DirtyLogError("dirty logging is not running (start() it first)")
            pages = PageSet(self.pages)
            for slot, region in self.slots:
                try:
                    bitmap = self.kvm_vm.get_dirty_log(slot, region.size >> PAGE_SHIFT)
                except KvmError as e:
                    raise DirtyLogError(f"cannot read KVM's dirty log of memory slot "
                                        f"{slot}: {e}") from e
                pages.or_bitmap(bitmap, region.file_offset >> PAGE_SHIFT)
            # After KVM's: a page a device writes meanwhile is in this round or the next.
            pages.or_bitmap(marks.take())
            for source in self._sources:
                pages |= source()
            return pages

    def stop(self) -> None:
        """Turn logging off (idempotent). Safe on a VM that is being torn down."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._marks is not None and getattr(self.memory, "dirty", None) is self._marks:
            self.memory.dirty = None
        self._marks = None
        logging, self._logging = self._logging, []
        if self.kvm_vm.fd < 0:
            return  # the VM is gone, and its slots with it
        for slot, region in logging:
            try:
                self._set_logging(slot, region, False)
            except KvmError as e:
                # Logging left on costs write faults, not correctness.
                log.warning("cannot turn KVM dirty logging off", slot=slot, error=str(e))

    def _set_logging(self, slot: int, region: MemoryRegion, on: bool) -> None:
        # Same slot, address, size and backing, other flags: KVM changes only the flags.
        self.kvm_vm.set_user_memory_region(
            slot, region.guest_address, region.size,
            self.memory.host_base + region.file_offset, log_dirty_pages=on)

    def __enter__(self) -> DirtyLog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_slots(memory: GuestMemory,
                 slots: Iterable[tuple[int, MemoryRegion]]) -> tuple[tuple[int, MemoryRegion], ...]:
    """The slots, checked: whole pages inside the memfd, each where ``memory`` maps
    that guest address, no slot number or byte of RAM twice."""
    checked: list[tuple[int, MemoryRegion]] = []
    numbers: set[int] = set()
    for slot, region in slots:
        where = f"memory slot {slot}"
        if not isinstance(slot, int) or not 0 <= slot < 0x8000:
            raise DirtyLogError(f"{where}: not a KVM memory slot number")
        if slot in numbers:
            raise DirtyLogError(f"{where} is given twice")
        numbers.add(slot)
        if (region.size <= 0 or (region.guest_address | region.size | region.file_offset)
                % PAGE_SIZE or region.guest_address < 0 or region.file_offset < 0):
            raise DirtyLogError(f"{where}: guest 0x{region.guest_address:x} size "
                                f"0x{region.size:x} offset 0x{region.file_offset:x} is not "
                                "whole pages")
        if region.file_offset + region.size > memory.size:
            raise DirtyLogError(f"{where} runs past the end of guest RAM")
        # It must map guest addresses where memory does: a slot re-registered elsewhere
        # would move guest RAM under the running guest.
        try:
            home = memory.region_for(region.guest_address, region.size)
        except AvmmError as e:
            raise DirtyLogError(f"{where} is not inside guest RAM: {e}") from e
        if home.file_offset + region.guest_address - home.guest_address != region.file_offset:
            raise DirtyLogError(f"{where}: guest 0x{region.guest_address:x} is not at memfd "
                                f"offset 0x{region.file_offset:x}")
        for other_slot, other in checked:
            if (region.file_offset < other.file_offset + other.size
                    and other.file_offset < region.file_offset + region.size):
                raise DirtyLogError(f"{where} overlaps memory slot {other_slot}")
        checked.append((slot, MemoryRegion(region.guest_address, region.size,
                                           region.file_offset)))
    if not checked:
        raise DirtyLogError("no memory slot to log")
    return tuple(checked)
