"""DirtyLog and PageSet: KVM's dirty log of guest writes, avmm's own marks, added
sources, collect-and-clear, stop, and the slot layouts a log accepts."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from avmm.errors import KvmError
from avmm.kvm import exits
from avmm.memory import MIB, PAGE_SIZE, ByteArrayMemory, GuestMemory, MemoryRegion
from avmm.migration.dirty import DirtyLog, DirtyLogError, DirtyMarks, PageSet
from tests.kvm.guest import Guest, boot_guest, run

#: Where the test code writes: a stretch of RAM nothing else uses (the code is at 1 MiB,
#: the boot page tables and GDT below it).
DATA_AREA = 0x30_0000
DATA_PAGES = 64
DONE_PORT = 0x42


def writes_then_out(addresses: list[int]) -> bytes:
    """Guest code: store one byte at each address, then ``out DONE_PORT, al``; repeat
    from the start on the next run."""
    code = bytearray()
    for address in addresses:
        code += b"\x48\xb8" + struct.pack("<Q", address)  # mov rax, address
        code += b"\xc6\x00\x5a"                           # mov byte [rax], 0x5a
    code += bytes([0xE6, DONE_PORT])                      # out DONE_PORT, al
    # jmp back to the start: rel32 from the end of this 5-byte jmp
    code += b"\xe9" + struct.pack("<i", -(len(code) + 5))
    return bytes(code)


def data_pages(pages: PageSet, memory_offset_of_area: int = DATA_AREA) -> set[int]:
    """The collected pages that fall in the data area, as page numbers in the area."""
    first = memory_offset_of_area // PAGE_SIZE
    return {page - first for page in pages if first <= page < first + DATA_PAGES}


@pytest.fixture
def cleanup() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def guest_writing(cleanup: ExitStack, pages: list[int]) -> Guest:
    code = writes_then_out([DATA_AREA + page * PAGE_SIZE + 8 * page for page in pages])
    return boot_guest(cleanup, code, memory_mib=8)


def run_once(guest: Guest) -> None:
    event = run(guest.vcpu)
    assert isinstance(event, exits.IoOut) and event.port == DONE_PORT, event


# -- PageSet -------------------------------------------------------------------------------


def test_page_set_iterates_in_order_and_counts() -> None:
    pages = PageSet(1000)
    for page in (999, 0, 63, 64, 500, 501, 502):
        pages.add(page)
    assert list(pages) == [0, 63, 64, 500, 501, 502, 999]
    assert len(pages) == 7
    assert list(pages.runs()) == [(0, 1), (63, 2), (500, 3), (999, 1)]
    assert 501 in pages and 503 not in pages and -1 not in pages and 1000 not in pages
    with pytest.raises(ValueError):
        pages.add(1000)


def test_page_set_union_and_ranges() -> None:
    a = PageSet.from_pages(300_000, [1, 299_999])
    b = PageSet(300_000)
    b.add_range(100, 200)  # crosses whole bytes and words
    a |= b
    assert len(a) == 202
    assert list(a.runs()) == [(1, 1), (100, 200), (299_999, 1)]
    assert list(a)[:3] == [1, 100, 101]
    with pytest.raises(ValueError):
        a |= PageSet(10)
    full = PageSet.full(130)
    assert len(full) == 130 and list(full.runs()) == [(0, 130)]


def test_page_set_runs_match_its_pages() -> None:
    """Runs (found a run of set bits at a time) cover exactly the pages, maximal and
    ascending, wherever they start and end inside a word."""
    rng = random.Random(13)
    for _ in range(200):
        size = rng.randint(1, 3000)
        pages = PageSet(size)
        for _ in range(rng.randint(0, 40)):
            first = rng.randrange(size)
            pages.add_range(first, min(rng.randint(1, 150), size - first))
        expected: list[tuple[int, int]] = []
        for page in pages:
            if expected and sum(expected[-1]) == page:
                expected[-1] = (expected[-1][0], expected[-1][1] + 1)
            else:
                expected.append((page, 1))
        assert list(pages.runs()) == expected


def test_page_set_or_bitmap_at_an_unaligned_page() -> None:
    pages = PageSet(100)
    # bit 0 and bit 9 of the bitmap, placed at page 3: pages 3 and 12; a bit past the
    # end of the set is dropped.
    pages.or_bitmap((1 | 1 << 9 | 1 << 120).to_bytes(16, "little"), 3)
    assert list(pages) == [3, 12]


# -- avmm's own marks ----------------------------------------------------------------------


def test_marks_translate_guest_addresses_to_memfd_pages() -> None:
    regions = (MemoryRegion(0, 8 * PAGE_SIZE, 0),
               MemoryRegion(0x1_0000_0000, 8 * PAGE_SIZE, 8 * PAGE_SIZE))
    marks = DirtyMarks(regions, 16)
    marks.mark(PAGE_SIZE - 1, 2)              # pages 0 and 1
    marks.mark(0x1_0000_0000 + 3 * PAGE_SIZE, 1)  # high RAM page 3: memfd page 11
    marks.mark(0x9000_0000, 16)               # not RAM: ignored
    marks.mark(5 * PAGE_SIZE, 0)              # nothing written
    assert list(PageSet.from_bitmap(marks.take(), 16)) == [0, 1, 11]
    assert not PageSet.from_bitmap(marks.take(), 16)


@pytest.mark.parametrize("kind", ["bytearray", "memfd"])
def test_memory_writes_mark_while_a_marker_is_set(kind: str) -> None:
    memory: ByteArrayMemory | GuestMemory = (
        ByteArrayMemory(16 * PAGE_SIZE) if kind == "bytearray" else GuestMemory(16 * PAGE_SIZE))
    memory.write(0, b"x")  # no marker: nothing happens
    marks = DirtyMarks(memory.regions, 16)
    memory.dirty = marks
    memory.write(2 * PAGE_SIZE + 10, b"abc")
    memory.write_u8(3 * PAGE_SIZE, 1)
    memory.write_u16(4 * PAGE_SIZE, 2)
    memory.write_u32(5 * PAGE_SIZE, 3)
    memory.write_u64(6 * PAGE_SIZE, 4)
    memory.mark_dirty(8 * PAGE_SIZE - 1, 2)
    memory.read(10 * PAGE_SIZE, 100)  # reads mark nothing
    memory.write_u16(11 * PAGE_SIZE + 1, 5)  # unaligned: GuestMemory's other path
    assert list(PageSet.from_bitmap(marks.take(), 16)) == [2, 3, 4, 5, 6, 7, 8, 11]
    if isinstance(memory, GuestMemory):
        memory.close()


# -- KVM's log, through DirtyLog -------------------------------------------------------------


@pytest.mark.kvm
def test_kvm_log_sees_guest_writes_and_collect_clears(cleanup: ExitStack) -> None:
    guest = guest_writing(cleanup, [1, 5, 40])
    log = DirtyLog(guest.vm, guest.memory, slots=enumerate(guest.memory.regions))
    log.start()
    cleanup.callback(log.stop)
    run_once(guest)
    assert data_pages(log.collect()) == {1, 5, 40}
    # Collected and cleared: nothing new was written since.
    assert data_pages(log.collect()) == set()
    run_once(guest)
    assert data_pages(log.collect()) == {1, 5, 40}


@pytest.mark.kvm
def test_collect_merges_own_marks_and_sources(cleanup: ExitStack) -> None:
    guest = guest_writing(cleanup, [2])
    with DirtyLog(guest.vm, guest.memory, slots=enumerate(guest.memory.regions)) as log:
        pages = log.pages
        calls = []

        def source() -> PageSet:
            calls.append(1)
            return PageSet.from_pages(pages, [DATA_AREA // PAGE_SIZE + 30])

        log.add_source(source)
        run_once(guest)
        guest.memory.write(DATA_AREA + 20 * PAGE_SIZE, b"from avmm")
        assert data_pages(log.collect()) == {2, 20, 30}
        assert calls == [1]


@pytest.mark.kvm
def test_stop_turns_logging_off(cleanup: ExitStack) -> None:
    guest = guest_writing(cleanup, [3])
    log = DirtyLog(guest.vm, guest.memory, slots=enumerate(guest.memory.regions))
    log.start()
    with pytest.raises(DirtyLogError):
        log.start()
    log.stop()
    assert guest.memory.dirty is None
    # KVM has no log for a slot without KVM_MEM_LOG_DIRTY_PAGES.
    with pytest.raises(KvmError):
        guest.vm.get_dirty_log(0, guest.memory.size // PAGE_SIZE)
    with pytest.raises(DirtyLogError):
        log.collect()
    log.stop()  # idempotent
    # And it can start again, seeing only what was written after.
    run_once(guest)
    log.start()
    cleanup.callback(log.stop)
    assert data_pages(log.collect()) == set()
    run_once(guest)
    assert data_pages(log.collect()) == {3}


@pytest.mark.kvm
def test_one_log_per_memory(cleanup: ExitStack) -> None:
    guest = guest_writing(cleanup, [0])
    slots = list(enumerate(guest.memory.regions))
    with (DirtyLog(guest.vm, guest.memory, slots=slots),
          pytest.raises(DirtyLogError, match="another dirty log")):
        DirtyLog(guest.vm, guest.memory, slots=slots).start()


@pytest.mark.kvm
def test_odd_slot_layout_numbers_pages_by_memfd_offset(cleanup: ExitStack) -> None:
    """RAM split into three KVM slots at page boundaries that are not byte-aligned in a
    bitmap (3 pages, 761 pages, the rest), registered out of order: every guest write
    still lands on its memfd page."""
    guest = guest_writing(cleanup, [0, 1, 63])
    memory = guest.memory
    size = memory.size
    cut1 = DATA_AREA + PAGE_SIZE  # page 1 of the area starts slot 7
    cut2 = cut1 + 3 * PAGE_SIZE + 0x2D9 * PAGE_SIZE
    layout = {7: MemoryRegion(cut1, cut2 - cut1, cut1),
              2: MemoryRegion(0, cut1, 0),
              5: MemoryRegion(cut2, size - cut2, cut2)}
    guest.vm.set_user_memory_region(0, 0, 0, memory.host_base)  # delete avmm's slot 0
    for slot, region in layout.items():
        guest.vm.set_user_memory_region(slot, region.guest_address, region.size,
                                        memory.host_base + region.file_offset)
    with DirtyLog(guest.vm, memory, slots=layout.items()) as log:
        run_once(guest)
        assert data_pages(log.collect()) == {0, 1, 63}


@pytest.mark.parametrize("layout, message", [
    ([(0, MemoryRegion(0, 4 * MIB, 0)), (0, MemoryRegion(4 * MIB, 4 * MIB, 4 * MIB))],
     "given twice"),
    ([(0, MemoryRegion(0, 4 * MIB, 0)), (1, MemoryRegion(2 * MIB, 6 * MIB, 2 * MIB))],
     "overlaps"),
    ([(0, MemoryRegion(0, 4 * MIB + 1, 0))], "whole pages"),
    ([(0, MemoryRegion(0, 16 * MIB, 0))], "past the end"),
    ([(0, MemoryRegion(PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE))], "not at memfd offset"),
    ([(-1, MemoryRegion(0, PAGE_SIZE, 0))], "slot number"),
    ([], "no memory slot"),
])
def test_hostile_slot_layouts_are_refused(layout: list[tuple[int, MemoryRegion]],
                                          message: str) -> None:
    with GuestMemory(8 * MIB) as memory, pytest.raises(DirtyLogError, match=message):
        DirtyLog(None, memory, slots=layout)  # type: ignore[arg-type]


def test_marks_from_many_threads_are_each_collected_once_at_least() -> None:
    """Device threads mark while another thread takes the marks: every page marked
    shows up in some take (none falls between a take and the next)."""
    import threading

    pages = 4096
    marks = DirtyMarks((MemoryRegion(0, pages * PAGE_SIZE, 0),), pages)
    collected = PageSet(pages)
    stop = threading.Event()

    def marker(first: int) -> None:
        # Each thread marks its own pages, several to a bitmap byte with the others'.
        for page in range(first, pages, 4):
            marks.mark(page * PAGE_SIZE, 1)

    def taker() -> None:
        while not stop.is_set():
            collected.or_bitmap(marks.take())

    taking = threading.Thread(target=taker)
    taking.start()
    markers = [threading.Thread(target=marker, args=(first,)) for first in range(4)]
    for thread in markers:
        thread.start()
    for thread in markers:
        thread.join()
    stop.set()
    taking.join()
    collected.or_bitmap(marks.take())
    assert len(collected) == pages
