/*
 * Application processor start-up for the smp scenario (scenarios/smp.c).
 *
 * An AP leaves wait-for-SIPI in real mode at CS:IP = (vector << 8):0, that is
 * at SMP_TRAMPOLINE_ADDR, where smp.c copied smp_trampoline_start. The copy
 * only loads a GDT and enters 32-bit protected mode; everything after that
 * runs from the image at its link address. 32-bit code enables PAE, loads the
 * guest's page tables (tables.S), sets EFER.LME and turns paging on; 64-bit
 * code loads the guest's GDT and IDT, reports in and halts for good.
 *
 * All of it is ring 0, interpreted instruction by instruction on some
 * hypervisors (kvm_pvm), so it is kept short and loop-free.
 */
#include "layout.h"
#include "smp.h"

#define MSR_EFER        0xc0000080
#define EFER_LME        (1 << 8)
#define CR0_PE          (1 << 0)
#define CR0_NE          (1 << 5)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)

/* Selectors of ap_gdt: 0x08 and 0x10 match the guest's GDT (layout.h), so CS
 * and the data segments stay valid when 64-bit code switches to that one. */
#define AP_SEL_CODE32   0x18

/* Offset of a trampoline label in the copied page. */
#define TRAMP(label)    ((label) - smp_trampoline_start)

        .section .rodata
        .code16
        .balign 16
        .globl  smp_trampoline_start, smp_trampoline_end
smp_trampoline_start:
        cli
        cld
        movw    %cs, %ax                /* CS base = SMP_TRAMPOLINE_ADDR */
        movw    %ax, %ds
        lgdtl   TRAMP(ap_gdt_ptr)       /* 32-bit base: ap_gdt is above 1 MiB */
        movl    $(CR0_PE | CR0_NE), %eax /* also clears the reset CD/NW bits */
        movl    %eax, %cr0
        ljmpl   $AP_SEL_CODE32, $ap_entry32
        .balign 8
        .word   0, 0, 0                 /* align the pseudo-descriptor's base */
ap_gdt_ptr:
        .word   ap_gdt_end - ap_gdt - 1
        .long   ap_gdt
smp_trampoline_end:

        .balign 16
ap_gdt:
        .quad   0                       /* null */
        .quad   0x00af9a000000ffff      /* 0x08 code, 64-bit (as in tables.S) */
        .quad   0x00cf92000000ffff      /* 0x10 data, flat (as in tables.S) */
        .quad   0x00cf9a000000ffff      /* 0x18 code, 32-bit, flat */
ap_gdt_end:

        .text
        .code32
ap_entry32:
        movl    $SEL_KERNEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr
        movl    $(CR0_PG | CR0_NE | CR0_PE), %eax
        movl    %eax, %cr0
        ljmp    $SEL_KERNEL_CODE, $ap_entry64

        .code64
ap_entry64:
        /* The guest's GDT has the same 0x08 and 0x10, so CS needs no reload.
         * No ltr: the boot CPU's TSS is busy, and ring 0 for good needs none. */
        lgdt    gdt_ptr(%rip)
        movl    $SEL_KERNEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs
        lidt    idt_ptr(%rip)           /* a fault is reported, not a triple fault */

        movl    $(APIC_BASE_ADDR + APIC_ID), %edx
        movl    (%rdx), %eax
        shrl    $24, %eax               /* xAPIC ID: bits 31:24 */
        cmpl    $SMP_MAX_CPUS, %eax
        jae     1f
        /* A stack of its own, for the exception report if anything faults. */
        leal    1(%eax), %ecx
        imull   $SMP_AP_STACK_SIZE, %ecx
        leaq    ap_stacks(%rip), %rsp
        addq    %rcx, %rsp
        leaq    smp_seen(%rip), %rdx
        movb    $1, (%rdx,%rax)
1:
        lock incl smp_reported(%rip)    /* after the flag: the boot CPU reads both */
2:
        cli
        hlt
        jmp     2b

        .bss
        .balign 16
        .globl  smp_seen, smp_reported
smp_seen:
        .skip   SMP_MAX_CPUS
smp_reported:
        .skip   4
        .balign 16
ap_stacks:
        .skip   SMP_MAX_CPUS * SMP_AP_STACK_SIZE
