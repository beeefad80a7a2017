/* high-mem: touch guest RAM above 4 GiB from ring 3 and check it holds data.
 *
 * Options: avmm.addr (default 0x100000000, 4 GiB), avmm.size (bytes, default
 * 1 MiB), avmm.seed (default 1). The range must be 512-byte aligned and lie in
 * the fifth GiB, which the guest's page tables map like RAM (tables.S); the
 * VM must have RAM there (avmm: more than 3 GiB, the rest continues at 4 GiB).
 *
 * The guest first reads the u64 at avmm.addr (so a host that wrote a token
 * there before the guest ran sees it come back), then writes the blk test
 * pattern over the range (512-byte "sectors" numbered from 0 at avmm.addr,
 * see README.md) and reads it all back. Output:
 *     high-mem addr=0x<a> size=<n> before=0x<u64> verify=ok
 * or "high-mem verify=FAIL offset=0x<o>" (exit 1). Mailbox counter: bytes
 * written and verified. */
#include "guest.h"
#include "pattern.h"

#define HIGH_WINDOW_START 0x100000000ULL /* 4 GiB */
#define HIGH_WINDOW_END   0x140000000ULL /* 5 GiB: the end of the identity map */

static int high_mem_run(void)
{
    uint64_t addr = cmdline_get_u64("avmm.addr", HIGH_WINDOW_START);
    uint64_t size = cmdline_get_u64("avmm.size", 1 << 20);
    uint64_t seed = cmdline_get_u64("avmm.seed", 1);

    if (addr % SECTOR_SIZE || size % SECTOR_SIZE || size == 0)
        guest_panic("avmm.addr and avmm.size: must be nonzero multiples of 512");
    if (addr < HIGH_WINDOW_START || addr >= HIGH_WINDOW_END || size > HIGH_WINDOW_END - addr)
        guest_panic("avmm.addr/avmm.size: the range must lie in 0x%llx..0x%llx",
                    HIGH_WINDOW_START, HIGH_WINDOW_END);

    volatile uint64_t *first = (volatile uint64_t *)(uintptr_t)addr;
    uint64_t before = *first;
    uint64_t sectors = size / SECTOR_SIZE;
    pattern_fill(seed, 0, sectors, (void *)(uintptr_t)addr);
    __asm__ volatile("" ::: "memory");
    uint64_t good = pattern_check(seed, 0, sectors, (const void *)(uintptr_t)addr);
    if (good != sectors) {
        guest_printf(GUEST_PREFIX "high-mem verify=FAIL offset=0x%lx\n", good * SECTOR_SIZE);
        return EXIT_FAILURE;
    }
    mailbox.counter = size;
    guest_printf(GUEST_PREFIX "high-mem addr=0x%lx size=%lu before=0x%lx verify=ok\n", addr,
                 size, before);
    return EXIT_OK;
}

SCENARIO("high-mem", high_mem_run);
