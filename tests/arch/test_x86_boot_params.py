"""The zero page and the e820 map."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmm.arch.x86.boot_params import (
    E820_RAM,
    E820_RESERVED,
    ZeroPage,
    build_e820,
    build_zero_page,
    minimal_setup_header,
    parse_zero_page,
)
from avmm.arch.x86.bzimage import SETUP_HEADER_OFFSET, SETUP_HEADER_SIZE, parse_bzimage
from avmm.arch.x86.layout import CMDLINE_ADDRESS, CMDLINE_MAX_SIZE
from avmm.errors import BootError
from avmm.memory import GIB, MIB, GuestMemory, plan_regions

MakeBzImage = Callable[..., bytes]


def u32(page: bytes, offset: int) -> int:
    return int.from_bytes(page[offset:offset + 4], "little")


def test_zero_page_is_one_page() -> None:
    assert ZeroPage.sizeof() == 4096


def test_fields_land_at_documented_offsets(make_bzimage: MakeBzImage) -> None:
    image = parse_bzimage(make_bzimage())
    page = build_zero_page(
        setup_header=image.header_bytes,
        e820=build_e820(plan_regions(128 * MIB)),
        cmdline_address=0x1_2345_6000,
        initrd_address=0x2_0000_3000,
        initrd_size=0x3_0000_0400,
    )
    assert len(page) == 4096
    assert page[0x202:0x206] == b"HdrS"  # header magic
    assert page[0x1FE:0x200] == b"\x55\xaa"  # boot flag
    assert page[0x210] == 0xFF  # type_of_loader
    assert page[0x211] & 0x80  # loadflags: CAN_USE_HEAP
    assert not page[0x211] & 0x40  # loadflags: KEEP_SEGMENTS
    assert page[0x224:0x226] == (0xFE00).to_bytes(2, "little")  # heap_end_ptr
    assert page[0x1FA:0x1FC] == b"\xff\xff"  # vid_mode
    assert u32(page, 0x228) == 0x2345_6000  # cmd_line_ptr
    assert u32(page, 0x0C8) == 0x1  # ext_cmd_line_ptr
    assert u32(page, 0x218) == 0x3000  # ramdisk_image
    assert u32(page, 0x0C0) == 0x2  # ext_ramdisk_image
    assert u32(page, 0x21C) == 0x400  # ramdisk_size
    assert u32(page, 0x0C4) == 0x3  # ext_ramdisk_size
    assert u32(page, 0x238) == 2047  # cmdline_size: the kernel's, kept
    assert page[0x1E8] == 4  # e820_entries
    assert page[0x1EF] == 0  # sentinel
    first = page[0x2D0:0x2D0 + 20]
    assert first == (0).to_bytes(8, "little") + (0x9FC00).to_bytes(8, "little") + b"\1\0\0\0"
    last = page[0x2D0 + 3 * 20:0x2D0 + 4 * 20]
    assert last[:8] == (MIB).to_bytes(8, "little")
    assert page[0x2D0 + 4 * 20:] == bytes(4096 - 0x2D0 - 4 * 20)


@pytest.mark.debian_kernel
def test_zero_page_copies_the_debian_header(debian_kernel: Path) -> None:
    data = debian_kernel.read_bytes()
    image = parse_bzimage(data)
    page = build_zero_page(
        setup_header=image.header_bytes,
        e820=build_e820(plan_regions(512 * MIB)),
        cmdline_address=CMDLINE_ADDRESS,
    )
    loader_owned = {0x1FA, 0x1FB, 0x210, 0x211, 0x224, 0x225, *range(0x218, 0x220),
                    *range(0x228, 0x22C)}
    end = data[0x201] + 0x202
    for offset in range(SETUP_HEADER_OFFSET, end):
        if offset not in loader_owned:
            assert page[offset] == data[offset], f"zero page byte 0x{offset:x} differs"
    parsed = parse_zero_page(page)
    assert parsed.hdr.cmd_line_ptr == CMDLINE_ADDRESS
    assert parsed.hdr.cmdline_size == image.cmdline_size
    assert parsed.hdr.init_size == image.init_size
    assert parsed.hdr.loadflags == (data[0x211] | 0x80) & ~0x40
    assert parsed.hdr.ramdisk_image == 0 and parsed.hdr.ramdisk_size == 0
    assert page[0x1F1 + SETUP_HEADER_SIZE:0x290] == bytes(0x290 - 0x1F1 - SETUP_HEADER_SIZE)


def test_minimal_header_for_elf() -> None:
    header = minimal_setup_header()
    assert len(header) == SETUP_HEADER_SIZE
    page = build_zero_page(
        setup_header=header, e820=build_e820(plan_regions(64 * MIB)), cmdline_address=0x20000
    )
    parsed = parse_zero_page(page)
    assert parsed.hdr.header == b"HdrS"
    assert parsed.hdr.boot_flag == 0xAA55
    assert parsed.hdr.version >= 0x020C
    assert parsed.hdr.cmdline_size == CMDLINE_MAX_SIZE - 1
    assert parsed.hdr.type_of_loader == 0xFF


def test_bad_inputs() -> None:
    e820 = build_e820(plan_regions(64 * MIB))
    with pytest.raises(BootError, match="setup header must be"):
        build_zero_page(setup_header=b"short", e820=e820, cmdline_address=0)
    with pytest.raises(BootError, match="129 e820 entries"):
        build_zero_page(
            setup_header=minimal_setup_header(), e820=(list(e820) * 33)[:129], cmdline_address=0
        )


def _expected_e820(size: int) -> list[tuple[int, int, int]]:
    low = min(size, 3 * GIB)
    entries = [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x400, E820_RESERVED),
        (0xF0000, 0x10000, E820_RESERVED),
        (MIB, low - MIB, E820_RAM),
    ]
    if size > low:
        entries.append((4 * GIB, size - low, E820_RAM))
    return entries


@pytest.mark.parametrize("size", [64 * MIB, 512 * MIB, 3 * GIB + 512 * MIB])
def test_e820_matches_guest_memory(size: int) -> None:
    with GuestMemory(size) as memory:
        e820 = build_e820(memory.regions)
        assert [(e.address, e.size, e.type) for e in e820] == _expected_e820(size)
        # Every byte reported as RAM is really guest RAM.
        for entry in e820:
            if entry.type == E820_RAM:
                assert memory.contains(entry.address, entry.size)
        assert sum(e.size for e in e820 if e.type == E820_RAM) == size - (MIB - 0x9FC00)
    assert len(e820) == (5 if size > 3 * GIB else 4)


@given(pages=st.integers(min_value=(2 * MIB) // 4096, max_value=(64 * GIB) // 4096))
def test_e820_is_sorted_disjoint_and_covers_ram(pages: int) -> None:
    regions = plan_regions(pages * 4096)
    e820 = build_e820(regions)
    for before, after in itertools.pairwise(e820):
        assert before.end <= after.address
    ram = [e for e in e820 if e.type == E820_RAM]
    assert all(any(r.contains(e.address, e.size) for r in regions) for e in ram)
    # Only the 384 KiB legacy area between the EBDA and 1 MiB is not reported as RAM.
    assert sum(e.size for e in ram) == pages * 4096 - (MIB - 0x9FC00)


def test_acpi_rsdp_addr_lands_at_0x070() -> None:
    page = build_zero_page(setup_header=minimal_setup_header(),
                           e820=build_e820(plan_regions(64 * MIB)), cmdline_address=0,
                           acpi_rsdp_address=0xE0000)
    assert int.from_bytes(page[0x070:0x078], "little") == 0xE0000
    assert parse_zero_page(page).acpi_rsdp_addr == 0xE0000
    without = build_zero_page(setup_header=minimal_setup_header(),
                              e820=build_e820(plan_regions(64 * MIB)), cmdline_address=0)
    assert without[0x070:0x078] == bytes(8)


def test_e820_reserves_the_acpi_area() -> None:
    e820 = build_e820(plan_regions(64 * MIB), firmware_start=0xE0000)
    assert [(e.address, e.size, e.type) for e in e820] == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x400, E820_RESERVED),
        (0xE0000, 0x20000, E820_RESERVED),
        (MIB, 63 * MIB, E820_RAM),
    ]
    with pytest.raises(ValueError, match="firmware_start"):
        build_e820(plan_regions(64 * MIB), firmware_start=0x90000)


def test_a_cached_zero_page_is_built_afresh_for_other_inputs() -> None:
    """Zero pages are cached per process (every VM of a config asks for the same one):
    each input is part of the key, so a page is never one built for other inputs."""
    e820 = build_e820(plan_regions(64 * MIB))
    header = minimal_setup_header()
    first = build_zero_page(setup_header=header, e820=list(e820), cmdline_address=0x20000)
    assert build_zero_page(setup_header=bytearray(header), e820=e820,
                           cmdline_address=0x20000) == first
    smaller = build_e820(plan_regions(32 * MIB))
    variants = {
        "cmdline": build_zero_page(setup_header=header, e820=e820, cmdline_address=0x30000),
        "e820": build_zero_page(setup_header=header, e820=smaller, cmdline_address=0x20000),
        "initrd": build_zero_page(setup_header=header, e820=e820, cmdline_address=0x20000,
                                  initrd_address=0x100000, initrd_size=4096),
        "acpi": build_zero_page(setup_header=header, e820=e820, cmdline_address=0x20000,
                                acpi_rsdp_address=0xE0000),
    }
    assert u32(variants["cmdline"], 0x228) == 0x30000
    table = parse_zero_page(variants["e820"]).e820_table
    assert [(e.addr, e.size) for e in table[:len(smaller)]] == [
        (e.address, e.size) for e in smaller]
    assert u32(variants["initrd"], 0x21C) == 4096
    assert u32(variants["acpi"], 0x070) == 0xE0000
    assert all(page != first for page in variants.values())
