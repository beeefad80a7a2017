"""The boot page tables, walked back out of guest memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.arch.x86.layout import GIB, MIB, PD_ADDRESS, PDPT_ADDRESS, PML4_ADDRESS
from avmm.arch.x86.pagetables import (
    PTE_PRESENT,
    PTE_USER,
    PTE_WRITABLE,
    PageFault,
    translate,
    write_identity_map,
)
from avmm.memory import GuestMemory


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(16 * MIB) as memory:
        memory.write(0, b"\xaa" * 0x10000)  # junk that the tables must overwrite
        write_identity_map(memory)
        yield memory


def test_cr3_is_the_pml4() -> None:
    with GuestMemory(4 * MIB) as memory:
        assert write_identity_map(memory) == PML4_ADDRESS


@pytest.mark.parametrize(
    "address",
    [0, 0x7000, 0x100200, 2 * MIB - 1, 2 * MIB, 0x1234_5678, GIB, 0xBFFF_FFFF,
     0xFEC0_0000, 0xFEE0_0000, 4 * GIB - 1],
)
def test_identity(memory: GuestMemory, address: int) -> None:
    assert translate(memory, PML4_ADDRESS, address) == address


@settings(max_examples=200)
@given(st.integers(0, 4 * GIB - 1))
def test_identity_everywhere_below_4g(memory: GuestMemory, address: int) -> None:
    assert translate(memory, PML4_ADDRESS, address) == address


def test_nothing_above_4g(memory: GuestMemory) -> None:
    with pytest.raises(PageFault, match="0x100000000: level-3 entry not present"):
        translate(memory, PML4_ADDRESS, 4 * GIB)
    with pytest.raises(PageFault, match="level-4 entry not present"):
        translate(memory, PML4_ADDRESS, 1 << 39)


def test_entries_are_supervisor_writable(memory: GuestMemory) -> None:
    pml4e = memory.read_u64(PML4_ADDRESS)
    assert pml4e & ~0xFFF == PDPT_ADDRESS
    for gib in range(4):
        pdpte = memory.read_u64(PDPT_ADDRESS + 8 * gib)
        assert pdpte & ~0xFFF == PD_ADDRESS + gib * 4096
        pde = memory.read_u64(PD_ADDRESS + gib * 4096 + 8 * 511)
        for entry in (pml4e, pdpte, pde):
            assert entry & (PTE_PRESENT | PTE_WRITABLE) == PTE_PRESENT | PTE_WRITABLE
            assert not entry & PTE_USER
    assert memory.read_u64(PML4_ADDRESS + 8) == 0
    assert memory.read_u64(PDPT_ADDRESS + 8 * 4) == 0
