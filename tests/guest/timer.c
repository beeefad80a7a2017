#include "timer.h"

static uint64_t tsc_khz;

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static uint64_t detect_tsc_khz(void)
{
    uint32_t a, b, c, d;

    cpuid(0, &a, &b, &c, &d);
    uint32_t max_leaf = a;
    /* Leaf 0x15: TSC = crystal (ECX Hz) * EBX / EAX. */
    if (max_leaf >= 0x15) {
        cpuid(0x15, &a, &b, &c, &d);
        if (a && b && c)
            return (uint64_t)c * b / a / 1000;
    }
    /* Leaf 0x16: base frequency in MHz (close to the TSC rate on Intel). */
    if (max_leaf >= 0x16) {
        cpuid(0x16, &a, &b, &c, &d);
        if (a & 0xffff)
            return (uint64_t)(a & 0xffff) * 1000;
    }
    /* Hypervisor timing leaf (KVM with the right CPUID, VMware): EAX = kHz. */
    cpuid(1, &a, &b, &c, &d);
    if (c & (1u << 31)) {
        cpuid(0x40000000, &a, &b, &c, &d);
        if (a >= 0x40000010) {
            cpuid(0x40000010, &a, &b, &c, &d);
            if (a)
                return a;
        }
    }
    return TIMER_DEFAULT_TSC_KHZ;
}

uint64_t timer_tsc_khz(void)
{
    if (!tsc_khz)
        tsc_khz = detect_tsc_khz();
    return tsc_khz;
}

uint64_t timer_deadline(uint64_t ms)
{
    return rdtsc() + ms * timer_tsc_khz();
}
