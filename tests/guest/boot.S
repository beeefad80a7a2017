/*
 * Entry points and the short ring-0 part of the test guest.
 *
 * Two ways in, one way on:
 *   entry64      ELF e_entry, 64-bit (the vmlinux / Firecracker way, used by avmm)
 *   pvh_entry32  PVH, 32-bit protected mode without paging (QEMU -M microvm)
 * Both record how they were entered (boot_kind, boot_info) and continue at
 * common64, which installs the guest's own page tables, GDT, TSS and IDT and
 * then drops to ring 3 with IOPL=3 at user_entry.
 *
 * Ring-0 code is kept to straight-line setup: on some hypervisors every ring-0
 * instruction is emulated. Everything else runs in ring 3.
 */
#include "layout.h"

#define MSR_EFER        0xc0000080
#define EFER_LME        (1 << 8)
#define CR0_PE          (1 << 0)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)

/* PVH: XEN_ELFNOTE_PHYS32_ENTRY. The descriptor is 8 bytes like Linux's, with
 * the 32-bit entry address in the low half, so readers taking 4 or 8 bytes
 * both get the right value. */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz: "Xen\0" */
        .long   8                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .balign 4
        .quad   pvh_entry32
        .balign 4

        .section .text.boot, "ax"

/* ---- 64-bit ELF entry: long mode, paging on, RSI = struct boot_params. */
        .code64
        .globl  entry64
        .type   entry64, @function
entry64:
        cli
        cld
        movq    %rsi, boot_info(%rip)
        movq    $BOOT_KIND_LINUX64, boot_kind(%rip)
        jmp     common64
        .size   entry64, . - entry64

/* ---- PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info. */
        .code32
        .globl  pvh_entry32
        .type   pvh_entry32, @function
pvh_entry32:
        cli
        cld
        movl    %ebx, %edi
        lgdt    gdt_ptr                 /* 32-bit lgdt reads limit + low 32 bits of base */
        movl    $SEL_KERNEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    $boot_stack_top, %esp
        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $(CR0_PG | CR0_PE), %eax
        movl    %eax, %cr0
        ljmp    $SEL_KERNEL_CODE, $pvh_entry64
        .size   pvh_entry32, . - pvh_entry32

        .code64
pvh_entry64:
        movl    %edi, %edi              /* upper half is undefined after the mode switch */
        movq    %rdi, boot_info(%rip)
        movq    $BOOT_KIND_PVH, boot_kind(%rip)
        /* fall through */

/* ---- Common 64-bit setup, ring 0. Trusts nothing the loader set up except
 * that the code and data around it are mapped. */
common64:
        leaq    boot_stack_top(%rip), %rsp
        lgdt    gdt_ptr(%rip)
        pushq   $SEL_KERNEL_CODE        /* reload CS from our GDT */
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq
1:
        movl    $SEL_KERNEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs

        leaq    pml4(%rip), %rax
        movq    %rax, %cr3

        /* TSS descriptor: the base is only known after linking. The type is
         * rewritten as "available" so that re-entering without a reload works. */
        leaq    tss(%rip), %rax
        leaq    gdt_tss(%rip), %rdi
        movb    $0x89, 5(%rdi)
        movw    %ax, 2(%rdi)
        shrq    $16, %rax
        movb    %al, 4(%rdi)
        movb    %ah, 7(%rdi)
        shrq    $16, %rax
        movl    %eax, 8(%rdi)
        movl    $SEL_TSS, %eax
        ltr     %ax

        /* IDT: one 64-bit interrupt gate (DPL 0) per exception vector. */
        leaq    idt(%rip), %rdi
        leaq    exception_stubs(%rip), %rsi
        xorl    %ecx, %ecx
2:
        movq    (%rsi,%rcx,8), %rax
        movl    %eax, %edx
        andl    $0xffff, %edx
        orl     $(SEL_KERNEL_CODE << 16), %edx
        movl    %edx, (%rdi)
        movl    %eax, %edx
        andl    $0xffff0000, %edx
        orl     $0x8e00, %edx           /* present, DPL 0, interrupt gate */
        cmpl    $8, %ecx
        jne     3f
        orl     $1, %edx                /* #DF runs on IST1 */
3:
        movl    %edx, 4(%rdi)
        shrq    $32, %rax
        movl    %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        addq    $16, %rdi
        incl    %ecx
        cmpl    $IDT_VECTORS, %ecx
        jne     2b
        lidt    idt_ptr(%rip)

        /* Drop to ring 3 with IOPL=3 and interrupts off. */
        pushq   $SEL_USER_DATA
        leaq    user_stack_top(%rip), %rax
        pushq   %rax
        pushq   $USER_RFLAGS
        pushq   $SEL_USER_CODE
        leaq    user_entry(%rip), %rax
        pushq   %rax
        iretq

/* ---- Ring 3 from here on. */
        .text
        .type   user_entry, @function
user_entry:
        xorl    %ebp, %ebp
        call    guest_main              /* does not return; spin if it does */
4:
        pause
        jmp     4b
        .size   user_entry, . - user_entry

/* ---- Exception stubs: push a uniform frame (struct exception_frame, ring0.h)
 * and report. Ring 0. #BP and #UD enter ring0.S first (bp_entry, ud_entry),
 * which come back to exception_common when they have nothing else to do. */
        .text
        .altmacro
        .macro  EXC_STUB vec
        .balign 16
exc_stub_\vec:
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        pushq   $0                      /* no CPU error code: push a zero one */
        .endif
        pushq   $\vec
        jmp     exception_common
        .endm

        .set    vec, 0
        .rept   IDT_VECTORS
        EXC_STUB %vec
        .set    vec, vec + 1
        .endr

        .globl  exception_common
exception_common:
        /* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
        movq    %rsp, %rdi
        andq    $-16, %rsp
        call    exception_report        /* noreturn */
5:
        cli
        hlt
        jmp     5b

        .section .rodata
        .balign 8
exception_stubs:
        .macro  EXC_STUB_ADDR vec
        .if \vec == BREAKPOINT_VECTOR
        .quad   bp_entry
        .elseif \vec == INVALID_OPCODE_VECTOR
        .quad   ud_entry
        .else
        .quad   exc_stub_\vec
        .endif
        .endm
        .set    vec, 0
        .rept   IDT_VECTORS
        EXC_STUB_ADDR %vec
        .set    vec, vec + 1
        .endr
        .noaltmacro
