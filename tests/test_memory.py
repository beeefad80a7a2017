"""Guest memory: region planning around the MMIO hole, bounds-checked access, and the
memfd that really backs it. No KVM needed."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmm.errors import AvmmError, GuestAddressError, GuestMemoryError
from avmm.memory import (
    GIB,
    MIB,
    MMIO_HOLE_END,
    MMIO_HOLE_START,
    PAGE_SIZE,
    GuestMemory,
    MemoryRegion,
    plan_regions,
)

#: RAM below the hole is 3 GiB; this much more continues at 4 GiB. The memfd is sparse,
#: so only the pages a test touches are ever allocated.
SPLIT_SIZE = 3 * GIB + 2 * MIB


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(2 * MIB) as memory:
        yield memory


@pytest.fixture(scope="module")
def split_memory() -> Iterator[GuestMemory]:
    with GuestMemory(SPLIT_SIZE) as memory:
        yield memory


# -- planning ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "regions"),
    [
        (PAGE_SIZE, [MemoryRegion(0, PAGE_SIZE, 0)]),
        (64 * MIB, [MemoryRegion(0, 64 * MIB, 0)]),
        (3 * GIB, [MemoryRegion(0, 3 * GIB, 0)]),
        (3 * GIB + PAGE_SIZE,
         [MemoryRegion(0, 3 * GIB, 0), MemoryRegion(4 * GIB, PAGE_SIZE, 3 * GIB)]),
        (6 * GIB, [MemoryRegion(0, 3 * GIB, 0), MemoryRegion(4 * GIB, 3 * GIB, 3 * GIB)]),
    ],
)
def test_plan_regions(size, regions):
    assert list(plan_regions(size)) == regions


@pytest.mark.parametrize("size", [0, -PAGE_SIZE, 1, PAGE_SIZE - 1, PAGE_SIZE + 1, MIB + 512])
def test_plan_regions_rejects_sizes_not_a_multiple_of_4k(size):
    with pytest.raises(GuestMemoryError, match="multiple of 4 KiB"):
        plan_regions(size)
    with pytest.raises(GuestMemoryError, match=f"got {size}"):
        GuestMemory(size)


@given(pages=st.integers(min_value=1, max_value=(64 * GIB) // PAGE_SIZE))
def test_planned_regions_avoid_the_hole_and_tile_the_memfd(pages):
    size = pages * PAGE_SIZE
    regions = plan_regions(size)
    assert sum(region.size for region in regions) == size
    offset = 0
    for region in regions:
        assert region.file_offset == offset
        offset += region.size
        assert region.end <= MMIO_HOLE_START or region.guest_address >= MMIO_HOLE_END
        assert region.guest_address % PAGE_SIZE == 0
    assert regions[0].guest_address == 0


def test_memory_region_end_and_contains():
    region = MemoryRegion(0x1000, 0x2000, 0)
    assert region.end == 0x3000
    assert region.contains(0x1000)
    assert region.contains(0x1000, 0x2000)
    assert region.contains(0x2FFF)
    assert not region.contains(0x2FFF, 2)
    assert not region.contains(0xFFF)
    assert not region.contains(0x3000)


# -- access --------------------------------------------------------------------------------


def test_read_write_round_trip(memory):
    memory.write(0x1000, b"hello, guest")
    assert memory.read(0x1000, 12) == b"hello, guest"
    memory.write(0x1001, bytearray(b"E"))
    memory.write(0x1002, memoryview(b"LL"))
    assert memory.read(0x1000, 5) == b"hELLo"
    assert memory.read(0x5000, 4) == bytes(4)  # fresh memory is zero


def test_view_is_a_writable_window_without_copy(memory):
    view = memory.view(0x2000, 8)
    assert len(view) == 8
    view[:4] = b"abcd"
    assert memory.read(0x2000, 4) == b"abcd"
    memory.write(0x2004, b"efgh")
    assert bytes(view) == b"abcdefgh"
    view.release()


def test_whole_memory_is_accessible(memory):
    memory.write(0, b"\x01")
    memory.write(memory.size - 1, b"\xff")
    assert memory.read(0, memory.size)[::memory.size - 1] == b"\x01\xff"


@pytest.mark.parametrize(
    ("width", "value"),
    [(1, 0xA5), (2, 0xBEEF), (4, 0xDEAD_BEEF), (8, 0x0123_4567_89AB_CDEF)],
)
def test_integer_helpers_are_little_endian(memory, width, value):
    write = getattr(memory, f"write_u{width * 8}")
    read = getattr(memory, f"read_u{width * 8}")
    write(0x3003, value)
    assert read(0x3003) == value
    assert memory.read(0x3003, width) == value.to_bytes(width, "little")
    assert memory.read_u8(0x3003) == value & 0xFF
    with pytest.raises(OverflowError):
        write(0x3003, 1 << (width * 8))


@pytest.mark.parametrize(
    ("address", "length"),
    [
        (2 * MIB, 1),  # just past the end
        (2 * MIB - 4, 8),  # straddles the end
        (2 * MIB - 1, 2),
        (1 << 40, 1),
        (-1, 1),
        (0, -1),
    ],
)
def test_outside_ram_is_a_guest_address_error(memory, address, length):
    with pytest.raises(GuestAddressError) as caught:
        memory.read(address, length)
    error = caught.value
    assert (error.address, error.length) == (address, length)
    if address >= 0:
        assert f"0x{address:x}" in str(error)
    assert f"({length} bytes)" in str(error)
    assert isinstance(error, GuestMemoryError)
    assert isinstance(error, AvmmError)
    assert not memory.contains(address, length)


def test_every_access_is_checked(memory):
    end = memory.size
    for access in (
        lambda: memory.write(end - 2, b"abcd"),
        lambda: memory.view(end, 1),
        lambda: memory.read_u16(end - 1),
        lambda: memory.read_u64(end - 4),
        lambda: memory.write_u32(end - 3, 0),
        lambda: memory.write_u64(end, 0),
    ):
        with pytest.raises(GuestAddressError):
            access()
    # a failed write changes nothing
    assert memory.read(end - 2, 2) == b"\0\0"


def test_memory_above_the_hole(split_memory):
    low, high = split_memory.regions
    assert (low.guest_address, low.size) == (0, MMIO_HOLE_START)
    assert (high.guest_address, high.size, high.file_offset) == (
        MMIO_HOLE_END, 2 * MIB, MMIO_HOLE_START)
    split_memory.write(MMIO_HOLE_START - 4, b"low!")
    split_memory.write(MMIO_HOLE_END, b"high")
    split_memory.write(MMIO_HOLE_END + 2 * MIB - 4, b"end!")
    assert split_memory.read(MMIO_HOLE_START - 4, 4) == b"low!"
    assert split_memory.read(MMIO_HOLE_END, 4) == b"high"
    assert split_memory.region_for(MMIO_HOLE_END + 5, 8) == high
    assert split_memory.region_for(5, 8) == low


@pytest.mark.parametrize(
    ("address", "length"),
    [
        (MMIO_HOLE_START - 4, 8),  # runs from RAM into the hole
        (MMIO_HOLE_START, 1),  # inside the hole
        (0xFEE0_0000, 4),
        (MMIO_HOLE_END - 1, 2),  # runs from the hole into RAM above it
        (MMIO_HOLE_START - 4, MMIO_HOLE_END - MMIO_HOLE_START + 8),  # across the hole
        (MMIO_HOLE_END + 2 * MIB - 4, 8),  # past the end of RAM above the hole
    ],
)
def test_accesses_into_or_across_the_hole_are_errors(split_memory, address, length):
    with pytest.raises(GuestAddressError, match=f"0x{address:x}.*\\({length} bytes\\)"):
        split_memory.read(address, length)
    assert not split_memory.contains(address, length)


_BOUNDARIES = [0, MMIO_HOLE_START, MMIO_HOLE_END, MMIO_HOLE_END + 2 * MIB]
_addresses = st.one_of(
    st.integers(min_value=-16, max_value=1 << 34),
    st.sampled_from(_BOUNDARIES).flatmap(
        lambda boundary: st.integers(min_value=boundary - 64, max_value=boundary + 64)),
)
_lengths = st.one_of(st.integers(min_value=1, max_value=128),
                     st.integers(min_value=1, max_value=1 << 33))


@given(address=_addresses, length=_lengths)
def test_contains_agrees_with_the_region_list(split_memory, address, length):
    inside = any(
        region.guest_address <= address and address + length <= region.end
        for region in split_memory.regions
    )
    assert split_memory.contains(address, length) == inside
    # and with the layout itself: below the hole, or above it within the RAM there
    below = address >= 0 and address + length <= MMIO_HOLE_START
    above = address >= MMIO_HOLE_END and address + length <= MMIO_HOLE_END + 2 * MIB
    expected = below or above
    assert inside == expected


# -- the memfd backing ---------------------------------------------------------------------


def test_memfd_backs_the_memory(split_memory):
    low, high = split_memory.regions
    split_memory.write(0x1234, b"in the memfd")
    split_memory.write(MMIO_HOLE_END + 0x10, b"above the hole")
    fd = split_memory.fd
    assert os.pread(fd, 12, low.file_offset + 0x1234) == b"in the memfd"
    assert os.pread(fd, 14, high.file_offset + 0x10) == b"above the hole"
    assert os.fstat(fd).st_size == SPLIT_SIZE
    assert not os.get_inheritable(fd)

    # a second, independent mapping of the fd (as a vhost-user backend would make) sees
    # the same pages, both ways
    with mmap.mmap(fd, SPLIT_SIZE, flags=mmap.MAP_SHARED,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE) as other:
        assert other[0x1234:0x1234 + 12] == b"in the memfd"
        other[high.file_offset + 0x100:high.file_offset + 0x104] = b"back"
    assert split_memory.read(MMIO_HOLE_END + 0x100, 4) == b"back"


def test_host_addresses_point_at_the_mapping(split_memory):
    low, high = split_memory.regions
    assert split_memory.host_address(low) == split_memory.host_base
    assert split_memory.host_address(high) == split_memory.host_base + high.file_offset
    split_memory.write(MMIO_HOLE_END + 0x40, b"via host address")
    assert ctypes.string_at(split_memory.host_address(high) + 0x40, 16) == b"via host address"
    ctypes.memmove(split_memory.host_base + 0x80, b"poke", 4)
    assert split_memory.read(0x80, 4) == b"poke"


# -- lifetime ------------------------------------------------------------------------------


def test_close_is_idempotent_and_closes_the_fd():
    memory = GuestMemory(MIB)
    fd = memory.fd
    os.fstat(fd)
    memory.close()
    memory.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_close_with_a_view_still_held():
    memory = GuestMemory(MIB)
    view = memory.view(0, 16)
    memory.close()  # the mapping goes away with the last view
    view[:4] = b"safe"
    assert bytes(view[:4]) == b"safe"
    view.release()
    memory.close()


def test_context_manager_closes():
    with GuestMemory(MIB) as memory:
        memory.write(0, b"x")
        fd = memory.fd
    with pytest.raises(OSError):
        os.fstat(fd)
