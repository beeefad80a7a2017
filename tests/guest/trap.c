/* Exception reporting. Runs in ring 0 on the boot stack (RSP0, or IST1 for #DF). */
#include "guest.h"

void exception_report(const struct exception_frame *frame)
{
    uint64_t cr2;

    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    /* The fault may have come before or during serial setup. */
    serial_init();
    /* The first line's format is a contract (README.md); the second is for people. */
    guest_printf(GUEST_PREFIX "exception %lu rip=0x%lx err=0x%lx\n", frame->vector,
                 frame->rip, frame->error_code);
    guest_printf(GUEST_PREFIX "  cs=0x%lx rflags=0x%lx rsp=0x%lx ss=0x%lx cr2=0x%lx\n",
                 frame->cs, frame->rflags, frame->rsp, frame->ss, cr2);
    guest_exit(EXIT_EXCEPTION);
}
