/*
 * Ring-0 entry points beyond the generic exception stubs in boot.S (see
 * ring0.h and README.md, "Ring 0 on request").
 *
 *   ring0_call   ring 3: uint64_t ring0_call(ring0_fn fn, uint64_t arg).
 *                A ud2 at the fixed address ring0_call_ud2; ud_entry turns
 *                the #UD from there into a call of fn(arg) in ring 0 and
 *                returns past the ud2 with fn's result in RAX.
 *   ud_entry     IDT vector 6 (#UD). The ring-0 call, or else the generic
 *                exception report.
 *   bp_entry     IDT vector 3 (#BP), gate DPL 0. Calls breakpoint_hook with
 *                the frame and returns with iretq (to the address the frame
 *                names: right after the int3), every register preserved; with
 *                no hook, the generic exception report.
 *
 * Why a ud2 and not "int $0x80" through a DPL-3 gate: on the kvm_pvm host of
 * our development machines, "int $n" in ring 3 raises #UD whatever the gate
 * says (the hypervisor's emulator does not do "int n" in 64-bit mode), while
 * exceptions are delivered. A #UD from a known address works there, on
 * hardware KVM and under QEMU TCG alike.
 *
 * Both handlers align the stack for C themselves, whatever the frame looks
 * like, so a VMM that delivers a misaligned frame breaks checks, not calls.
 */
#include "layout.h"

        .text

        .globl  ring0_call
        .type   ring0_call, @function
ring0_call:                             /* ring 3, C ABI: RDI = fn, RSI = arg */
        .globl  ring0_call_ud2
ring0_call_ud2:
        ud2                             /* ud_entry runs fn(arg), returns here + 2 */
        ret
        .size   ring0_call, . - ring0_call

        .globl  ud_entry
        .type   ud_entry, @function
ud_entry:
        pushq   $0                      /* #UD has no error code */
        pushq   $INVALID_OPCODE_VECTOR
        /* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. The ring-0 call
         * is a #UD at ring0_call_ud2 from ring 3; anything else is a fault. */
        cmpq    $ring0_call_ud2, 16(%rsp)
        jne     exception_common        /* boot.S: report and exit */
        testb   $3, 24(%rsp)
        jz      exception_common
        addq    $16, %rsp               /* vector, error code */
        addq    $2, (%rsp)              /* resume after the ud2 */
        pushq   %rbp
        movq    %rsp, %rbp
        andq    $-16, %rsp
        movq    %rdi, %rax
        movq    %rsi, %rdi
        call    *%rax                   /* fn(arg) in ring 0; result in RAX */
        movq    %rbp, %rsp
        popq    %rbp
        iretq
        .size   ud_entry, . - ud_entry

        .globl  bp_entry
        .type   bp_entry, @function
bp_entry:
        pushq   $0                      /* #BP has no error code */
        pushq   $BREAKPOINT_VECTOR
        cmpq    $0, breakpoint_hook(%rip)
        je      exception_common        /* no hook: report and exit */
        /* Stack: struct exception_frame. Save what the C ABI lets the hook
         * clobber: the interrupted code may be anything. */
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
