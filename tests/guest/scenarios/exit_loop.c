/* exit-loop: avmm.n (default 1000) VM exits of one kind, for benchmarks
 * (benchmarks/run.py). avmm.kind=pio (default): byte writes to port 0x510,
 * which no device claims; avmm.kind=mmio: 32-bit writes to 0xd8000000, in the
 * uncached fourth GiB but outside every virtio-mmio window (avmm's start at
 * 0xd0000000, QEMU microvm's at 0xfeb00000). Each access is one exit to the
 * VMM, which drops it. The host measures wall time; the guest also reports
 * the TSC ticks the loop took (cycles=...), for people. Mailbox counter: N. */
#include "guest.h"
#include "timer.h"

#define EXIT_LOOP_PORT 0x510
#define EXIT_LOOP_MMIO 0xd8000000ULL

static int exit_loop_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", 1000);
    const char *kind = "pio";
    size_t len = 3;
    bool mmio;

    cmdline_get("avmm.kind", &kind, &len);
    if (len == 3 && memcmp(kind, "pio", 3) == 0) {
        mmio = false;
    } else if (len == 4 && memcmp(kind, "mmio", 4) == 0) {
        mmio = true;
    } else {
        guest_printf(GUEST_PREFIX "avmm.kind: must be pio or mmio, not %.*s\n", (int)len, kind);
        return EXIT_FAILURE;
    }
    uint64_t start = rdtsc();
    if (mmio) {
        for (uint64_t i = 0; i < n; i++)
            mmio_write32(EXIT_LOOP_MMIO, (uint32_t)i);
    } else {
        for (uint64_t i = 0; i < n; i++)
            outb(EXIT_LOOP_PORT, (uint8_t)i);
    }
    uint64_t cycles = rdtsc() - start;
    mailbox.counter = n;
    guest_printf(GUEST_PREFIX "exit-loop kind=%s n=%lu done cycles=%lu\n", mmio ? "mmio" : "pio", n,
                 cycles);
    return EXIT_OK;
}

SCENARIO("exit-loop", exit_loop_run);
