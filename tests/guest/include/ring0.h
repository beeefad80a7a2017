/* The little ring-0 support the guest has (see README.md, "Ring 0 on request"):
 *
 *   - ring0_call(fn, arg): run fn(arg) in ring 0 from ring 3. It is a ud2 at
 *     a fixed address that the #UD handler recognises (ring0.S says why not
 *     "int $0x80");
 *   - breakpoint_hook: what a #BP (int3) runs instead of the generic
 *     exception report.
 *
 * Ring-0 code is interpreted on some hypervisors (about 1 us per instruction
 * on kvm_pvm), so keep what runs there short. */
#ifndef AVMM_GUEST_RING0_H
#define AVMM_GUEST_RING0_H

#include <stdint.h>

#include "layout.h"

/* What the exception entry stubs push, lowest address first: the stub's
 * vector and error code (0 for vectors without one), then the CPU's frame. */
struct exception_frame {
    uint64_t vector;
    uint64_t error_code;
    uint64_t rip;
    uint64_t cs;
    uint64_t rflags;
    uint64_t rsp;
    uint64_t ss;
};

/* Print the exception report (README.md) and exit with EXIT_EXCEPTION. Ring 0. */
__attribute__((noreturn)) void exception_report(const struct exception_frame *frame);

/* Called in ring 0 for every #BP while non-NULL, with the frame of the int3
 * (frame->rip is the address after it). When it returns, every register of
 * the interrupted code is restored and bp_entry returns there with iretq; it
 * may change frame->rip and frame->rflags. NULL (the default): #BP is
 * reported like any other exception. */
typedef void (*breakpoint_hook_fn)(struct exception_frame *frame);
extern breakpoint_hook_fn volatile breakpoint_hook;

/* A function to run in ring 0 (on the RSP0 stack, interrupts off). */
typedef uint64_t (*ring0_fn)(uint64_t arg);

/* Run fn(arg) in ring 0 and return its result; call from ring 3 only (a ud2
 * anywhere else, this one from ring 0 included, is reported as #UD). */
uint64_t ring0_call(ring0_fn fn, uint64_t arg);

#endif
