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
        offset = 0
        view = self.memory.view
        for number, kind in zip(numbers, kinds, strict=True):
            target = view(self.address(number), PAGE_SIZE)
            if kind == KIND_DATA:
                target[:] = data[offset:offset + PAGE_SIZE]
                offset += PAGE_SIZE
            else:
                target[:] = ZERO_PAGE
