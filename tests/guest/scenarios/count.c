/* count: a tight ring-3 loop of avmm.n iterations (default 1000000) that
 * publishes its progress in the mailbox counter every 2^20 iterations. */
#include "guest.h"

#define COUNT_DEFAULT 1000000
#define COUNT_CHUNK   (1u << 20)

static int count_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", COUNT_DEFAULT);
    uint64_t done = 0;

    while (done < n) {
        uint64_t chunk = n - done < COUNT_CHUNK ? n - done : COUNT_CHUNK;
        /* The empty asm claims to change i, so the loop cannot be folded
         * away, yet compiles to inc/cmp/jcc. */
        for (uint64_t i = 0; i < chunk; i++)
            __asm__ volatile("" : "+r"(i));
        done += chunk;
        mailbox.counter = done;
    }
    mailbox.counter = n;
    guest_printf(GUEST_PREFIX "count done n=%lu\n", n);
    return 0;
}

SCENARIO("count", count_run);
