"""Boot page tables: an identity map of the first 4 GiB with 2 MiB pages.

The 64-bit boot protocol requires paging on and the kernel, zero page and command line
identity-mapped; mapping all of [0, 4 GiB) covers every boot structure, any kernel
loaded below 4 GiB and the MMIO hole (the guest replaces these tables early anyway).
Four-level paging: one PML4 entry -> one PDPT with four entries -> four page directories
of 512 2 MiB pages each. Entries are present, writable and supervisor-only; caching is
left to the PAT/MTRR defaults (write-back).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Protocol

from ...errors import AvmmError
from .layout import (
    GIB,
    PAGE_SIZE,
    PD_ADDRESS,
    PD_COUNT,
    PDPT_ADDRESS,
    PML4_ADDRESS,
)

PTE_PRESENT: Final = 1 << 0
PTE_WRITABLE: Final = 1 << 1
PTE_USER: Final = 1 << 2
#: In a PD (or PDPT) entry: maps a large page instead of pointing to a table.
PTE_PAGE_SIZE: Final = 1 << 7
#: Bits 51:12 of an entry hold a physical address.
PTE_ADDRESS_MASK: Final = 0x000F_FFFF_FFFF_F000
LARGE_PAGE_SIZE: Final = 2 << 20
ENTRIES_PER_TABLE: Final = 512


class _Writable(Protocol):
    def write(self, address: int, data: bytes) -> None: ...


class _Readable(Protocol):
    def read(self, address: int, length: int) -> bytes: ...


class PageFault(AvmmError):
    """A boot-page-table walk found a non-present entry (tests and diagnostics only)."""


@functools.cache
def build_identity_map() -> Mapping[int, bytes]:
    """The page-table pages, as ``{guest physical address: 4096 bytes}`` (read-only).

    Pure, and the same for every VM: built once per process (milliseconds of Python
    each time otherwise, on every VM's start); the caller writes them (see
    :func:`write_identity_map`).
    """
    entry = PTE_PRESENT | PTE_WRITABLE
    pml4 = bytearray(PAGE_SIZE)
    pml4[0:8] = (PDPT_ADDRESS | entry).to_bytes(8, "little")
    pdpt = bytearray(PAGE_SIZE)
    pages: dict[int, bytes] = {}
    for gib in range(PD_COUNT):
        pd_address = PD_ADDRESS + gib * PAGE_SIZE
        pdpt[gib * 8:gib * 8 + 8] = (pd_address | entry).to_bytes(8, "little")
        pd = bytearray(PAGE_SIZE)
        for index in range(ENTRIES_PER_TABLE):
            frame = gib * GIB + index * LARGE_PAGE_SIZE
            pd[index * 8:index * 8 + 8] = (frame | entry | PTE_PAGE_SIZE).to_bytes(8, "little")
        pages[pd_address] = bytes(pd)
    pages[PML4_ADDRESS] = bytes(pml4)
    pages[PDPT_ADDRESS] = bytes(pdpt)
    return MappingProxyType(pages)


def write_identity_map(memory: _Writable) -> int:
    """Write the boot page tables into guest memory; return the CR3 value (the PML4)."""
    for address, page in build_identity_map().items():
        memory.write(address, page)
    return PML4_ADDRESS


def translate(memory: _Readable, cr3: int, virtual: int) -> int:
    """Walk 4-level page tables in guest memory and translate ``virtual``.

    Handles 4 KiB, 2 MiB and 1 GiB pages. Meant for tests and diagnostics.

    :raises PageFault: an entry on the way is not present.
    """

    def entry_at(table: int, index: int) -> int:
        return int.from_bytes(memory.read((table & PTE_ADDRESS_MASK) + index * 8, 8), "little")

    table = cr3
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = entry_at(table, (virtual >> shift) & 0x1FF)
        if not entry & PTE_PRESENT:
            raise PageFault(f"0x{virtual:x}: level-{4 - level} entry not present")
        if shift in (30, 21) and entry & PTE_PAGE_SIZE:
            page_mask = (1 << shift) - 1
            return (entry & PTE_ADDRESS_MASK & ~page_mask) | (virtual & page_mask)
        table = entry
    return (table & PTE_ADDRESS_MASK) | (virtual & 0xFFF)
