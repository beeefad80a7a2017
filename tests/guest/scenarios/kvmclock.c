/* kvmclock: read KVM's paravirtual clock from ring 3 until the host says stop,
 * and report how it moved, so that a host test can pause the VM in between and
 * see what the guest saw.
 *
 * Needs KVM's CPUID signature and KVM_FEATURE_CLOCKSOURCE2 (leaf 0x40000001
 * EAX bit 3); without them: "kvmclock not offered ..." and exit 1. Ring 0
 * (ring0_call) writes MSR_KVM_SYSTEM_TIME_NEW with the address of a
 * pvclock_vcpu_time_info in .bss; everything else is ring 3: each read takes
 * the record's version (retrying while it is odd or changes), rdtsc and
 *     time = system_time + ((tsc - tsc_timestamp) << or >> tsc_shift) * mul >> 32.
 *
 * Between two consecutive reads the guest tracks the largest kvmclock step,
 * and the largest TSC gap (converted to ns with the record's scale) together
 * with the kvmclock step over that same gap: a pause of the VM shows up as
 * that TSC gap (the TSC keeps running while vCPUs are out of KVM_RUN), and the
 * kvmclock step over it is what the guest's clock jumped.
 *
 * Mailbox: counter = reads so far; scratch word 0 (offset 64) is the host's
 * stop request (nonzero: finish), word 1 (offset 72) the latest kvmclock
 * value in ns. Options: avmm.n = give up after this many kvmclock ns without
 * a stop request (default 120 s; exit 1). Output on success:
 *     kvmclock reads=<r> elapsed_ns=<e> max_step_ns=<m> tsc_gap_ns=<g> step_at_gap_ns=<s>
 */
#include "guest.h"
#include "timer.h"

#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define KVM_FEATURE_CLOCKSOURCE2 3

struct pvclock_vcpu_time_info {
    uint32_t version;
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time;
    uint32_t tsc_to_system_mul;
    int8_t tsc_shift;
    uint8_t flags;
    uint8_t pad[2];
} __attribute__((packed));

_Static_assert(sizeof(struct pvclock_vcpu_time_info) == 32, "pvclock record is 32 bytes");

/* Aligned so that it never crosses a page (KVM requires that). */
static volatile struct pvclock_vcpu_time_info pvti __attribute__((aligned(64)));

#define STOP_REQUEST (*(volatile uint64_t *)&mailbox.scratch[0])
#define LATEST_NS (*(volatile uint64_t *)&mailbox.scratch[8])

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static bool kvmclock_offered(void)
{
    uint32_t a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(c & (1u << 31)))
        return false;
    cpuid(0x40000000, &a, &b, &c, &d);
    /* "KVMKVMKVM\0\0\0" in EBX, ECX, EDX. */
    if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x0000004d || a < 0x40000001)
        return false;
    cpuid(0x40000001, &a, &b, &c, &d);
    return (a >> KVM_FEATURE_CLOCKSOURCE2) & 1;
}

/* Ring 0: point the vCPU's kvmclock at `paddr` and enable it (bit 0). */
static uint64_t enable_kvmclock(uint64_t paddr)
{
    uint64_t value = paddr | 1;
    __asm__ volatile("wrmsr" ::"c"(MSR_KVM_SYSTEM_TIME_NEW), "a"((uint32_t)value),
                     "d"((uint32_t)(value >> 32)));
    return 1;
}

static uint64_t scale(uint64_t delta, uint32_t mul, int8_t shift)
{
    if (shift < 0)
        delta >>= -shift;
    else
        delta <<= shift;
    return (uint64_t)(((unsigned __int128)delta * mul) >> 32);
}

static inline uint64_t ordered_rdtsc(void)
{
    __asm__ volatile("lfence" ::: "memory");
    return rdtsc();
}

struct clock_read {
    uint64_t ns;
    uint64_t tsc;
    uint32_t mul;
    int8_t shift;
};

static struct clock_read kvmclock_read(void)
{
    struct clock_read r;
    uint32_t version;
    do {
        version = pvti.version;
        __asm__ volatile("" ::: "memory");
        r.tsc = ordered_rdtsc();
        r.mul = pvti.tsc_to_system_mul;
        r.shift = pvti.tsc_shift;
        r.ns = pvti.system_time + scale(r.tsc - pvti.tsc_timestamp, r.mul, r.shift);
        __asm__ volatile("" ::: "memory");
    } while ((version & 1) || version != pvti.version);
    return r;
}

static int kvmclock_run(void)
{
    uint64_t limit_ns = cmdline_get_u64("avmm.n", 120ULL * 1000 * 1000 * 1000);

    if (!kvmclock_offered()) {
        guest_printf(GUEST_PREFIX "kvmclock not offered (no KVM signature or no "
                                  "KVM_FEATURE_CLOCKSOURCE2)\n");
        return EXIT_FAILURE;
    }
    ring0_call(enable_kvmclock, (uint64_t)(uintptr_t)&pvti);
    uint64_t deadline = timer_deadline(5000);
    while (pvti.version == 0 || pvti.tsc_to_system_mul == 0) {
        if (timer_expired(deadline)) {
            guest_printf(GUEST_PREFIX "kvmclock FAIL the hypervisor never filled the record\n");
            return EXIT_FAILURE;
        }
        __asm__ volatile("pause");
    }

    struct clock_read first = kvmclock_read(), previous = first;
    uint64_t reads = 1, max_step = 0, tsc_gap_ns = 0, step_at_gap = 0;
    while (!STOP_REQUEST) {
        struct clock_read now = kvmclock_read();
        reads++;
        if (now.ns < previous.ns) {
            guest_printf(GUEST_PREFIX "kvmclock FAIL went backwards from %lu to %lu ns\n",
                         previous.ns, now.ns);
            return EXIT_FAILURE;
        }
        uint64_t step = now.ns - previous.ns;
        uint64_t gap = scale(now.tsc - previous.tsc, now.mul, now.shift);
        if (step > max_step)
            max_step = step;
        if (gap > tsc_gap_ns) {
            tsc_gap_ns = gap;
            step_at_gap = step;
        }
        previous = now;
        LATEST_NS = now.ns;
        mailbox.counter = reads;
        if (now.ns - first.ns > limit_ns) {
            guest_printf(GUEST_PREFIX "kvmclock FAIL no stop request within %lu ns\n",
                         limit_ns);
            return EXIT_FAILURE;
        }
    }
    guest_printf(GUEST_PREFIX "kvmclock reads=%lu elapsed_ns=%lu max_step_ns=%lu "
                              "tsc_gap_ns=%lu step_at_gap_ns=%lu\n",
                 reads, previous.ns - first.ns, max_step, tsc_gap_ns, step_at_gap);
    return EXIT_OK;
}

SCENARIO("kvmclock", kvmclock_run);
