/*
 * Ring-0 entry points beyond the exception stubs in boot.S (see ring0.h).
 *
 *   ring0_call_entry  IDT vector RING0_CALL_VECTOR (0x80), interrupt gate with
 *                     DPL 3: ring 3 does "int $0x80" with RDI = function and
 *                     RSI = argument; the function runs in ring 0 on the RSP0
 *                     stack with interrupts off, its result comes back in RAX.
 *   bp_entry          IDT vector 3 (#BP), interrupt gate with DPL 0 (so an
 *                     int3 in ring 3 is a #GP). Calls breakpoint_hook with the
 *                     frame and returns past the int3 with iretq, every
 *                     register preserved; with no hook it is the generic
 *                     exception report.
 *
 * Both keep the stack 16-byte aligned for C whatever the CPU's frame looks
 * like, so a VMM that delivers a misaligned frame breaks checks, not calls.
 */
#include "layout.h"

        .text

        .globl  ring0_call_entry
        .type   ring0_call_entry, @function
ring0_call_entry:
        /* Stack: RIP, CS, RFLAGS, RSP, SS of the ring-3 caller. */
        pushq   %rbp
        movq    %rsp, %rbp
        andq    $-16, %rsp
        movq    %rdi, %rax
        movq    %rsi, %rdi
        call    *%rax                   /* result in RAX */
        movq    %rbp, %rsp
        popq    %rbp
        iretq
        .size   ring0_call_entry, . - ring0_call_entry

        .globl  bp_entry
        .type   bp_entry, @function
bp_entry:
        pushq   $0                      /* #BP has no error code */
        pushq   $BREAKPOINT_VECTOR
        cmpq    $0, breakpoint_hook(%rip)
        je      exception_common        /* boot.S: report and exit */
        /* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS (struct
         * exception_frame). Save what the C ABI lets the hook clobber. */
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %rbp
        leaq    80(%rsp), %rdi          /* the struct exception_frame */
        movq    %rsp, %rbp
        andq    $-16, %rsp
        movq    breakpoint_hook(%rip), %rax
        call    *%rax
        movq    %rbp, %rsp
        popq    %rbp
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rax
        addq    $16, %rsp               /* vector, error code */
        iretq
        .size   bp_entry, . - bp_entry

        /* In .data, not .bss: NULL must not depend on the loader. */
        .data
        .balign 8
        .globl  breakpoint_hook
breakpoint_hook:
        .quad   0
