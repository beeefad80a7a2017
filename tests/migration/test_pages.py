"""Pages on both ends of the stream (no KVM): frames read from guest RAM and stored on
the other side give the same RAM, zero pages included — a page zeroed after an earlier
round carried data is zeroed on the destination too, across the MMIO hole's regions.
Consecutive pages travel as runs: one run per stretch of data or of zeros, not one
entry per page."""

from __future__ import annotations

import os

import trio
import trio.testing

from avmm.memory import ByteArrayMemory, MemoryRegion
from avmm.migration.destination import _receive_pages
from avmm.migration.pages import PageMap
from avmm.migration.stream import (
    KIND_DATA,
    KIND_ZERO,
    MAX_FRAME_PAGES,
    Channel,
    Kind,
    build_pages,
    parse_pages,
)

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


def frames_of(source: PageMap, runs: list[tuple[int, int]]) -> list[bytes]:
    """The PAGES payloads the source sends for ``runs``."""
    buffer = memoryview(bytearray(MAX_FRAME_PAGES * PAGE))
    payloads = []
    for frame in source.frames(runs):
        frame_runs, used = source.read_frame(frame, buffer)
        payloads.append(build_pages(frame_runs, bytes(buffer[:used])))
    return payloads


def send(source: PageMap, destination: PageMap, runs: list[tuple[int, int]]) -> int:
    """Send ``runs`` through a stream into ``destination`` the way a destination
    receives PAGES frames; the number of frames it took."""
    payloads = frames_of(source, runs)

    async def main() -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        sender, receiver = Channel(ours), Channel(theirs)
        async with trio.open_nursery() as nursery:
            async def write() -> None:
                for payload in payloads:
                    await sender.send(Kind.PAGES, payload)
            nursery.start_soon(write)
            for _ in payloads:
                kind, length = await receiver.receive_frame_header()
                assert kind is Kind.PAGES
                await _receive_pages(receiver, destination, length)

    trio.run(main)
    return len(payloads)


def test_rounds_of_pages_make_the_same_ram() -> None:
    pages = 1024
    ram, copy = TwoRegions(pages), TwoRegions(pages)
    source, destination = PageMap(ram), PageMap(copy)
    ram.data[5 * PAGE:9 * PAGE] = os.urandom(4 * PAGE)
    ram.data[600 * PAGE:601 * PAGE] = os.urandom(PAGE)
    send(source, destination, [(0, pages)])
    assert copy.data == ram.data
    # A later round: one page zeroed, one rewritten, one written for the first time.
    ram.data[6 * PAGE:7 * PAGE] = bytes(PAGE)
    ram.data[600 * PAGE:601 * PAGE] = os.urandom(PAGE)
    ram.data[1000 * PAGE:1001 * PAGE] = os.urandom(PAGE)
    send(source, destination, [(6, 1), (600, 1), (1000, 1)])
    assert copy.data == ram.data
    # A whole zeroed run that had data.
    ram.data[0:16 * PAGE] = bytes(16 * PAGE)
    send(source, destination, [(0, 16)])
    assert copy.data == ram.data


def test_consecutive_pages_travel_as_runs() -> None:
    """Data pages side by side are one run, zeros between them one zero run; a run is
    split only where a region (the MMIO hole) or a frame ends."""
    pages = 4 * MAX_FRAME_PAGES
    ram = TwoRegions(pages)
    source = PageMap(ram)
    ram.data[10 * PAGE:110 * PAGE] = os.urandom(100 * PAGE)
    ram.data[200 * PAGE:201 * PAGE] = b"\1" * PAGE
    payloads = frames_of(source, [(0, pages)])
    assert len(payloads) == 4
    runs, data = parse_pages(payloads[0], pages)
    assert runs == [(0, 10, KIND_ZERO), (10, 100, KIND_DATA), (110, 90, KIND_ZERO),
                    (200, 1, KIND_DATA), (201, MAX_FRAME_PAGES - 201, KIND_ZERO)]
    assert bytes(data) == bytes(ram.data[10 * PAGE:110 * PAGE] + ram.data[200 * PAGE:201 * PAGE])
    # An untouched frame is one zero run and no data.
    assert parse_pages(payloads[1], pages) == ([(MAX_FRAME_PAGES, MAX_FRAME_PAGES,
                                                 KIND_ZERO)], memoryview(b""))
    # A dirty set's runs across the region boundary (page pages // 2): two pieces.
    frames = list(source.frames([(pages // 2 - 3, 6)]))
    assert frames == [[(pages // 2 - 3, 3), (pages // 2, 3)]]


def test_zeroing_on_the_destination_touches_only_pages_that_held_data() -> None:
    pages = 64
    ram, copy = TwoRegions(pages), TwoRegions(pages)
    source, destination = PageMap(ram), PageMap(copy)
    ram.data[3 * PAGE:5 * PAGE] = os.urandom(2 * PAGE)
    send(source, destination, [(0, pages)])
    copy.data[40 * PAGE] = 7  # stands for a page this side never got data for
    ram.data[:] = bytes(len(ram.data))
    send(source, destination, [(0, pages)])
    assert copy.data[3 * PAGE:5 * PAGE] == bytes(2 * PAGE)
    assert copy.data[40 * PAGE] == 7  # not rewritten: no stream data landed there
