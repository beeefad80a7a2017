/* fault: raise a CPU exception in ring 3 on purpose, to check the exception
 * report and the failure exit. avmm.fault=ud (default), gp, pf, de or bp. */
#include "guest.h"

/* Well above anything the page tables map (they cover 0..4 GiB). */
#define UNMAPPED_ADDRESS 0x4000000000ULL

static int fault_run(void)
{
    const char *kind = "ud";
    size_t len = 2;

    cmdline_get("avmm.fault", &kind, &len);
    if (len == 2 && memcmp(kind, "ud", 2) == 0) {
        __asm__ volatile("ud2");
    } else if (len == 2 && memcmp(kind, "gp", 2) == 0) {
        __asm__ volatile("hlt"); /* privileged: #GP in ring 3 */
    } else if (len == 2 && memcmp(kind, "pf", 2) == 0) {
        (void)mmio_read32(UNMAPPED_ADDRESS);
    } else if (len == 2 && memcmp(kind, "de", 2) == 0) {
        uint64_t zero = 0;
        __asm__ volatile("" : "+r"(zero));
        uint64_t quotient = 1, remainder = 0;
        __asm__ volatile("divq %2" : "+a"(quotient), "+d"(remainder) : "r"(zero));
    } else if (len == 2 && memcmp(kind, "bp", 2) == 0) {
        /* The #BP gate has DPL 0, so this is #GP (err 3 * 8 + 2 = 0x1a). */
        __asm__ volatile("int3");
    } else {
        guest_printf(GUEST_PREFIX "unknown avmm.fault=%.*s\n", (int)len, kind);
        return EXIT_FAILURE;
    }
    guest_printf(GUEST_PREFIX "fault: no exception\n");
    return EXIT_FAILURE;
}

SCENARIO("fault", fault_run);
