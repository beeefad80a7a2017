"""Pages on both ends of the stream (no KVM): a batch read from guest RAM and stored on
the other side gives the same RAM, zero pages included — a page zeroed after an earlier
round carried data is zeroed on the destination too, across the MMIO hole's regions."""

from __future__ import annotations

import os

from avmm.memory import ByteArrayMemory, MemoryRegion
from avmm.migration.pages import PageMap
from avmm.migration.stream import MAX_BATCH_PAGES, build_pages, parse_pages

PAGE = 4096


class TwoRegions(ByteArrayMemory):
    """RAM in two regions whose guest addresses are not their file offsets."""

    def __init__(self, pages: int) -> None:
        super().__init__(pages * PAGE)
        half = pages // 2 * PAGE
        self.regions = (MemoryRegion(0, half, 0), MemoryRegion(1 << 32, half, half))

    def view(self, address: int, length: int) -> memoryview:
        for region in self.regions:
            if region.contains(address, length):
                offset = region.file_offset + address - region.guest_address
                return memoryview(self.data)[offset:offset + length]
        raise AssertionError(hex(address))


def send(source: PageMap, destination: PageMap, pages: list[int]) -> None:
    for batch in source.batches(pages, MAX_BATCH_PAGES):
        payload = build_pages(batch, source.read_batch(batch))
        parsed = parse_pages(payload, destination.total)
        destination.write_batch(parsed.numbers, parsed.kinds, parsed.data)


def test_rounds_of_pages_make_the_same_ram() -> None:
    pages = 1024
    ram, copy = TwoRegions(pages), TwoRegions(pages)
    source, destination = PageMap(ram), PageMap(copy)
    ram.data[5 * PAGE:9 * PAGE] = os.urandom(4 * PAGE)
    ram.data[600 * PAGE:601 * PAGE] = os.urandom(PAGE)
    send(source, destination, list(range(pages)))
    assert copy.data == ram.data
    # A later round: one page zeroed, one rewritten, one written for the first time.
    ram.data[6 * PAGE:7 * PAGE] = bytes(PAGE)
    ram.data[600 * PAGE:601 * PAGE] = os.urandom(PAGE)
    ram.data[1000 * PAGE:1001 * PAGE] = os.urandom(PAGE)
    send(source, destination, [6, 600, 1000])
    assert copy.data == ram.data
    # A whole zeroed run that had data.
    ram.data[0:16 * PAGE] = bytes(16 * PAGE)
    send(source, destination, list(range(16)))
    assert copy.data == ram.data
