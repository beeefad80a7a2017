"""The state of the boot CPU at the first guest instruction, as plain data.

This is the x86-64 "64-bit boot protocol" entry state: long mode with paging on, flat
``__BOOT_CS``/``__BOOT_DS`` segments, interrupts off, RSI pointing at the zero page. The
KVM layer maps :class:`BootCpuState` onto ``kvm_regs``/``kvm_sregs``; nothing here knows
about KVM.

Mapping for the KVM layer: ``cs = code``; ``ds = es = fs = gs = ss = data``;
``tr = tss``; ``ldt = ldt`` (``unusable`` = not ``present``); each ``Segment`` field maps
to the ``kvm_segment`` field of the same name (``limit`` is already byte-granular).
``gdt``/``idt`` map to ``kvm_dtable`` base/limit. All general registers not named here
are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .gdt import BOOT_CODE_SEGMENT, BOOT_DATA_SEGMENT, BOOT_TSS_SEGMENT, Segment
from .layout import (
    BOOT_GDT_ADDRESS,
    BOOT_IDT_ADDRESS,
    BOOT_STACK_TOP,
    PML4_ADDRESS,
    ZERO_PAGE_ADDRESS,
)

# CR0
CR0_PE: Final = 1 << 0  # protected mode
CR0_MP: Final = 1 << 1  # WAIT/FWAIT honour CR0.TS, as every OS with an FPU wants
CR0_ET: Final = 1 << 4  # 387-class FPU; hard-wired to 1 on every x86-64 CPU
CR0_NE: Final = 1 << 5  # x87 errors raise #MF, not the legacy FERR# pin KVM does not model
CR0_WP: Final = 1 << 16
CR0_PG: Final = 1 << 31  # paging; required for long mode
#: Caches on (CD and NW clear), write protection left to the guest (Linux sets WP itself).
BOOT_CR0: Final = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG

# CR4
CR4_PAE: Final = 1 << 5  # required for long mode
CR4_OSFXSR: Final = 1 << 9
#: Only PAE: the guest enables what it uses (OSFXSR for SSE, PGE, ...) once it has set up
#: the state those features need. A freestanding guest that uses SSE must set OSFXSR and
#: OSXMMEXCPT itself (or be compiled with -mgeneral-regs-only).
BOOT_CR4: Final = CR4_PAE

# EFER (MSR 0xc0000080)
EFER_SCE: Final = 1 << 0
EFER_LME: Final = 1 << 8  # long mode enable
EFER_LMA: Final = 1 << 10  # long mode active; KVM wants it consistent with CR0.PG + LME
EFER_NXE: Final = 1 << 11
#: Long mode only. No NX: the boot page tables do not use it, and the guest turns it on
#: before its own tables do.
BOOT_EFER: Final = EFER_LME | EFER_LMA

#: Only the always-one bit 1: IF clear (the protocol wants interrupts off), IOPL 0.
BOOT_RFLAGS: Final = 0x2

#: Limit of the boot IDT: 0, an empty table. Any exception before the guest loads its
#: own IDT escalates to a triple fault, which KVM reports as a shutdown.
BOOT_IDT_LIMIT: Final = 0

#: LDTR at boot: null and unusable.
NULL_LDT_SEGMENT: Final = Segment(base=0, limit=0, selector=0, type=0x2, present=False, s=False)


@dataclass(frozen=True)
class DescriptorTable:
    """A GDTR or IDTR: ``base`` and ``limit`` (size in bytes minus one)."""

    base: int
    limit: int


@dataclass(frozen=True)
class BootCpuState:
    """Registers of the boot vCPU at its first instruction (64-bit boot protocol)."""

    rip: int
    rsp: int
    #: The zero page address (struct boot_params), as the protocol requires.
    rsi: int
    cr3: int
    gdt: DescriptorTable
    idt: DescriptorTable
    #: CS: __BOOT_CS (0x10), flat 64-bit code.
    code: Segment = BOOT_CODE_SEGMENT
    #: DS, ES, FS, GS and SS: __BOOT_DS (0x18), flat read/write data.
    data: Segment = BOOT_DATA_SEGMENT
    #: TR: a busy 64-bit TSS. VMX refuses VM entry in long mode with an unusable TR.
    tss: Segment = BOOT_TSS_SEGMENT
    ldt: Segment = NULL_LDT_SEGMENT
    rflags: int = BOOT_RFLAGS
    cr0: int = BOOT_CR0
    cr4: int = BOOT_CR4
    efer: int = BOOT_EFER


def boot_cpu_state(
    *,
    entry: int,
    gdt_limit: int,
    zero_page: int = ZERO_PAGE_ADDRESS,
    stack_top: int = BOOT_STACK_TOP,
    cr3: int = PML4_ADDRESS,
) -> BootCpuState:
    """The boot CPU state for entering at ``entry`` with avmm's layout.

    ``gdt_limit`` is the size of the boot GDT minus one (``len(boot_gdt()) - 1``).
    """
    return BootCpuState(
        rip=entry,
        rsp=stack_top,
        rsi=zero_page,
        cr3=cr3,
        gdt=DescriptorTable(BOOT_GDT_ADDRESS, gdt_limit),
        idt=DescriptorTable(BOOT_IDT_ADDRESS, BOOT_IDT_LIMIT),
    )
