/* int3: avmm.n (default 3) breakpoints executed in ring 0.
 *
 * Ring 3 enters ring 0 with ring0_call (ring0.h); there each int3 raises #BP
 * through the DPL-0 gate, and breakpoint_hook counts it and checks that the
 * frame is what the CPU architecturally pushes for an int3:
 * a trap (saved RIP right after the 0xCC byte), CS, RFLAGS and RSP of the
 * interrupted code, and the frame at (RSP & ~15) - 40. Execution goes on
 * after every int3, so n breakpoints mean n hook runs. A VMM that has to
 * inject #BP itself (KVM's emulator refuses ring-0 int3 on some hosts) must
 * look the same as the CPU. */
#include "guest.h"

#define INT3_DEFAULT 3
#define INT3_OPCODE  0xcc
#define RFLAGS_RF    (1ul << 16) /* resume flag: not expected, but not ours to judge */
#define FRAME_SIZE   40          /* RIP, CS, RFLAGS, RSP, SS */

/* What the ring-0 loop saw right before the current int3. */
static volatile uint64_t expected_rip, expected_rflags, expected_rsp;
static volatile uint64_t hook_runs;

static __attribute__((noreturn)) void bad_frame(const struct exception_frame *frame,
                                                const char *what)
{
    guest_printf(GUEST_PREFIX "int3 FAILED bad #BP frame (%s): rip=0x%lx cs=0x%lx "
                 "rflags=0x%lx rsp=0x%lx at=0x%lx; expected rip=0x%lx cs=0x%x "
                 "rflags=0x%lx rsp=0x%lx\n",
                 what, frame->rip, frame->cs, frame->rflags, frame->rsp,
                 (uint64_t)(uintptr_t)&frame->rip, expected_rip, SEL_KERNEL_CODE,
                 expected_rflags, expected_rsp);
    mailbox.counter = hook_runs;
    /* Returning to a wrong RIP could run anything: stop here. */
    guest_exit(EXIT_FAILURE);
}

/* breakpoint_hook, ring 0. */
static void int3_on_breakpoint(struct exception_frame *frame)
{
    hook_runs++;
    /* RIP first: a frame that is off by a slot (an error code pushed for
     * #BP, say) must not send the byte check to a wild address. */
    if (frame->rip != expected_rip)
        bad_frame(frame, "rip");
    if (*(const volatile uint8_t *)(uintptr_t)(frame->rip - 1) != INT3_OPCODE)
        bad_frame(frame, "no int3 right before rip");
    if (frame->cs != SEL_KERNEL_CODE)
        bad_frame(frame, "cs");
    if ((frame->rflags & ~RFLAGS_RF) != expected_rflags)
        bad_frame(frame, "rflags");
    if (frame->rsp != expected_rsp)
        bad_frame(frame, "rsp");
    if ((uint64_t)(uintptr_t)&frame->rip != (expected_rsp & ~15ul) - FRAME_SIZE)
        bad_frame(frame, "frame address");
}

/* Ring 0: n int3s; returns how many it got past, or ~0 if not in ring 0. */
static uint64_t int3_ring0(uint64_t n)
{
    uint64_t done;

    if (current_cpl() != 0)
        return ~0ul;
    for (done = 0; done < n; done++) {
        __asm__ volatile("leaq 1f(%%rip), %%rax\n\t"
                         "movq %%rax, %[rip]\n\t"
                         "pushfq\n\t"
                         "popq %[rflags]\n\t"
                         "movq %%rsp, %[rsp]\n\t"
                         "int3\n"
                         "1:"
                         : [rip] "=m"(expected_rip), [rflags] "=m"(expected_rflags),
                           [rsp] "=m"(expected_rsp)
                         :
                         : "rax", "memory");
    }
    return done;
}

static int int3_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", INT3_DEFAULT);

    hook_runs = 0;
    breakpoint_hook = int3_on_breakpoint;
    uint64_t done = ring0_call(int3_ring0, n);
    breakpoint_hook = NULL;

    uint64_t count = hook_runs;
    mailbox.counter = count;
    if (done == ~0ul) {
        guest_printf(GUEST_PREFIX "int3 FAILED ring-0 call did not run in ring 0\n");
        return EXIT_FAILURE;
    }
    if (count != n || done != n) {
        guest_printf(GUEST_PREFIX "int3 FAILED count=%lu expected=%lu\n", count, n);
        return EXIT_FAILURE;
    }
    guest_printf(GUEST_PREFIX "int3 ok count=%lu\n", count);
    return EXIT_OK;
}

SCENARIO("int3", int3_run);
