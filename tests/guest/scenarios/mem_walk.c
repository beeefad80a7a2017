/* mem-walk: a ring-3 workload over guest RAM whose progress a snapshot can
 * interrupt, and whose output says whether the restored guest went on exactly
 * where it stopped (README.md, "mem-walk").
 *
 * Options: avmm.mib=M (default 16), avmm.rounds=R (default 8), avmm.seed=S
 * (default 1), avmm.base=B (default 0x400000, 4 KiB aligned; the range must
 * end below the 32-bit MMIO hole at 3 GiB), avmm.rate=K (KiB/s; default 0:
 * unpaced): the rounds' rewrites dirty at most K KiB of the range per second,
 * for a live migration to chase (the fill and the checks are not paced).
 *
 * Word i (u64, counted from B) of a page last written in round g holds
 *     splitmix64(S * 0x9E3779B97F4A7C15 + (g << 48) + i)
 * (g = 0: the initial fill). Round r (1..R) rewrites every page p with
 * p % 4 == r % 4, then checks every word of the M MiB against what it must
 * hold after round r and takes the CRC-32 of all of it, so each round's CRC
 * depends on S, M and r only. Output per round, then at the end:
 *     mem-walk round=<r> crc=<crc32, 8 hex digits>
 *     mem-walk done rounds=<R> verify=ok
 * or, at the first wrong word, "mem-walk done rounds=<r> verify=FAIL at
 * 0x<address>" and exit 1. Mailbox counter: the last round completed (0
 * while filling). */
#include "crc32.h"
#include "guest.h"
#include "pattern.h"
#include "timer.h"

#define MEM_WALK_BASE_DEFAULT 0x400000ULL
/* The image and its mailbox end at 0x201000 (README.md, "Image and loader
 * contract"); stay clear of them. */
#define MEM_WALK_BASE_MIN     0x300000ULL
/* Low RAM ends where the 32-bit MMIO hole starts (avmm and QEMU microvm). */
#define MEM_WALK_LIMIT        0xC0000000ULL
#define MEM_WALK_PAGE         4096u
#define MEM_WALK_PAGE_WORDS   (MEM_WALK_PAGE / 8)
/* Each round rewrites one page in MEM_WALK_STRIDE. */
#define MEM_WALK_STRIDE       4u
/* The generation sits above every word index (2^48 words = 2 PiB). */
#define MEM_WALK_GEN_SHIFT    48

static inline uint64_t word_value(uint64_t seed, uint64_t generation, uint64_t index)
{
    return splitmix64(seed * PATTERN_GOLDEN + (generation << MEM_WALK_GEN_SHIFT) + index);
}

/* The round that last wrote `page` once round `round` is over (0: the fill). */
static uint64_t page_generation(uint64_t page, uint64_t round)
{
    uint64_t phase = page % MEM_WALK_STRIDE;
    uint64_t back = (round + MEM_WALK_STRIDE - phase) % MEM_WALK_STRIDE;
    return back >= round ? 0 : round - back;
}

static void write_page(uint64_t *words, uint64_t seed, uint64_t generation, uint64_t page)
{
    uint64_t first = page * MEM_WALK_PAGE_WORDS;
    for (unsigned j = 0; j < MEM_WALK_PAGE_WORDS; j++)
        words[first + j] = word_value(seed, generation, first + j);
}

/* Paces page rewrites at a set rate on the TSC (ring 3 reads it natively). A
 * page may be written once its slot on the schedule has come; a writer that fell
 * behind (the checks between rounds, a descheduled vCPU, a migration's
 * hand-over moving the TSC) starts the schedule again from now instead of
 * catching up in a burst, so no interval ever sees more than its share plus one
 * page. */
struct pacer {
    uint64_t ticks_per_page; /* 0: unpaced */
    uint64_t next;           /* TSC value at which the next page may be written */
};

static void pacer_init(struct pacer *pacer, uint64_t kib_per_s)
{
    pacer->ticks_per_page = 0;
    pacer->next = 0;
    if (kib_per_s) {
        /* kHz * 1000 ticks per second, K * 1024 / 4096 = K / 4 pages per second. */
        uint64_t ticks = timer_tsc_khz() * 1000 * 4 / kib_per_s;
        pacer->ticks_per_page = ticks ? ticks : 1;
    }
}

static void pacer_wait(struct pacer *pacer)
{
    if (!pacer->ticks_per_page)
        return;
    uint64_t now = rdtsc();
    if ((int64_t)(now - pacer->next) > (int64_t)pacer->ticks_per_page)
        pacer->next = now; /* fell behind: no burst to catch up */
    while ((int64_t)(rdtsc() - pacer->next) < 0)
        __asm__ volatile("pause");
    pacer->next += pacer->ticks_per_page;
}

static int mem_walk_run(void)
{
    uint64_t mib = cmdline_get_u64("avmm.mib", 16);
    uint64_t rounds = cmdline_get_u64("avmm.rounds", 8);
    uint64_t seed = cmdline_get_u64("avmm.seed", 1);
    uint64_t base = cmdline_get_u64("avmm.base", MEM_WALK_BASE_DEFAULT);
    uint64_t rate = cmdline_get_u64("avmm.rate", 0);

    if (mib == 0 || mib > MEM_WALK_LIMIT >> 20)
        guest_panic("avmm.mib: must be 1..%llu", MEM_WALK_LIMIT >> 20);
    if (rounds >= 1ULL << (64 - MEM_WALK_GEN_SHIFT))
        guest_panic("avmm.rounds: must be below %llu", 1ULL << (64 - MEM_WALK_GEN_SHIFT));
    if (base % MEM_WALK_PAGE || base < MEM_WALK_BASE_MIN || base > MEM_WALK_LIMIT ||
        (mib << 20) > MEM_WALK_LIMIT - base)
        guest_panic("avmm.base: must be 4 KiB aligned, at or above 0x%llx, with the range "
                    "below 0x%llx", MEM_WALK_BASE_MIN, MEM_WALK_LIMIT);

    /* 2^32 KiB/s (4 TiB/s) is beyond any memory bus: a typo, not a rate. */
    if (rate >= 1ULL << 32)
        guest_panic("avmm.rate: must be below %llu KiB/s", 1ULL << 32);

    uint64_t *words = (uint64_t *)(uintptr_t)base;
    uint64_t pages = (mib << 20) / MEM_WALK_PAGE;
    struct pacer pacer;
    pacer_init(&pacer, rate);

    /* Scratch word 0: pages written or checked so far, stored after each page, so
     * that an observer outside the guest sees it make progress every page (the
     * live-migration benchmark times the guest's longest stall with it). */
    volatile uint64_t *progress = (volatile uint64_t *)mailbox.scratch;
    uint64_t done = 0;
    *progress = 0;
    mailbox.counter = 0;
    for (uint64_t p = 0; p < pages; p++) {
        write_page(words, seed, 0, p);
        *progress = ++done;
    }

    for (uint64_t round = 1; round <= rounds; round++) {
        for (uint64_t p = round % MEM_WALK_STRIDE; p < pages; p += MEM_WALK_STRIDE) {
            pacer_wait(&pacer);
            write_page(words, seed, round, p);
            *progress = ++done;
        }
        /* The checks below must read memory, not what the compiler remembers. */
        __asm__ volatile("" ::: "memory");

        uint32_t crc = 0;
        for (uint64_t p = 0; p < pages; p++) {
            uint64_t generation = page_generation(p, round);
            uint64_t first = p * MEM_WALK_PAGE_WORDS;
            for (unsigned j = 0; j < MEM_WALK_PAGE_WORDS; j++) {
                if (words[first + j] != word_value(seed, generation, first + j)) {
                    guest_printf(GUEST_PREFIX "mem-walk done rounds=%lu verify=FAIL at 0x%lx\n",
                                 round, base + (first + j) * 8);
                    return EXIT_FAILURE;
                }
            }
            crc = crc32_update(crc, &words[first], MEM_WALK_PAGE);
            *progress = ++done;
        }
        guest_printf(GUEST_PREFIX "mem-walk round=%lu crc=%08x\n", round, crc);
        mailbox.counter = round;
    }
    guest_printf(GUEST_PREFIX "mem-walk done rounds=%lu verify=ok\n", rounds);
    return EXIT_OK;
}

SCENARIO("mem-walk", mem_walk_run);
