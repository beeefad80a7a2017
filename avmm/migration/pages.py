"""Guest RAM by page number (file offset / 4096, as avmm.state.memory_file numbers
pages): read for the stream on the source, written from it on the destination.

Both go through the VM's own mapping (``memory.view``), never through the memfd: a VM
restored from a snapshot without copying runs on a private mapping of the memory file,
which its memfd does not see."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from .stream import KIND_DATA, PAGE_SIZE, ZERO_PAGE


class _Region(Protocol):
    guest_address: int
    size: int
    file_offset: int


class Ram(Protocol):
    size: int

    @property
    def regions(self) -> Sequence[_Region]: ...

    def view(self, address: int, length: int) -> memoryview: ...


class PageMap:
    """Page number → guest physical address, for one guest memory layout."""

    def __init__(self, memory: Ram) -> None:
        self.memory = memory
        self.total = memory.size // PAGE_SIZE
        #: Destination: one byte per page, 1 where stream data was stored.
        self._written = bytearray(self.total)
        # (first page, end page, guest address of the first page), in file order.
        self._spans = [(r.file_offset // PAGE_SIZE, (r.file_offset + r.size) // PAGE_SIZE,
                        r.guest_address) for r in sorted(memory.regions,
                                                         key=lambda r: r.file_offset)]

    def address(self, page: int) -> int:
        for first, end, guest_address in self._spans:
            if first <= page < end:
                return guest_address + (page - first) * PAGE_SIZE
        raise IndexError(page)

    def read(self, page: int) -> bytes | None:
        """The page's bytes, or None if it is all zeros."""
        data = bytes(self.memory.view(self.address(page), PAGE_SIZE))
        return None if data == ZERO_PAGE else data

    def read_batch(self, batch: list[int]) -> list[bytes | None]:
        """:meth:`read` of each page of ``batch``; a run of consecutive pages in one
        region (round 0, mostly) is read and checked for zeros in one go."""
        first, count = batch[0], len(batch)
        if batch[-1] - first == count - 1:
            for start, end, guest_address in self._spans:
                if start <= first and first + count <= end:
                    data = bytes(self.memory.view(
                        guest_address + (first - start) * PAGE_SIZE, count * PAGE_SIZE))
                    if data.count(0) == len(data):  # C speed: an untouched stretch
                        return [None] * count
                    pages: list[bytes | None] = []
                    for offset in range(0, len(data), PAGE_SIZE):
                        page = data[offset:offset + PAGE_SIZE]
                        pages.append(None if page == ZERO_PAGE else page)
                    return pages
        return [self.read(page) for page in batch]

    def batches(self, pages: Iterable[int], size: int) -> Iterator[list[int]]:
        batch: list[int] = []
        for page in pages:
            batch.append(page)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def write_batch(self, numbers: memoryview, kinds: bytes, data: memoryview) -> None:
        """Store a checked batch (see :func:`avmm.migration.stream.parse_pages`)."""
        # RAM on the destination starts as zeros: a zero page needs writing only where
        # data landed before (an earlier round), and untouched RAM stays unallocated.
        written = self._written
        count = len(kinds)
        first = numbers[0]
        if (not any(kinds) and numbers[count - 1] - first == count - 1
                and not any(written[first:first + count])):
            return
        offset = 0
        view = self.memory.view
        for number, kind in zip(numbers, kinds, strict=True):
            if kind == KIND_DATA:
                view(self.address(number), PAGE_SIZE)[:] = data[offset:offset + PAGE_SIZE]
                offset += PAGE_SIZE
                written[number] = 1
            elif written[number]:
                view(self.address(number), PAGE_SIZE)[:] = ZERO_PAGE
                written[number] = 0
