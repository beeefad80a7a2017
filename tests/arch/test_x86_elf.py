"""ELF kernels: parsing, the PVH note, loading by p_paddr, and malformed images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from avmm.arch.x86.boot_params import parse_zero_page
from avmm.arch.x86.elf import parse_elf
from avmm.arch.x86.layout import BOOT_STACK_TOP, CMDLINE_ADDRESS, ZERO_PAGE_ADDRESS
from avmm.arch.x86.loader import load_kernel
from avmm.errors import BootError
from avmm.memory import GIB, MIB, GuestMemory

MakeElf = Callable[..., bytes]
MakeNote = Callable[[bytes, int, bytes], bytes]


def test_gcc_elf_parses(gcc_elf: Path) -> None:
    image = parse_elf(gcc_elf.read_bytes())
    assert image.entry == 0x100000
    assert [(s.paddr, s.memsz) for s in image.segments] == [(0x100000, 0x18), (0x200000, 0x2008)]
    assert image.pvh_entry == 0x100003  # pvh_start: after "hlt; jmp _start"
    assert any(n.name == b"Xen" and n.type == 18 for n in image.notes)
    assert image.image_range() == (0x100000, 0x202008)


def test_gcc_elf_loads_by_paddr(gcc_elf: Path) -> None:
    with GuestMemory(16 * MIB) as memory:
        # Dirty the .bss range first: the loader must zero it, not trust fresh memory.
        memory.write(0x200000, b"\xee" * 0x3000)
        load = load_kernel(memory, gcc_elf, cmdline="console=ttyS0", initrd=b"I" * 5000)

        assert load.kind == "elf"
        assert load.entry == load.cpu.rip == 0x100000
        assert load.pvh_entry == 0x100003
        assert load.cpu.rsi == ZERO_PAGE_ADDRESS
        assert load.cpu.rsp == BOOT_STACK_TOP
        assert memory.read(0x100000, 4) == b"\xf4\xeb\xfd\xf4"  # hlt; jmp; hlt
        assert memory.read_u64(0x200000) == 0x1122334455667788  # .data at its LMA
        assert memory.read(0x200008, 0x2000) == bytes(0x2000)  # .bss zeroed
        assert memory.read_u8(0x20_2008) == 0xEE  # and not one byte more
        assert memory.read(0x300000, 8) == bytes(8)  # nothing at the VMA

        zero_page = parse_zero_page(memory.read(ZERO_PAGE_ADDRESS, 4096))
        assert zero_page.hdr.header == b"HdrS"
        assert zero_page.hdr.cmd_line_ptr == CMDLINE_ADDRESS
        assert memory.read(CMDLINE_ADDRESS, 14) == b"console=ttyS0\0"
        assert load.initrd_range is not None
        start, end = load.initrd_range
        assert zero_page.hdr.ramdisk_image == start and end - start == 5000
        assert end <= 16 * MIB and start % 4096 == 0
        assert memory.read(start, 5000) == b"I" * 5000


def test_constructed_elf_with_pvh_note(make_elf: MakeElf, make_note: MakeNote) -> None:
    notes = make_note(b"GNU", 3, b"\x01" * 20) + make_note(b"Xen", 18, (0x1000123).to_bytes(4,
                                                                                    "little"))
    data = make_elf([(0x1000000, b"\xcc" * 100, 0x2000)], entry=0x1000010, notes=notes)
    image = parse_elf(data)
    assert image.pvh_entry == 0x1000123
    assert [n.name for n in image.notes] == [b"GNU", b"Xen"]
    with GuestMemory(64 * MIB) as memory:
        load = load_kernel(memory, data, cmdline="")
        assert load.cpu.rip == 0x1000010
        assert load.kernel_range == (0x1000000, 0x1002000)
        assert memory.read(0x1000000, 101) == b"\xcc" * 100 + b"\0"


def test_no_pvh_note(make_elf: MakeElf) -> None:
    assert parse_elf(make_elf([(0x100000, b"\x90", 1)], entry=0x100000)).pvh_entry is None


def test_segment_in_high_memory(make_elf: MakeElf) -> None:
    data = make_elf([(0x100000, b"\xf4", 1), (4 * GIB + 0x1000, b"high", 4)], entry=0x100000)
    with GuestMemory(3 * GIB + 16 * MIB) as memory:
        load_kernel(memory, data, cmdline="")
        assert memory.read(4 * GIB + 0x1000, 4) == b"high"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ident": {"ei_class": 1}}, r"ELF32 image; avmm boots 64-bit \(ELFCLASS64\) kernels only"),
        ({"ident": {"ei_data": 2}}, r"not little-endian"),
        ({"e_machine": 3}, r"e_machine 3 is not x86-64"),
        ({"e_type": 3}, r"e_type 3 is not ET_EXEC"),
        ({"entry": 0x500000}, r"entry point 0x500000 is not inside any PT_LOAD segment"),
    ],
)
def test_malformed_elf(make_elf: MakeElf, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"entry": 0x100000, **kwargs}
    data = make_elf([(0x100000, b"\x90" * 16, 16)], **args)
    with pytest.raises(BootError, match=r"^kernel image: " + message):
        parse_elf(data)


def test_truncated_elf(make_elf: MakeElf, tmp_path: Path) -> None:
    data = make_elf([(0x100000, b"\x90" * 4096, 4096)], entry=0x100000)
    path = tmp_path / "vmlinux"
    path.write_bytes(data[:-100])
    with GuestMemory(16 * MIB) as memory, pytest.raises(
        BootError, match=rf"^{path}: truncated: program header 0 needs file bytes"
    ):
        load_kernel(memory, path, cmdline="")
    with pytest.raises(BootError, match="too short for an ELF64 header"):
        parse_elf(data[:40])
    with pytest.raises(BootError, match="truncated: program headers end at 0x78"):
        parse_elf(data[:100])


def test_filesz_larger_than_memsz(make_elf: MakeElf) -> None:
    with pytest.raises(BootError, match="p_filesz 0x10 > p_memsz 0x8"):
        parse_elf(make_elf([(0x100000, b"\x90" * 16, 8)], entry=0x100000))


def test_segment_outside_ram(make_elf: MakeElf, tmp_path: Path) -> None:
    path = tmp_path / "big.elf"
    path.write_bytes(make_elf([(0x100000, b"\x90", 32 * MIB)], entry=0x100000))
    with GuestMemory(16 * MIB) as memory:
        before = memory.read(0, 2 * MIB)
        with pytest.raises(
            BootError,
            match=rf"^{path}: PT_LOAD segment 0 at 0x100000..0x2100000 is outside guest RAM "
            r"\(0x0..0x1000000\)",
        ):
            load_kernel(memory, path, cmdline="")
        assert memory.read(0, 2 * MIB) == before  # nothing written on failure


def test_segment_in_the_mmio_hole(make_elf: MakeElf) -> None:
    data = make_elf([(0x100000, b"\x90", 1), (0xFEC00000, b"x", 1)], entry=0x100000)
    with GuestMemory(3 * GIB + 16 * MIB) as memory, pytest.raises(
        BootError, match=r"segment 1 at 0xfec00000..0xfec00001 is outside guest RAM"
    ):
        load_kernel(memory, data, cmdline="")


def test_segment_below_1mib(make_elf: MakeElf) -> None:
    data = make_elf([(0x8000, b"\x90", 1)], entry=0x8000)
    with GuestMemory(16 * MIB) as memory, pytest.raises(
        BootError, match=r"segment 0 at 0x8000..0x8001 lies below 1 MiB"
    ):
        load_kernel(memory, data, cmdline="")


def test_entry_above_4g(make_elf: MakeElf) -> None:
    data = make_elf([(0x100000, b"\x90", 1), (4 * GIB, b"\x90", 1)], entry=4 * GIB)
    with GuestMemory(3 * GIB + 16 * MIB) as memory, pytest.raises(
        BootError, match=r"entry point 0x100000000 is above 4 GiB"
    ):
        load_kernel(memory, data, cmdline="")


def test_malformed_note(make_elf: MakeElf) -> None:
    bad_note = (4).to_bytes(4, "little") + (1000).to_bytes(4, "little") + bytes(12)
    with pytest.raises(BootError, match="malformed ELF note"):
        parse_elf(make_elf([(0x100000, b"\x90", 1)], entry=0x100000, notes=bad_note))
