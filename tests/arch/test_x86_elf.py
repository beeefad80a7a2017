"""ELF kernels: parsing, the PVH note, loading by p_paddr, and malformed images."""

from __future__ import annotations

import struct
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


# -- hostile images: every size and offset read from the file is checked against it ------

#: Elf64_Ehdr / Elf64_Phdr field offsets (System V gABI).
E_PHOFF, E_PHENTSIZE, E_PHNUM = 0x20, 0x36, 0x38
P_OFFSET, P_PADDR, P_FILESZ, P_MEMSZ = 0x08, 0x18, 0x20, 0x28
PHDR = struct.Struct("<IIQQQQQQ")


def _patched(data: bytes, offset: int, code: str, value: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into("<" + code, patched, offset, value)
    return bytes(patched)


def _independent_segments(data: bytes) -> list[tuple[int, bytes, int]]:
    """``(p_paddr, file bytes, p_memsz)`` of each non-empty PT_LOAD, read with the gABI's
    offsets directly (not with avmm's declarations)."""
    phoff, = struct.unpack_from("<Q", data, E_PHOFF)
    phnum, = struct.unpack_from("<H", data, E_PHNUM)
    segments = []
    for index in range(phnum):
        p_type, _, offset, _, paddr, filesz, memsz, _ = PHDR.unpack_from(data, phoff + 56 * index)
        if p_type == 1 and memsz:
            segments.append((paddr, data[offset:offset + filesz], memsz))
    return segments


@pytest.mark.guest
def test_real_elf_files_parse_as_the_gabi_reads_them(gcc_elf: Path, test_guest: Path) -> None:
    for path in (gcc_elf, test_guest):
        data = path.read_bytes()
        image = parse_elf(data, name=str(path))
        assert image.entry == struct.unpack_from("<Q", data, 0x18)[0]
        assert [(s.paddr, s.data, s.memsz) for s in image.segments] == _independent_segments(data)


@pytest.mark.parametrize(
    ("field", "code", "value", "message"),
    [
        (E_PHOFF, "Q", 1 << 63, r"truncated: program headers end at 0x8000000000000038"),
        (E_PHOFF, "Q", 0x1000, r"truncated: program headers end at 0x1038"),
        (E_PHNUM, "H", 0xFFFF, r"truncated: program headers end at 0x380008"),
        (E_PHNUM, "H", 0, r"no program headers"),
        (E_PHENTSIZE, "H", 32, r"e_phentsize 32, expected 56"),
        (0x40 + P_OFFSET, "Q", (1 << 64) - 1, r"truncated: program header 0 needs file bytes"),
        (0x40 + P_FILESZ, "Q", 1 << 40, r"truncated: program header 0 needs file bytes"),
        (0x40 + P_PADDR, "Q", (1 << 64) - 8, r"segment 0 wraps around the address space"),
        (0x40 + P_MEMSZ, "Q", 0, r"segment 0: p_filesz 0x10 > p_memsz 0x0"),
    ],
)
def test_hostile_header_fields(make_elf: MakeElf, field: int, code: str, value: int,
                               message: str) -> None:
    data = _patched(make_elf([(0x100000, b"\x90" * 16, 16)], entry=0x100000), field, code, value)
    with pytest.raises(BootError, match=r"^hostile: " + message):
        parse_elf(data, name="hostile")


def _note_header(namesz: int, descsz: int, note_type: int = 18) -> bytes:
    return struct.pack("<III", namesz, descsz, note_type)


@pytest.mark.parametrize(
    "notes",
    [
        _note_header(0xFFFF_FFFF, 0) + b"Xen\0",  # name runs past the segment
        _note_header(4, 0xFFFF_FFFF) + b"Xen\0",  # descriptor runs past the segment
        _note_header(4, 4) + b"Xen\0" + b"\x01\x02",  # descriptor cut short
        _note_header(3, 0) + b"Xen",  # the name's padding is missing
        _note_header(4, 3) + b"Xen\0" + b"abc",  # the descriptor's padding is missing
    ],
)
def test_hostile_notes_are_refused(make_elf: MakeElf, notes: bytes) -> None:
    data = make_elf([(0x100000, b"\x90", 1)], entry=0x100000, notes=notes)
    with pytest.raises(BootError, match=r"^kernel image: malformed ELF note at segment offset 0$"):
        parse_elf(data)


def test_notes_are_read_by_their_sizes(make_elf: MakeElf, make_note: MakeNote) -> None:
    # Odd name and descriptor sizes, two notes, then alignment padding shorter than a note
    # header (ignored). An 8-byte PVH descriptor is accepted too.
    notes = (make_note(b"GNU", 1, b"abcde") + make_note(b"Xen", 18, (0x100000).to_bytes(8,
                                                                                       "little"))
             + bytes(8))
    image = parse_elf(make_elf([(0x100000, b"\x90", 1)], entry=0x100000, notes=notes))
    assert [(n.name, n.type, n.desc) for n in image.notes] == [
        (b"GNU", 1, b"abcde"), (b"Xen", 18, (0x100000).to_bytes(8, "little"))]
    assert image.pvh_entry == 0x100000
    # A second note starts after the first one's padded name and descriptor.
    second = make_note(b"Xen", 18, (0x100004).to_bytes(4, "little"))
    image = parse_elf(make_elf([(0x100000, b"\x90", 1)], entry=0x100000,
                               notes=make_note(b"A", 7, b"xyz") + second))
    assert image.pvh_entry == 0x100004
