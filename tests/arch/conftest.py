"""Image builders for the x86 platform tests: a fake bzImage and ELF files.

The fake bzImage has a valid setup header and a payload of recognisable bytes, so the
loader can be exercised without the Debian kernel; ELF files are either assembled by the
same construct declarations the parser uses (for malformed variants) or built with gcc.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from avmm.arch.x86.bzimage import SETUP_HEADER_OFFSET, SetupHeader
from avmm.arch.x86.elf import (
    ELF64_HEADER_SIZE,
    ELF64_PHDR_SIZE,
    Elf64Header,
    Elf64ProgramHeader,
)

FAKE_SETUP_SECTS = 4
FAKE_VERSION_STRING = b"6.99.0-fake (avmm tests) #1"


def build_fake_bzimage(payload: bytes = b"", **overrides: Any) -> bytes:
    """A bzImage: 5 sectors of setup with a 2.15 header, then ``payload`` (16-aligned)."""
    if not payload:
        payload = bytes(range(256)) * 64  # 16 KiB
    setup_size = (FAKE_SETUP_SECTS + 1) * 512
    fields: dict[str, Any] = {sub.name: 0 for sub in SetupHeader.subcons if sub.name}
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
    header = SetupHeader.build(fields)
    image[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(header)] = header
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
        phdrs += Elf64ProgramHeader.build(
            {
                "p_type": 1,
                "p_flags": 7,
                "p_offset": offset + len(body),
                "p_vaddr": (paddr + 0xFFFF_FFFF_8000_0000) & (2**64 - 1),
                "p_paddr": paddr,
                "p_filesz": len(data),
                "p_memsz": memsz,
                "p_align": 0x1000,
            }
        )
        body += data
    if notes:
        phdrs += Elf64ProgramHeader.build(
            {
                "p_type": 4,
                "p_flags": 4,
                "p_offset": offset + len(body),
                "p_vaddr": 0,
                "p_paddr": 0,
                "p_filesz": len(notes),
                "p_memsz": len(notes),
                "p_align": 4,
            }
        )
        body += notes
    identity = {"ei_class": 2, "ei_data": 1, "ei_version": 1, "ei_osabi": 0, "ei_abiversion": 0}
    identity.update(ident or {})
    header = Elf64Header.build(
        {
            "e_ident": {"magic": b"\x7fELF", **identity},
            "e_type": e_type,
            "e_machine": e_machine,
            "e_version": 1,
            "e_entry": entry,
            "e_phoff": ELF64_HEADER_SIZE,
            "e_shoff": 0,
            "e_flags": 0,
            "e_ehsize": ELF64_HEADER_SIZE,
            "e_phentsize": ELF64_PHDR_SIZE,
            "e_phnum": phnum,
            "e_shentsize": 64,
            "e_shnum": 0,
            "e_shstrndx": 0,
        }
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
