#include "guest.h"

/* How long to give a VMM to act on the i8042 reset before falling back to
 * the debug-exit port. QEMU handles the reset asynchronously (TCG even runs
 * on to the end of the current translation block), so the fallback must not
 * follow the reset write directly. Under TCG every pause ends the block,
 * so this is about 10 ms there and a few ms on hardware. */
#define RESET_GRACE_SPINS (1u << 16)

void guest_exit(int code)
{
    if (code == EXIT_OK) {
        /* i8042 "pulse reset line": avmm and Firecracker stop the VM; QEMU
         * with -no-reboot exits 0 (when the machine has an i8042). */
        outb(PORT_I8042_COMMAND, 0xfe);
        for (unsigned i = 0; i < RESET_GRACE_SPINS; i++)
            cpu_relax();
    }
    /* QEMU isa-debug-exit: the VMM exits with status (code << 1) | 1. */
    outb(PORT_DEBUG_EXIT, (uint8_t)code);

    /* Nobody stopped us. hlt would fault in ring 3, so spin there. */
    if (current_cpl() == 0) {
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    for (;;)
        cpu_relax();
}
