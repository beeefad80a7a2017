"""Where avmm puts things in guest physical memory when it boots an x86-64 guest.

Every address here is a guest physical address chosen by avmm; nothing else in the
project should hard-code one. The map, bottom up::

    0x0000_0000 ..0x0000_0fff  left zero: real-mode IVT and BIOS data area. Linux reads
                               the EBDA pointer at 0x40e from here; zero means "none".
    0x0000_1000                GDT        (BOOT_GDT_ADDRESS, one page, 6 slots used)
    0x0000_2000                IDT        (BOOT_IDT_ADDRESS, empty: limit 0)
    0x0000_3000                TSS        (BOOT_TSS_ADDRESS, 104 bytes, all zero)
    0x0000_4000 ..0x0000_6fff  boot stack, grows down from BOOT_STACK_TOP = 0x7000
    0x0000_7000                zero page  (ZERO_PAGE_ADDRESS, struct boot_params)
    0x0000_9000                PML4       (PML4_ADDRESS)
    0x0000_a000                PDPT       (PDPT_ADDRESS)
    0x0000_b000 ..0x0000_efff  4 page directories (PD_ADDRESS, one per GiB)
    0x0002_0000 ..0x0002_ffff  kernel command line (CMDLINE_ADDRESS, CMDLINE_MAX_SIZE)
    0x0009_fc00 ..0x0009_ffff  EBDA, reported "reserved" in e820
    0x000a_0000 ..0x000f_ffff  legacy VGA/ROM hole; 0xf0000.. reported "reserved"
    0x0010_0000                kernel (KERNEL_LOAD_ADDRESS)
    ...                        initrd, as high as allowed, below the top of low RAM
    0xc000_0000 ..0xffff_ffff  32-bit MMIO hole (avmm.memory.MMIO_HOLE_START):
        0xfec0_0000            IOAPIC
        0xfee0_0000            LAPIC
        0xfffb_c000            KVM identity-map page (KVM_SET_IDENTITY_MAP_ADDR)
        0xfffb_d000 ..+3 pages KVM real-mode TSS (KVM_SET_TSS_ADDR)
    0x1_0000_0000 ..           RAM above the hole, if any

All boot structures sit below 64 KiB + the command line, i.e. inside the first 1 MiB that
the boot protocol leaves to the boot loader, so a kernel loaded at 1 MiB never overlaps
them and the guest needs no special knowledge of where they are (the zero page is passed
in RSI, the command line through the zero page).
"""

from __future__ import annotations

from typing import Final

KIB: Final = 1 << 10
MIB: Final = 1 << 20
GIB: Final = 1 << 30
PAGE_SIZE: Final = 4096

# -- boot CPU structures ----------------------------------------------------------------

#: The boot GDT: null, null, __BOOT_CS (0x10), __BOOT_DS (0x18), 16-byte TSS (0x20).
BOOT_GDT_ADDRESS: Final = 0x1000
#: The boot IDT. It is loaded with limit 0 (see boot_cpu): an exception before the guest
#: installs its own IDT shuts the VM down (KVM_EXIT_SHUTDOWN) instead of jumping to junk.
BOOT_IDT_ADDRESS: Final = 0x2000
#: A zeroed 64-bit TSS. VMX refuses to enter a long-mode guest whose TR is unusable, so
#: TR points at this; the guest replaces it before it needs one.
BOOT_TSS_ADDRESS: Final = 0x3000
#: Initial RSP of the boot CPU (16-byte aligned; the stack grows down to 0x4000).
BOOT_STACK_TOP: Final = 0x7000
#: The lowest address of the boot stack, for checks.
BOOT_STACK_BOTTOM: Final = 0x4000

#: struct boot_params ("zero page"), 4 KiB. Its address is passed in RSI.
ZERO_PAGE_ADDRESS: Final = 0x7000
ZERO_PAGE_SIZE: Final = 4096

# -- boot page tables (identity map of the first 4 GiB, 2 MiB pages) -------------------

PML4_ADDRESS: Final = 0x9000
PDPT_ADDRESS: Final = 0xA000
#: First of four consecutive page directories, one per GiB of the identity map.
PD_ADDRESS: Final = 0xB000
PD_COUNT: Final = 4
#: The boot page tables identity-map [0, IDENTITY_MAP_END).
IDENTITY_MAP_END: Final = 4 * GIB

# -- command line -----------------------------------------------------------------------

CMDLINE_ADDRESS: Final = 0x20000
#: Bytes reserved for the command line, including its terminating NUL: so at most
#: 65535 characters. A kernel's own limit (setup header ``cmdline_size``, 2047 for Linux
#: 6.1 on x86) is usually far lower and is enforced as well.
CMDLINE_MAX_SIZE: Final = 64 * KIB

# -- the first megabyte -------------------------------------------------------------------

#: Start of the Extended BIOS Data Area; conventional RAM is [0, EBDA_START).
EBDA_START: Final = 0x9FC00
#: The 640 KiB boundary: the legacy VGA window and option ROMs start here.
LOW_MEMORY_END: Final = 0xA0000
#: The system BIOS ROM area, where Linux scans for MP and ACPI RSDP tables.
BIOS_ROM_START: Final = 0xF0000
#: 1 MiB: "high memory" for the boot protocol. Everything avmm writes for booting lies
#: below this; the kernel lies at or above it.
HIGH_MEMORY_START: Final = 1 * MIB

# -- the kernel and initrd ----------------------------------------------------------------

#: Where a bzImage's protected-mode code is loaded (the setup header's default
#: ``code32_start``) and the lowest address an ELF PT_LOAD segment may use.
KERNEL_LOAD_ADDRESS: Final = 0x100000
#: Offset of the 64-bit entry point from the start of a bzImage's protected-mode code
#: (boot protocol 2.12+, "64-bit boot protocol").
BZIMAGE_64BIT_ENTRY_OFFSET: Final = 0x200
#: Highest address an initrd may occupy when the kernel does not say (ELF kernels have no
#: setup header). Every 64-bit x86 Linux advertises this value in ``initrd_addr_max``.
DEFAULT_INITRD_ADDR_MAX: Final = 0x7FFF_FFFF
#: Initrd start alignment. The protocol only asks for 4 KiB; a page is what Linux frees.
INITRD_ALIGNMENT: Final = PAGE_SIZE

# -- the 32-bit MMIO hole -----------------------------------------------------------------

IOAPIC_ADDRESS: Final = 0xFEC0_0000
LAPIC_ADDRESS: Final = 0xFEE0_0000
#: KVM_SET_IDENTITY_MAP_ADDR: one page KVM (VMX) uses for real-mode/unpaged guests.
KVM_IDENTITY_MAP_ADDRESS: Final = 0xFFFB_C000
#: KVM_SET_TSS_ADDR: three pages KVM (VMX) uses to emulate real mode.
KVM_TSS_ADDRESS: Final = 0xFFFB_D000
KVM_TSS_SIZE: Final = 3 * PAGE_SIZE


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def align_down(value: int, alignment: int) -> int:
    """``value`` rounded down to a multiple of ``alignment`` (a power of two)."""
    return value & ~(alignment - 1)
