"""Image builders for the x86 platform tests: a fake bzImage and ELF files.

The fake bzImage has a valid setup header and a payload of recognisable bytes, so the
loader can be exercised without the Debian kernel; ELF files are either packed here field
by field (for malformed variants) or built with gcc. Both builders write each field at
the offset the spec gives (Documentation/arch/x86/boot.rst, the System V gABI), not
through the parser's own declarations, so that a wrong offset in the parser shows.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

#: struct setup_header fields: image offset and struct code, from boot.rst's table.
SETUP_HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "setup_sects": (0x1F1, "B"), "root_flags": (0x1F2, "H"), "syssize": (0x1F4, "I"),
    "ram_size": (0x1F8, "H"), "vid_mode": (0x1FA, "H"), "root_dev": (0x1FC, "H"),
    "boot_flag": (0x1FE, "H"), "jump": (0x200, "H"), "header": (0x202, "4s"),
    "version": (0x206, "H"), "realmode_swtch": (0x208, "I"), "start_sys_seg": (0x20C, "H"),
    "kernel_version": (0x20E, "H"), "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"), "setup_move_size": (0x212, "H"),
    "code32_start": (0x214, "I"), "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"), "bootsect_kludge": (0x220, "I"),
    "heap_end_ptr": (0x224, "H"), "ext_loader_ver": (0x226, "B"),
    "ext_loader_type": (0x227, "B"), "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"), "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"), "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"), "cmdline_size": (0x238, "I"),
    "hardware_subarch": (0x23C, "I"), "hardware_subarch_data": (0x240, "Q"),
    "payload_offset": (0x248, "I"), "payload_length": (0x24C, "I"),
    "setup_data": (0x250, "Q"), "pref_address": (0x258, "Q"), "init_size": (0x260, "I"),
    "handover_offset": (0x264, "I"), "kernel_info_offset": (0x268, "I"),
}
ELF64_HEADER_SIZE = 64
ELF64_PHDR_SIZE = 56
#: Elf64_Ehdr: e_ident (magic, class, data, version, osabi, abiversion, 7 pad), e_type,
#: e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize,
#: e_phnum, e_shentsize, e_shnum, e_shstrndx.
ELF64_HEADER = struct.Struct("<4s5B7xHHIQQQIHHHHHH")
#: Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
ELF64_PHDR = struct.Struct("<IIQQQQQQ")

FAKE_SETUP_SECTS = 4
FAKE_VERSION_STRING = b"6.99.0-fake (avmm tests) #1"


def build_fake_bzimage(payload: bytes = b"", **overrides: Any) -> bytes:
    """A bzImage: 5 sectors of setup with a 2.15 header, then ``payload`` (16-aligned)."""
    if not payload:
        payload = bytes(range(256)) * 64  # 16 KiB
    setup_size = (FAKE_SETUP_SECTS + 1) * 512
    fields: dict[str, Any] = dict.fromkeys(SETUP_HEADER_FIELDS, 0)
    fields.update(
        setup_sects=FAKE_SETUP_SECTS,
        syssize=-(-len(payload) // 16),
        boot_flag=0xAA55,
        jump=0xEB | (0x6A << 8),  # short jmp to 0x26c: the header ends there
        header=b"HdrS",
        version=0x020F,
        kernel_version=0x800 - 0x200,
        loadflags=0x01,
        code32_start=0x100000,
        initrd_addr_max=0x7FFF_FFFF,
        kernel_alignment=0x200000,
        relocatable_kernel=1,
        min_alignment=21,
        xloadflags=0x3,
        cmdline_size=2047,
        pref_address=0x1000000,
        init_size=0x800000,
    )
    fields.update(overrides)
    image = bytearray(setup_size)
    for name, value in fields.items():
        offset, code = SETUP_HEADER_FIELDS[name]
        struct.pack_into("<" + code, image, offset, value)
    image[0x800:0x800 + len(FAKE_VERSION_STRING)] = FAKE_VERSION_STRING
    padded = payload + bytes(-len(payload) % 16)
    return bytes(image) + padded


def build_elf(
    segments: Sequence[tuple[int, bytes, int]],
    *,
    entry: int,
    ident: dict[str, int] | None = None,
    e_type: int = 2,
    e_machine: int = 62,
    notes: bytes = b"",
) -> bytes:
    """An ELF64 file with one PT_LOAD per ``(paddr, data, memsz)`` and an optional
    PT_NOTE holding ``notes`` (already encoded). vaddr = paddr + 0xffffffff80000000,
    like a kernel, so that tests catch a loader that uses p_vaddr."""
    phnum = len(segments) + (1 if notes else 0)
    offset = ELF64_HEADER_SIZE + phnum * ELF64_PHDR_SIZE
    phdrs = b""
    body = b""
    for paddr, data, memsz in segments:
        vaddr = (paddr + 0xFFFF_FFFF_8000_0000) & (2**64 - 1)
        phdrs += ELF64_PHDR.pack(1, 7, offset + len(body), vaddr, paddr, len(data), memsz,
                                 0x1000)
        body += data
    if notes:
        phdrs += ELF64_PHDR.pack(4, 4, offset + len(body), 0, 0, len(notes), len(notes), 4)
        body += notes
    identity = {"ei_class": 2, "ei_data": 1, "ei_version": 1, "ei_osabi": 0, "ei_abiversion": 0}
    identity.update(ident or {})
    header = ELF64_HEADER.pack(
        b"\x7fELF", identity["ei_class"], identity["ei_data"], identity["ei_version"],
        identity["ei_osabi"], identity["ei_abiversion"],
        e_type, e_machine, 1, entry, ELF64_HEADER_SIZE, 0, 0,
        ELF64_HEADER_SIZE, ELF64_PHDR_SIZE, phnum, 64, 0, 0,
    )
    return header + phdrs + body


def encode_note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """One ELF note, name and descriptor NUL-terminated/padded to 4 bytes."""
    name_z = name + b"\0"
    return (
        len(name_z).to_bytes(4, "little")
        + len(desc).to_bytes(4, "little")
        + note_type.to_bytes(4, "little")
        + name_z
        + bytes(-len(name_z) % 4)
        + desc
        + bytes(-len(desc) % 4)
    )


GUEST_ASM = r"""
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18              /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4

    .text
    .globl _start
_start:
    hlt
    jmp _start
pvh_start:
    hlt

    .data
    .globl marker
marker:
    .quad 0x1122334455667788

    .bss
scratch:
    .skip 8192

    .section .note.GNU-stack, "", @progbits
"""

# .text at 1 MiB; .data linked at 0x300000 but loaded at 0x200000, so that p_vaddr and
# p_paddr differ and a loader that uses the wrong one is caught.
GUEST_LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); data PT_LOAD FLAGS(6); note PT_NOTE FLAGS(4); }
SECTIONS {
  . = 0x100000;
  .text : { *(.text*) } :text
  .note.Xen : { *(.note.Xen) } :text :note
  . = 0x300000;
  .data : AT(0x200000) { *(.data*) } :data
  .bss : { *(.bss*) } :data
  /DISCARD/ : { *(.note.gnu*) *(.comment) }
}
"""


@pytest.fixture(scope="session")
def gcc_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny static x86-64 ELF built with gcc: .text at 1 MiB, a PVH note pointing at
    ``pvh_start``, .data loaded at 0x200000 (linked at 0x300000), 8 KiB of .bss."""
    work = tmp_path_factory.mktemp("elf")
    (work / "guest.S").write_text(GUEST_ASM)
    (work / "guest.lds").write_text(GUEST_LDS)
    output = work / "guest.elf"
    subprocess.run(
        [
            "gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
            "-Wl,-T," + str(work / "guest.lds"), "-o", str(output), str(work / "guest.S"),
        ],
        check=True,
        capture_output=True,
    )
    return output


@pytest.fixture
def make_bzimage() -> Callable[..., bytes]:
    return build_fake_bzimage


@pytest.fixture
def make_elf() -> Callable[..., bytes]:
    return build_elf


@pytest.fixture
def make_note() -> Callable[[bytes, int, bytes], bytes]:
    return encode_note
