/* Deadlines from the TSC, readable in ring 3 (CR4.TSD is clear).
 *
 * There is no timer interrupt and no calibration source every VMM has, so the
 * TSC rate comes from CPUID (leaf 0x15, then 0x16, then the hypervisor leaf
 * 0x40000010) and falls back to TIMER_DEFAULT_TSC_KHZ. Timeouts are for "do
 * not hang forever", not for measuring: a guess that is too high only makes
 * them longer. */
#ifndef AVMM_GUEST_TIMER_H
#define AVMM_GUEST_TIMER_H

#include <stdbool.h>
#include <stdint.h>

#define TIMER_DEFAULT_TSC_KHZ 3000000ULL /* 3 GHz */

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* TSC ticks per millisecond (determined on first use). */
uint64_t timer_tsc_khz(void);

/* A deadline `ms` milliseconds from now. */
uint64_t timer_deadline(uint64_t ms);

static inline bool timer_expired(uint64_t deadline)
{
    return (int64_t)(rdtsc() - deadline) >= 0;
}

#endif
