"""ELF64 kernels (an uncompressed ``vmlinux`` or avmm's own test guest).

avmm loads every ``PT_LOAD`` segment at its physical address (``p_paddr``), zero-fills
``p_memsz - p_filesz`` and enters the image in 64-bit mode at ``e_entry`` with the zero page
in RSI, the way a bzImage's 64-bit entry is used. A Xen PVH entry note
(``XEN_ELFNOTE_PHYS32_ENTRY``), if present, is reported but not used: it is a 32-bit
entry point for a different start-of-day contract (``hvm_start_info``).

Structures follow the System V gABI and the x86-64 psABI; little-endian only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..._packed import Packed
from ...errors import BootError

ELF_MAGIC: Final = b"\x7fELF"
ELFCLASS64: Final = 2
ELFDATA2LSB: Final = 1
EV_CURRENT: Final = 1
ET_EXEC: Final = 2
EM_X86_64: Final = 62
PT_LOAD: Final = 1
PT_NOTE: Final = 4
XEN_ELFNOTE_PHYS32_ENTRY: Final = 18

# struct, not construct: the kernel is parsed on ``avmm up``'s way to the guest's first
# byte (see ._packed).
Elf64Header = Packed(
    ("e_ident", Packed(
        ("magic", "4s"),
        ("ei_class", "B"),
        ("ei_data", "B"),
        ("ei_version", "B"),
        ("ei_osabi", "B"),
        ("ei_abiversion", "B"),
        ("", "7x"),
    )),
    ("e_type", "H"),
    ("e_machine", "H"),
    ("e_version", "I"),
    ("e_entry", "Q"),
    ("e_phoff", "Q"),
    ("e_shoff", "Q"),
    ("e_flags", "I"),
    ("e_ehsize", "H"),
    ("e_phentsize", "H"),
    ("e_phnum", "H"),
    ("e_shentsize", "H"),
    ("e_shnum", "H"),
    ("e_shstrndx", "H"),
)
ELF64_HEADER_SIZE: Final = Elf64Header.size  # 64

Elf64ProgramHeader = Packed(
    ("p_type", "I"),
    ("p_flags", "I"),
    ("p_offset", "Q"),
    ("p_vaddr", "Q"),
    ("p_paddr", "Q"),
    ("p_filesz", "Q"),
    ("p_memsz", "Q"),
    ("p_align", "Q"),
)
ELF64_PHDR_SIZE: Final = Elf64ProgramHeader.size  # 56

#: The fixed part of one note. The name and the descriptor follow, each padded to 4
#: bytes (the x86-64 Linux and Xen convention; SHT_NOTE alignment 8 only changes the
#: start of the section).
ElfNoteHeader = Packed(
    ("n_namesz", "I"),
    ("n_descsz", "I"),
    ("n_type", "I"),
)
ELF_NOTE_HEADER_SIZE: Final = ElfNoteHeader.size  # 12


@dataclass(frozen=True)
class ElfSegment:
    """One ``PT_LOAD`` segment: ``filesz`` bytes from the file at ``paddr``, then zeros
    up to ``memsz``."""

    paddr: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfNote64:
    name: bytes  # without the terminating NUL
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    """A parsed, validated x86-64 executable ELF.

    ``segments`` are the non-empty ``PT_LOAD`` segments in file order. ``pvh_entry`` is
    the address from a ``Xen``/``XEN_ELFNOTE_PHYS32_ENTRY`` note, or None.
    """

    entry: int
    segments: tuple[ElfSegment, ...]
    notes: tuple[ElfNote64, ...]
    pvh_entry: int | None

    def image_range(self) -> tuple[int, int]:
        """``[lowest paddr, highest paddr + memsz)`` over all segments."""
        return (
            min(segment.paddr for segment in self.segments),
            max(segment.end for segment in self.segments),
        )


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes, *, name: str = "kernel image") -> ElfImage:
    """Parse and validate an ELF64 x86-64 ``ET_EXEC`` image.

    Checks only what is needed to load it safely: the identity fields, that every program
    header and segment lies inside the file, ``p_filesz <= p_memsz``, no address overflow,
    and that ``e_entry`` falls inside a loaded segment. Whether the segments fit the
    guest's RAM is the loader's question. ``name`` prefixes every error message.

    :raises BootError: with a message that says which check failed.
    """
    if len(data) < ELF64_HEADER_SIZE:
        raise BootError(f"{name}: {len(data)} bytes is too short for an ELF64 header (64 bytes)")
    header = Elf64Header.parse(data)
    ident = header.e_ident
    if ident.magic != ELF_MAGIC:
        raise BootError(f"{name}: not an ELF file (magic {ident.magic!r})")
    if ident.ei_class != ELFCLASS64:
        kind = "ELF32" if ident.ei_class == 1 else f"EI_CLASS {ident.ei_class}"
        raise BootError(f"{name}: {kind} image; avmm boots 64-bit (ELFCLASS64) kernels only")
    if ident.ei_data != ELFDATA2LSB:
        raise BootError(f"{name}: not little-endian (EI_DATA {ident.ei_data})")
    if ident.ei_version != EV_CURRENT:
        raise BootError(f"{name}: unknown ELF version {ident.ei_version}")
    if header.e_machine != EM_X86_64:
        raise BootError(f"{name}: e_machine {header.e_machine} is not x86-64 (62)")
    if header.e_type != ET_EXEC:
        raise BootError(
            f"{name}: e_type {header.e_type} is not ET_EXEC (2); "
            "a kernel must be a static, position-dependent executable"
        )
    if header.e_phnum == 0:
        raise BootError(f"{name}: no program headers")
    if header.e_phentsize != ELF64_PHDR_SIZE:
        raise BootError(f"{name}: e_phentsize {header.e_phentsize}, expected {ELF64_PHDR_SIZE}")
    table_end = header.e_phoff + header.e_phnum * ELF64_PHDR_SIZE
    if table_end > len(data):
        raise BootError(
            f"{name}: truncated: program headers end at 0x{table_end:x}, "
            f"the file is 0x{len(data):x} bytes"
        )

    segments: list[ElfSegment] = []
    notes: list[ElfNote64] = []
    for index in range(header.e_phnum):
        offset = header.e_phoff + index * ELF64_PHDR_SIZE
        phdr = Elf64ProgramHeader.parse(data, offset)
        if phdr.p_type not in (PT_LOAD, PT_NOTE):
            continue
        if phdr.p_offset + phdr.p_filesz > len(data):
            raise BootError(
                f"{name}: truncated: program header {index} needs file bytes "
                f"0x{phdr.p_offset:x}..0x{phdr.p_offset + phdr.p_filesz:x}, "
                f"the file is 0x{len(data):x} bytes"
            )
        contents = data[phdr.p_offset:phdr.p_offset + phdr.p_filesz]
        if phdr.p_type == PT_NOTE:
            notes.extend(_parse_notes(contents, name=name))
            continue
        if phdr.p_filesz > phdr.p_memsz:
            raise BootError(
                f"{name}: segment {index}: p_filesz 0x{phdr.p_filesz:x} > "
                f"p_memsz 0x{phdr.p_memsz:x}"
            )
        if phdr.p_paddr + phdr.p_memsz > 1 << 64:
            raise BootError(f"{name}: segment {index} wraps around the address space")
        if phdr.p_memsz == 0:
            continue
        segments.append(ElfSegment(paddr=phdr.p_paddr, data=bytes(contents), memsz=phdr.p_memsz))

    if not segments:
        raise BootError(f"{name}: no PT_LOAD segment with contents")
    if not any(s.paddr <= header.e_entry < s.end for s in segments):
        raise BootError(
            f"{name}: entry point 0x{header.e_entry:x} is not inside any PT_LOAD segment "
            "(avmm enters at e_entry as a physical address)"
        )
    return ElfImage(
        entry=header.e_entry,
        segments=tuple(segments),
        notes=tuple(notes),
        pvh_entry=_pvh_entry(notes),
    )


def _parse_notes(blob: bytes, *, name: str) -> list[ElfNote64]:
    notes: list[ElfNote64] = []
    offset = 0
    # A note segment may end with alignment padding shorter than a note header.
    while len(blob) - offset >= ELF_NOTE_HEADER_SIZE:
        note = ElfNoteHeader.parse(blob, offset)
        name_start = offset + ELF_NOTE_HEADER_SIZE
        desc_start = name_start + note.n_namesz + (-note.n_namesz % 4)
        end = desc_start + note.n_descsz + (-note.n_descsz % 4)
        # The sizes come from the file: name, descriptor and both paddings must all lie
        # inside the segment.
        if end > len(blob):
            raise BootError(f"{name}: malformed ELF note at segment offset {offset}")
        notes.append(ElfNote64(
            name=blob[name_start:name_start + note.n_namesz].rstrip(b"\0"),
            type=note.n_type,
            desc=blob[desc_start:desc_start + note.n_descsz],
        ))
        offset = end
    return notes


def _pvh_entry(notes: list[ElfNote64]) -> int | None:
    for note in notes:
        # Linux emits a 4-byte value; accept an 8-byte one as well.
        is_pvh = note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY
        if is_pvh and len(note.desc) in (4, 8):
            return int.from_bytes(note.desc, "little")
    return None
