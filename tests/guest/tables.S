/*
 * Static CPU tables and memory: page tables, GDT, TSS, stacks, mailbox.
 *
 * Everything that can be computed at link time is, so the ring-0 setup in
 * boot.S only has to load registers (see its header for why that matters).
 */
#include "layout.h"

#define PTE_P           (1 << 0)
#define PTE_RW          (1 << 1)
#define PTE_US          (1 << 2)        /* user: ring 3 may touch everything */
#define PTE_PWT         (1 << 3)
#define PTE_PCD         (1 << 4)
#define PTE_PS          (1 << 7)        /* 2 MiB page in a PD entry */
#define TABLE_FLAGS     (PTE_P | PTE_RW | PTE_US)
#define RAM_2M_FLAGS    (PTE_P | PTE_RW | PTE_US | PTE_PS)
/* The fourth GiB is where MMIO devices live on microvm-like machines: uncached. */
#define MMIO_2M_FLAGS   (RAM_2M_FLAGS | PTE_PCD | PTE_PWT)

/* ---- Identity map of 0..5 GiB with 2 MiB pages, U/S set at every level. The fifth
 * GiB is RAM on a VM with more than 3 GiB (avmm puts RAM above 3 GiB at 4 GiB);
 * the high-mem scenario touches it. Mapping it costs nothing where it is absent. */
        .section .data.pagetables, "aw"
        .balign 4096
        .globl  pml4
pml4:
        .quad   pdpt + TABLE_FLAGS
        .fill   511, 8, 0
pdpt:
        .quad   pd0 + TABLE_FLAGS
        .quad   pd1 + TABLE_FLAGS
        .quad   pd2 + TABLE_FLAGS
        .quad   pd3 + TABLE_FLAGS
        .quad   pd4 + TABLE_FLAGS
        .fill   507, 8, 0

        .macro  PD gib, flags
        .set    pde_addr, (\gib << 30)
        .rept   512
        .quad   pde_addr + \flags
        .set    pde_addr, pde_addr + (1 << 21)
        .endr
        .endm
pd0:    PD      0, RAM_2M_FLAGS
pd1:    PD      1, RAM_2M_FLAGS
pd2:    PD      2, RAM_2M_FLAGS
pd3:    PD      3, MMIO_2M_FLAGS
pd4:    PD      4, RAM_2M_FLAGS

/* ---- GDT. Selector values are in layout.h. */
        .data
        .balign 16
        .globl  gdt, gdt_tss, gdt_ptr
gdt:
        .quad   0                       /* null */
        .quad   0x00af9a000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf92000000ffff      /* 0x10 kernel data, flat */
        .quad   0x00cff2000000ffff      /* 0x18 user data, DPL 3 */
        .quad   0x00affa000000ffff      /* 0x20 user code, 64-bit, DPL 3 */
gdt_tss:
        .quad   0x0000890000002068      /* 0x28 TSS, available, limit 0x2068; base filled by boot.S */
        .quad   0
gdt_end:

        .balign 8
        .word   0, 0, 0                 /* align the base of the pseudo-descriptor */
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt

        .balign 8
        .word   0, 0, 0
        .globl  idt_ptr
idt_ptr:
        .word   IDT_VECTORS * 16 - 1
        .quad   idt

/* ---- 64-bit TSS: RSP0 for exceptions from ring 3, IST1 for #DF, and an
 * I/O permission bitmap that allows every port.
 *
 * With IOPL=3 the CPU never looks at the bitmap. It is here for hypervisors
 * that run guest ring 3 with the hardware IOPL at 0 and emulate the faulting
 * in/out (kvm_pvm does, and then forgets the guest's IOPL): their emulator
 * falls back to this bitmap, which says yes. */
        .balign 16
        .globl  tss, tss_end
tss:
        .long   0
        .quad   boot_stack_top          /* rsp0 */
        .quad   0, 0                    /* rsp1, rsp2 */
        .quad   0
        .quad   df_stack_top            /* ist1 */
        .quad   0, 0, 0, 0, 0, 0        /* ist2..ist7 */
        .quad   0
        .word   0
        .word   tss_io_bitmap - tss     /* I/O bitmap base */
tss_io_bitmap:
        .fill   65536 / 8, 1, 0         /* one bit per port, 0 = allowed */
        .byte   0xff                    /* terminator, inside the limit */
tss_end:

/* ---- How the guest was entered (see layout.h BOOT_KIND_*). In .data, not
 * .bss, so they do not depend on the loader clearing memory. */
        .balign 8
        .globl  boot_kind, boot_info
boot_kind:
        .quad   0
boot_info:
        .quad   0

/* ---- Zero-initialised memory. */
        .bss
        .balign 4096
        .globl  idt
idt:
        .skip   IDT_VECTORS * 16

        .balign 16
        .skip   16384
        .globl  boot_stack_top
boot_stack_top:                         /* ring-0 setup, then RSP0 */

        .balign 16
        .skip   4096
        .globl  df_stack_top
df_stack_top:

        .balign 16
        .skip   65536
        .globl  user_stack_top
user_stack_top:

/* ---- The mailbox page, pinned at MAILBOX_ADDR by linker.ld. */
        .section .mailbox, "aw", @nobits
        .balign 4096
        .globl  mailbox
mailbox:
        .skip   4096
