"""load_kernel with bzImages (fake and Debian's), command lines, initrd placement."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmm.arch.x86.acpi import ACPI_TABLES_ADDRESS, build_acpi_tables
from avmm.arch.x86.boot_cpu import (
    BOOT_CR0,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
)
from avmm.arch.x86.boot_params import E820_RESERVED, parse_zero_page
from avmm.arch.x86.bzimage import parse_bzimage
from avmm.arch.x86.gdt import (
    BOOT_CODE_SELECTOR,
    BOOT_DATA_SELECTOR,
    BOOT_TSS_SELECTOR,
    boot_gdt,
    decode_segment,
)
from avmm.arch.x86.layout import (
    BOOT_GDT_ADDRESS,
    CMDLINE_ADDRESS,
    CMDLINE_MAX_SIZE,
    PML4_ADDRESS,
    ZERO_PAGE_ADDRESS,
)
from avmm.arch.x86.loader import load_kernel, place_initrd
from avmm.arch.x86.pagetables import translate
from avmm.errors import BootError
from avmm.memory import GIB, MIB, GuestMemory

MakeBzImage = Callable[..., bytes]


def test_fake_bzimage_boot_state(make_bzimage: MakeBzImage) -> None:
    payload = bytes(range(256)) * 16
    with GuestMemory(64 * MIB) as memory:
        load = load_kernel(memory, make_bzimage(payload), cmdline="console=ttyS0 quiet")
        cpu = load.cpu

        assert load.kind == "bzimage"
        assert memory.read(0x100000, len(payload)) == payload
        assert cpu.rip == 0x100200 == load.entry
        assert cpu.rsi == ZERO_PAGE_ADDRESS
        assert cpu.rflags == 0x2
        assert cpu.cr0 == BOOT_CR0 and cpu.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
        assert cpu.cr4 & CR4_PAE
        assert cpu.efer == EFER_LME | EFER_LMA
        assert cpu.cr3 == PML4_ADDRESS
        assert cpu.code.selector == BOOT_CODE_SELECTOR and cpu.code.l
        assert cpu.data.selector == BOOT_DATA_SELECTOR
        assert cpu.tss.selector == BOOT_TSS_SELECTOR and cpu.tss.type == 11
        assert not cpu.ldt.present
        assert cpu.gdt.base == BOOT_GDT_ADDRESS and cpu.gdt.limit == len(boot_gdt()) - 1
        assert cpu.idt.limit == 0
        # What the CPU state points at is really in guest memory.
        gdt = memory.read(cpu.gdt.base, cpu.gdt.limit + 1)
        for segment in (cpu.code, cpu.data, cpu.tss):
            assert decode_segment(gdt[segment.selector:], segment.selector) == segment
        for address in (cpu.rip, cpu.rsi, cpu.rsp - 8, CMDLINE_ADDRESS, 0x1000000):
            assert translate(memory, cpu.cr3, address) == address
        assert memory.read(CMDLINE_ADDRESS, 20) == b"console=ttyS0 quiet\0"
        zero_page = parse_zero_page(memory.read(ZERO_PAGE_ADDRESS, 4096))
        assert zero_page.hdr.cmd_line_ptr == CMDLINE_ADDRESS
        assert zero_page.e820_entries == 4
        assert load.kernel_range == (0x100000, 0x100000 + len(payload))
        assert load.kernel_footprint == (0x100000, 0x1800000)
        assert load.log_fields()["kernel"] == f"0x100000..0x{0x100000 + len(payload):x}"


@pytest.mark.debian_kernel
@pytest.mark.parametrize("size", [512 * MIB, 3 * GIB + 512 * MIB])
def test_debian_kernel_loads(debian_kernel: Path, size: int) -> None:
    image = parse_bzimage(debian_kernel.read_bytes())
    with GuestMemory(size) as memory:
        load = load_kernel(
            memory, debian_kernel, cmdline="console=ttyS0 panic=-1", initrd=b"\x07" * (3 * MIB)
        )
        assert load.kind == "bzimage"
        assert load.version == image.version_string
        assert memory.read(0x100000, 4096) == image.payload[:4096]
        assert load.initrd_range is not None
        start, end = load.initrd_range
        assert start % 4096 == 0
        assert start >= image.runtime_range()[1]
        ceiling = min(image.initrd_addr_max + 1, 3 * GIB, size)
        assert end <= ceiling
        # As high as possible: less than a page below the ceiling (2 GiB with 3.5 GiB RAM:
        # initrd_addr_max is 0x7fffffff).
        assert ceiling - end < 4096
        zero_page = parse_zero_page(memory.read(ZERO_PAGE_ADDRESS, 4096))
        assert zero_page.hdr.ramdisk_image == start
        assert zero_page.hdr.ramdisk_size == 3 * MIB
        assert zero_page.hdr.cmdline_size == image.cmdline_size
        assert zero_page.e820_entries == (5 if size > 3 * GIB else 4)


@pytest.mark.debian_kernel
def test_debian_kernel_needs_its_init_size(debian_kernel: Path) -> None:
    image = parse_bzimage(debian_kernel.read_bytes())
    end = image.runtime_range()[1]
    with GuestMemory(64 * MIB) as memory, pytest.raises(
        BootError,
        match=rf"^{debian_kernel}: the kernel needs RAM up to 0x{end:x} to decompress itself",
    ):
        load_kernel(memory, debian_kernel, cmdline="")


@pytest.mark.debian_kernel
def test_debian_kernel_cmdline_limit(debian_kernel: Path) -> None:
    limit = parse_bzimage(debian_kernel.read_bytes()).cmdline_size
    with GuestMemory(512 * MIB) as memory:
        load_kernel(memory, debian_kernel, cmdline="x" * limit)
        assert memory.read(CMDLINE_ADDRESS + limit, 1) == b"\0"
        with pytest.raises(
            BootError,
            match=rf"command line is {limit + 1} bytes; the kernel accepts at most {limit} "
            rf"\(its cmdline_size\) and avmm reserves room for {CMDLINE_MAX_SIZE - 1}",
        ):
            load_kernel(memory, debian_kernel, cmdline="x" * (limit + 1))


def test_layout_cmdline_limit(make_bzimage: MakeBzImage) -> None:
    kernel = make_bzimage(cmdline_size=1 << 20)
    with GuestMemory(64 * MIB) as memory:
        load_kernel(memory, kernel, cmdline="y" * (CMDLINE_MAX_SIZE - 1))
        with pytest.raises(BootError, match=r"at most 1048576 .* room for 65535"):
            load_kernel(memory, kernel, cmdline="y" * CMDLINE_MAX_SIZE)
        with pytest.raises(BootError, match="NUL"):
            load_kernel(memory, kernel, cmdline="a\0b")


def test_initrd_respects_initrd_addr_max(make_bzimage: MakeBzImage) -> None:
    kernel = make_bzimage(initrd_addr_max=0x3FFF_FFFF)
    with GuestMemory(2 * GIB) as memory:
        load = load_kernel(memory, kernel, cmdline="", initrd=b"\1" * 10000)
        assert load.initrd_range == (0x4000_0000 - 12288, 0x4000_0000 - 12288 + 10000)


def test_initrd_too_big(make_bzimage: MakeBzImage, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\0" * (41 * MIB))
    with GuestMemory(64 * MIB) as memory, pytest.raises(
        BootError,
        match=rf"^{initrd}: 42991616 bytes \(41.0 MiB\) do not fit between the kernel's end "
        r"at 0x1800000 and 0x4000000",
    ):
        load_kernel(memory, make_bzimage(), cmdline="", initrd=initrd)


def test_unreadable_files(make_bzimage: MakeBzImage, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kernel"
    with GuestMemory(64 * MIB) as memory:
        with pytest.raises(BootError, match=rf"^{missing}: cannot read the kernel: No such file"):
            load_kernel(memory, missing, cmdline="")
        with pytest.raises(BootError, match=rf"^{missing}: cannot read the initrd"):
            load_kernel(memory, make_bzimage(), cmdline="", initrd=missing)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "README"
    path.write_bytes(b"hello world\n" * 100)
    with GuestMemory(64 * MIB) as memory, pytest.raises(
        BootError, match=rf"^{path}: unknown kernel format"
    ):
        load_kernel(memory, path, cmdline="")


def test_kernel_larger_than_ram(make_bzimage: MakeBzImage) -> None:
    with GuestMemory(4 * MIB) as memory, pytest.raises(
        BootError, match=r"end at 0x500000, past the end of RAM \(0x400000\)"
    ):
        load_kernel(memory, make_bzimage(b"\x90" * (4 * MIB)), cmdline="")


def test_empty_initrd(make_bzimage: MakeBzImage) -> None:
    with GuestMemory(64 * MIB) as memory, pytest.raises(BootError, match="initrd is empty"):
        load_kernel(memory, make_bzimage(), cmdline="", initrd=b"")


@given(
    size=st.integers(1, 256 * MIB),
    ram_end=st.integers(16, 3 * 1024).map(lambda mib: mib * MIB),
    addr_max=st.sampled_from([0x37FF_FFFF, 0x7FFF_FFFF, 0xFFFF_FFFF]),
    kernel_end=st.integers(0x100000, 128 * MIB),
)
def test_place_initrd_rules(size: int, ram_end: int, addr_max: int, kernel_end: int) -> None:
    try:
        start = place_initrd(
            size, low_ram_end=ram_end, initrd_addr_max=addr_max, kernel_end=kernel_end
        )
    except BootError:
        # Refused only when no page-aligned slot exists.
        ceiling = min(ram_end, addr_max + 1)
        assert ((ceiling - size) & ~0xFFF) < -(-kernel_end // 4096) * 4096
        return
    assert start % 4096 == 0
    assert start >= kernel_end
    assert start + size <= ram_end
    assert start + size - 1 <= addr_max
    # Highest possible: one page higher would not fit.
    assert start + 4096 + size > min(ram_end, addr_max + 1)


@pytest.mark.parametrize("kind", ["bzimage", "elf"])
def test_acpi_tables_are_written_and_announced(
    make_bzimage: MakeBzImage, tmp_path: Path, kind: str
) -> None:
    tables = build_acpi_tables(vcpus=2, virtio_devices=[(0xD000_0000, 0x1000, 5)])
    kernel: bytes | Path = make_bzimage()
    if kind == "elf":
        from tests.vm.helpers import tiny_elf

        kernel = tiny_elf(tmp_path / "k.elf", b"\xf4")
    with GuestMemory(64 * MIB) as memory:
        load = load_kernel(memory, kernel, cmdline="", acpi=tables)
        assert load.kind == kind
        assert memory.read(ACPI_TABLES_ADDRESS, len(tables.blob)) == tables.blob
        assert memory.read(0xE0000, 8) == b"RSD PTR "
        zero_page = parse_zero_page(memory.read(ZERO_PAGE_ADDRESS, 4096))
        assert zero_page.acpi_rsdp_addr == tables.rsdp_address == 0xE0000
        reserved = [(e.address, e.end) for e in load.e820 if e.type == E820_RESERVED]
        assert (0xE0000, MIB) in reserved
        assert load.acpi_rsdp_address == 0xE0000
        assert load.log_fields()["acpi_rsdp"] == "0xe0000"


def test_no_acpi_tables_by_default(make_bzimage: MakeBzImage) -> None:
    with GuestMemory(64 * MIB) as memory:
        load = load_kernel(memory, make_bzimage(), cmdline="")
        assert memory.read(0xE0000, 8) == bytes(8)
        assert parse_zero_page(memory.read(ZERO_PAGE_ADDRESS, 4096)).acpi_rsdp_addr == 0
        reserved = [(e.address, e.end) for e in load.e820 if e.type == E820_RESERVED]
        assert (0xF0000, MIB) in reserved and load.acpi_rsdp_address is None


def test_acpi_tables_outside_the_firmware_area(make_bzimage: MakeBzImage) -> None:
    tables = build_acpi_tables(vcpus=1, virtio_devices=[], base_address=0x8000)
    with GuestMemory(64 * MIB) as memory, pytest.raises(BootError, match="firmware area"):
        load_kernel(memory, make_bzimage(), cmdline="", acpi=tables)
