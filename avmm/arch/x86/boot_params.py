"""The zero page (``struct boot_params``) and the e820 memory map.

The zero page is 4 KiB handed to the kernel in RSI. avmm fills only what a boot loader
that skips the real-mode setup code must: a copy of the kernel's setup header at 0x1f1
with the loader-owned fields set, the command line and initrd location, and the e820
table. Everything else stays zero, which the kernel reads as "no such firmware data".

Offsets follow Documentation/arch/x86/zero-page.rst; :data:`ZeroPage` declares them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ..._packed import Fields, Packed
from ...errors import BootError
from ...memory import MemoryRegion
from .bzimage import (
    BOOT_FLAG,
    CAN_USE_HEAP,
    KEEP_SEGMENTS,
    SETUP_HEADER_MAGIC,
    SETUP_HEADER_SIZE,
    SetupHeader,
)
from .layout import (
    BIOS_ROM_START,
    CMDLINE_MAX_SIZE,
    EBDA_START,
    HIGH_MEMORY_START,
    LOW_MEMORY_END,
    ZERO_PAGE_SIZE,
)

E820_RAM: Final = 1
E820_RESERVED: Final = 2
#: Slots in the zero page's e820 table; longer maps would need a setup_data entry.
E820_MAX_ENTRIES: Final = 128

#: boot_params.hdr.type_of_loader: 0xff = "undefined", the value for loaders without an
#: assigned ID.
TYPE_OF_LOADER_UNDEFINED: Final = 0xFF
#: boot_params.hdr.vid_mode: "normal" VGA text mode, i.e. do not ask the setup code to
#: change modes (it never runs under avmm anyway).
VID_MODE_NORMAL: Final = 0xFFFF
#: boot_params.hdr.heap_end_ptr: end of the real-mode setup heap, as an offset from the
#: real-mode code minus 0x200. Only the real-mode setup code (which avmm skips) uses the
#: heap; the value is the conventional top of a 64 KiB setup segment.
HEAP_END_PTR: Final = 0xFE00
#: The protocol version avmm writes into the minimal header it gives ELF kernels: 2.12,
#: the first with xloadflags and the 64-bit entry, which is how avmm enters them.
ELF_HEADER_VERSION: Final = 0x020C

# struct, not construct: the zero page is built on ``avmm up``'s way to the guest's first
# byte (see ._packed).
E820EntryStruct = Packed(
    ("addr", "Q"),
    ("size", "Q"),
    ("type", "I"),
)

ZeroPage = Packed(
    ("screen_info", "64s"),  # 0x000
    ("apm_bios_info", "20s"),  # 0x040
    ("", "4x"),
    ("tboot_addr", "Q"),  # 0x058
    ("ist_info", "16s"),  # 0x060
    ("acpi_rsdp_addr", "Q"),  # 0x070
    ("", "8x"),
    ("hd0_info", "16s"),  # 0x080
    ("hd1_info", "16s"),  # 0x090
    ("sys_desc_table", "16s"),  # 0x0a0
    ("olpc_ofw_header", "16s"),  # 0x0b0
    ("ext_ramdisk_image", "I"),  # 0x0c0
    ("ext_ramdisk_size", "I"),  # 0x0c4
    ("ext_cmd_line_ptr", "I"),  # 0x0c8
    ("", f"{0x13C - 0xCC}x"),
    ("cc_blob_address", "I"),  # 0x13c
    ("edid_info", "128s"),  # 0x140
    ("efi_info", "32s"),  # 0x1c0
    ("alt_mem_k", "I"),  # 0x1e0
    ("scratch", "I"),  # 0x1e4
    ("e820_entries", "B"),  # 0x1e8
    ("eddbuf_entries", "B"),  # 0x1e9
    ("edd_mbr_sig_buf_entries", "B"),  # 0x1ea
    ("kbd_status", "B"),  # 0x1eb
    ("secure_boot", "B"),  # 0x1ec
    ("", "2x"),
    ("sentinel", "B"),  # 0x1ef, must be 0 or the kernel zeroes fields it trusts
    ("", "1x"),
    ("hdr", SetupHeader),  # 0x1f1 .. 0x26c
    ("", f"{0x290 - 0x1F1 - SETUP_HEADER_SIZE}x"),
    ("edd_mbr_sig_buffer", "64s"),  # 0x290
    ("e820_table", E820EntryStruct, E820_MAX_ENTRIES),  # 0x2d0
    ("", f"{0xD00 - 0xCD0}x"),
    ("eddbuf", f"{0x1EC}s"),  # 0xd00
    ("", f"{ZERO_PAGE_SIZE - 0xEEC}x"),
)


@dataclass(frozen=True)
class E820Entry:
    """One e820 range: ``[address, address + size)`` of ``type`` (E820_RAM, ...)."""

    address: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.address + self.size


def build_e820(
    regions: Iterable[MemoryRegion], *, firmware_start: int = BIOS_ROM_START
) -> tuple[E820Entry, ...]:
    """The e820 map for guest RAM laid out as ``regions`` (``GuestMemory.regions``).

    RAM below 1 MiB is reported only up to the EBDA (0x9fc00); the EBDA and the firmware
    area ``[firmware_start, 1 MiB)`` are reserved, so that the guest neither allocates
    them nor misses tables placed there; the rest of the VGA/option-ROM hole is left
    out. ``firmware_start`` is the BIOS ROM area (0xf0000) by default and 0xe0000 when
    avmm writes ACPI tables there (:mod:`.acpi`). Every other byte of every region is
    reported as RAM. Sorted by address.
    """
    if not LOW_MEMORY_END <= firmware_start < HIGH_MEMORY_START:
        raise ValueError(f"firmware_start 0x{firmware_start:x} is not in [0xa0000, 1 MiB)")
    entries: list[E820Entry] = []
    for region in regions:
        start, end = region.guest_address, region.end
        if start < EBDA_START:
            entries.append(E820Entry(start, min(end, EBDA_START) - start, E820_RAM))
        if start < HIGH_MEMORY_START <= end:
            # The region spans the legacy area: describe the firmware ranges in it.
            entries.append(E820Entry(EBDA_START, LOW_MEMORY_END - EBDA_START, E820_RESERVED))
            entries.append(
                E820Entry(firmware_start, HIGH_MEMORY_START - firmware_start, E820_RESERVED)
            )
        ram_start = max(start, HIGH_MEMORY_START)
        if ram_start < end:
            entries.append(E820Entry(ram_start, end - ram_start, E820_RAM))
    entries.sort(key=lambda entry: entry.address)
    if len(entries) > E820_MAX_ENTRIES:
        raise BootError(f"{len(entries)} e820 entries do not fit the zero page's 128 slots")
    return tuple(entries)


def minimal_setup_header() -> bytes:
    """A setup header for kernels that bring none (ELF): magic, boot flag, version.

    ``cmdline_size`` is avmm's own limit, so that a guest reading it learns the truth.
    """
    return SetupHeader.build(
        boot_flag=BOOT_FLAG,
        header=SETUP_HEADER_MAGIC,
        version=ELF_HEADER_VERSION,
        cmdline_size=CMDLINE_MAX_SIZE - 1,
    )


def build_zero_page(
    *,
    setup_header: bytes,
    e820: Sequence[E820Entry],
    cmdline_address: int,
    initrd_address: int = 0,
    initrd_size: int = 0,
    acpi_rsdp_address: int = 0,
) -> bytes:
    """The 4096-byte zero page.

    ``setup_header`` is the kernel's header bytes from 0x1f1 (``BzImage.header_bytes``)
    or :func:`minimal_setup_header`. The loader-owned fields are overwritten:
    ``type_of_loader`` (0xff), ``loadflags`` (CAN_USE_HEAP set, KEEP_SEGMENTS clear: the
    kernel must reload its segments), ``heap_end_ptr``, ``vid_mode`` (0xffff), the
    command line pointer and the ramdisk fields, each split into a low 32-bit half in the
    header and a high half in the ``ext_`` field. The kernel's own fields
    (``cmdline_size``, ``init_size``, ...) are kept as the kernel wrote them.
    ``acpi_rsdp_address`` (0 = none) goes to ``acpi_rsdp_addr`` (0x070), where kernels
    of boot protocol 2.14+ look before scanning 0xe0000..1 MiB.

    :raises BootError: the header is the wrong size or ``e820`` has over 128 entries.
    """
    # Every VM of a config asks for the same page: build it once.
    return _zero_page(bytes(setup_header), tuple(e820), cmdline_address, initrd_address,
                      initrd_size, acpi_rsdp_address)


@functools.lru_cache(maxsize=32)
def _zero_page(setup_header: bytes, e820: tuple[E820Entry, ...], cmdline_address: int,
               initrd_address: int, initrd_size: int, acpi_rsdp_address: int) -> bytes:
    if len(setup_header) != SETUP_HEADER_SIZE:
        raise BootError(
            f"setup header must be {SETUP_HEADER_SIZE} bytes (0x1f1..0x26c), "
            f"got {len(setup_header)}"
        )
    if len(e820) > E820_MAX_ENTRIES:
        raise BootError(f"{len(e820)} e820 entries do not fit the zero page's 128 slots")
    header = SetupHeader.parse(setup_header)
    header.update(
        type_of_loader=TYPE_OF_LOADER_UNDEFINED,
        loadflags=(header.loadflags | CAN_USE_HEAP) & ~KEEP_SEGMENTS,
        heap_end_ptr=HEAP_END_PTR,
        vid_mode=VID_MODE_NORMAL,
        cmd_line_ptr=cmdline_address & 0xFFFF_FFFF,
        ramdisk_image=initrd_address & 0xFFFF_FFFF,
        ramdisk_size=initrd_size & 0xFFFF_FFFF,
    )
    # Every field left out (firmware data avmm does not provide) is zero.
    return ZeroPage.build(
        acpi_rsdp_addr=acpi_rsdp_address,
        ext_ramdisk_image=initrd_address >> 32,
        ext_ramdisk_size=initrd_size >> 32,
        ext_cmd_line_ptr=cmdline_address >> 32,
        e820_entries=len(e820),
        sentinel=0,
        hdr=header,
        e820_table=[{"addr": e.address, "size": e.size, "type": e.type} for e in e820],
    )


def parse_zero_page(data: bytes) -> Fields:
    """The zero page's fields by name (for tests and diagnostics)."""
    return ZeroPage.parse(data)
