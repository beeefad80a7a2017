"""Guest RAM by page number (file offset / 4096, as avmm.state.memory_file numbers
pages): read for the stream on the source, written from it on the destination.

Both go through the VM's own mapping (``memory.view``), never through the memfd: a VM
restored from a snapshot without copying runs on a private mapping of the memory file,
which its memfd does not see.

Everything works on runs of consecutive pages, a frame (up to
:data:`~avmm.migration.stream.MAX_FRAME_PAGES` pages) at a time: the per-page work left
in Python is one memcmp-speed comparison against zeros where a run is not all zeros;
copies and hashing are single C calls over whole runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from .stream import KIND_DATA, KIND_ZERO, MAX_FRAME_PAGES, PAGE_SIZE, Run

#: Zeros to compare runs of pages against (a memoryview slice of it costs no copy).
#: Zeros to compare guest pages with: ``bytes.startswith`` is one memcmp (a memoryview
#: ``==`` compares item by item, about 20 times slower).
_ZEROS = bytes(MAX_FRAME_PAGES * PAGE_SIZE)
_ONES = b"\1" * MAX_FRAME_PAGES


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

    def pieces(self, first: int, count: int) -> Iterator[tuple[int, int, memoryview]]:
        """``(first page, pages, view of their bytes)`` for pages ``first ..
        first + count - 1``, one piece per memory region they fall in."""
        for piece_first, pages, guest_address in self._spans_of(first, count):
            yield piece_first, pages, self.memory.view(guest_address, pages * PAGE_SIZE)

    # -- source -------------------------------------------------------------------------

    def frames(self, runs: Iterable[tuple[int, int]],
               frame_pages: int = MAX_FRAME_PAGES) -> Iterator[list[tuple[int, int]]]:
        """``runs`` ((first, count), ascending) cut into frames of at most
        ``frame_pages`` pages each, every piece inside one memory region."""
        frame: list[tuple[int, int]] = []
        room = frame_pages
        for first, count in runs:
            for piece_first, pages, _ in self._spans_of(first, count):
                while pages:
                    take = min(pages, room)
                    frame.append((piece_first, take))
                    piece_first += take
                    pages -= take
                    room -= take
                    if not room:
                        yield frame
                        frame, room = [], frame_pages
        if frame:
            yield frame

    def _spans_of(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """``(first page, pages, guest address of the first)`` for pages ``first ..
        first + count - 1``, one per memory region they fall in."""
        end = first + count
        for start, stop, guest_address in self._spans:
            if first >= end:
                return
            if start <= first < stop:
                pages = min(end, stop) - first
                yield first, pages, guest_address + (first - start) * PAGE_SIZE
                first += pages
        if first < end:
            raise IndexError(first)

    def read_frame(self, frame: Sequence[tuple[int, int]],
                   buffer: memoryview) -> tuple[list[Run], int]:
        """Read the pages of ``frame`` (from :meth:`frames`): the frame's runs, zero
        runs apart, and how many bytes of ``buffer`` the data runs' pages fill, in run
        order. A page the guest writes meanwhile is dirty again (it is sent again next
        round): whichever of its contents this reads stands until then."""
        runs: list[Run] = []
        used = 0
        for first, count in frame:
            for piece_first, pages, view in self.pieces(first, count):
                if _ZEROS.startswith(view):  # memcmp: an untouched stretch
                    _append(runs, piece_first, pages, KIND_ZERO)
                    continue
                # Classify page by page (a memcmp each, stopping at the first non-zero
                # byte), copying each stretch of data pages in one go.
                data_from = -1
                for index in range(pages + 1):
                    offset = index * PAGE_SIZE
                    zero = index == pages or _ZEROS.startswith(
                        view[offset:offset + PAGE_SIZE])
                    if zero:
                        if data_from >= 0:
                            length = (index - data_from) * PAGE_SIZE
                            buffer[used:used + length] = view[data_from * PAGE_SIZE:offset]
                            used += length
                            _append(runs, piece_first + data_from, index - data_from,
                                    KIND_DATA)
                            data_from = -1
                        if index < pages:
                            _append(runs, piece_first + index, 1, KIND_ZERO)
                    elif data_from < 0:
                        data_from = index
        return runs, used

    # -- destination --------------------------------------------------------------------

    def data_views(self, first: int, count: int) -> list[memoryview]:
        """Where the pages of a data run go (one view per memory region), marked as
        holding stream data."""
        self._written[first:first + count] = _ONES[:count] if count <= len(_ONES) else (
            b"\1" * count)
        return [view for _, _, view in self.pieces(first, count)]

    def store_zeros(self, first: int, count: int) -> None:
        """Pages ``first .. first + count - 1`` are zeros. RAM on the destination starts
        as zeros: only pages that got data in an earlier round need zeroing, and
        untouched RAM stays unallocated."""
        written = self._written
        end = first + count
        page = written.find(1, first, end)
        while page >= 0:
            stop = written.find(0, page, end)
            if stop < 0:
                stop = end
            for _, _, view in self.pieces(page, stop - page):
                view[:] = bytes(len(view))
            written[page:stop] = bytes(stop - page)
            page = written.find(1, stop, end)


def _append(runs: list[Run], first: int, pages: int, kind: int) -> None:
    """Add a run, merged into the last one where it continues it."""
    if runs:
        last_first, last_pages, last_kind = runs[-1]
        if last_kind == kind and last_first + last_pages == first:
            runs[-1] = (last_first, last_pages + pages, kind)
            return
    runs.append((first, pages, kind))
