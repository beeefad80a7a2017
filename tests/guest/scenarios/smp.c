/* smp: the boot CPU starts every other CPU itself (INIT, SIPI, SIPI through
 * its xAPIC) and waits for each to report in; see README.md, "smp". */
#include "guest.h"
#include "smp.h"
#include "timer.h"

#define ICR_DELIVERY_INIT    (5u << 8)
#define ICR_DELIVERY_STARTUP (6u << 8)
#define ICR_LEVEL_ASSERT     (1u << 14)
#define ICR_DELIVERY_PENDING (1u << 12)
#define SVR_APIC_ENABLE      (1u << 8)
#define SVR_SPURIOUS_VECTOR  0xff

/* How long to poll the delivery-status bit (iterations of an interpreted
 * ring-0 loop; it is clear at once on every VMM we know). */
#define ICR_POLL_LIMIT       100000
/* The waits of the SDM's INIT-SIPI-SIPI sequence, and how long all APs may
 * take to report in. */
#define INIT_WAIT_US         10000
#define SIPI_WAIT_US         200
#define REPORT_TIMEOUT_MS    5000

static void cpuid_count(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b,
                        uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Number of logical CPUs in the package: leaf 0xB (the level of type "core"
 * counts them all), else leaf 1 EBX[23:16] when HTT says it is valid, else 1.
 * avmm.cpus=N overrides it, for a VMM whose CPUID says something else. */
static uint64_t cpu_count(void)
{
    uint32_t a, b, c, d;

    cpuid_count(0, 0, &a, &b, &c, &d);
    uint32_t max_leaf = a;
    if (max_leaf >= 0xb) {
        for (uint32_t level = 0; level < 8; level++) {
            cpuid_count(0xb, level, &a, &b, &c, &d);
            uint32_t type = (c >> 8) & 0xff;
            if (type == 0)
                break;
            if (type == 2 && (b & 0xffff))
                return cmdline_get_u64("avmm.cpus", b & 0xffff);
        }
    }
    cpuid_count(1, 0, &a, &b, &c, &d);
    uint32_t n = (d & (1u << 28)) ? (b >> 16) & 0xff : 1;
    return cmdline_get_u64("avmm.cpus", n ? n : 1);
}

/* The xAPIC page is in the guest's identity map (the uncached fourth GiB). */
static uint32_t apic_read(uint32_t reg)
{
    return mmio_read32(APIC_BASE_ADDR + reg);
}

static void apic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(APIC_BASE_ADDR + reg, value);
}

/* Ring 0: software-enable the local APIC (as an OS does before its first
 * IPI; interrupts stay off and no vector above 31 has a gate). */
static uint64_t apic_enable(uint64_t unused)
{
    (void)unused;
    apic_write(APIC_SVR, apic_read(APIC_SVR) | SVR_APIC_ENABLE | SVR_SPURIOUS_VECTOR);
    return 0;
}

/* Ring 0: send one IPI, arg = destination APIC ID << 32 | ICR low word, and
 * wait for the delivery-status bit to clear. Returns 0, or 1 if it stayed set. */
static uint64_t apic_send_ipi(uint64_t arg)
{
    apic_write(APIC_ICR_HIGH, (uint32_t)(arg >> 32) << 24);
    apic_write(APIC_ICR_LOW, (uint32_t)arg);
    for (int i = 0; i < ICR_POLL_LIMIT; i++) {
        if (!(apic_read(APIC_ICR_LOW) & ICR_DELIVERY_PENDING))
            return 0;
    }
    return 1;
}

static void wait_us(uint64_t us)
{
    uint64_t deadline = rdtsc() + us * timer_tsc_khz() / 1000 + 1;
    while (!timer_expired(deadline))
        __asm__ volatile("pause");
}

static int send_ipi(uint32_t apic_id, uint32_t icr_low, const char *what)
{
    if (ring0_call(apic_send_ipi, (uint64_t)apic_id << 32 | icr_low) == 0)
        return 0;
    guest_printf(GUEST_PREFIX "smp %s to apic %u FAIL (delivery status stays pending)\n",
                 what, apic_id);
    return 1;
}

static int smp_run(void)
{
    uint64_t count = cpu_count();
    if (count < 1 || count > SMP_MAX_CPUS) {
        guest_printf(GUEST_PREFIX "smp cpus=%lu FAIL (1..%u supported)\n", count,
                     SMP_MAX_CPUS);
        return 1;
    }
    uint32_t cpus = (uint32_t)count;
    uint32_t a, b, c, d;
    cpuid_count(1, 0, &a, &b, &c, &d);
    uint32_t self = b >> 24; /* initial APIC ID */

    memcpy((void *)(uintptr_t)SMP_TRAMPOLINE_ADDR, smp_trampoline_start,
           (size_t)(smp_trampoline_end - smp_trampoline_start));
    if (self < SMP_MAX_CPUS)
        smp_seen[self] = 1;
    __atomic_fetch_add(&smp_reported, 1, __ATOMIC_SEQ_CST);

    /* APIC IDs 0..cpus-1: the topology avmm and QEMU give a VM of one package
     * with one thread per core. One AP at a time, as the SDM describes. */
    ring0_call(apic_enable, 0);
    const uint32_t vector = SMP_TRAMPOLINE_ADDR >> 12;
    for (uint32_t id = 0; id < cpus; id++) {
        if (id == self)
            continue;
        if (send_ipi(id, ICR_DELIVERY_INIT | ICR_LEVEL_ASSERT, "INIT"))
            return 1;
        wait_us(INIT_WAIT_US);
        for (int sipi = 0; sipi < 2; sipi++) {
            if (send_ipi(id, ICR_DELIVERY_STARTUP | vector, "SIPI"))
                return 1;
            wait_us(SIPI_WAIT_US);
        }
    }

    uint64_t deadline = timer_deadline(REPORT_TIMEOUT_MS);
    while (smp_reported < cpus && !timer_expired(deadline))
        __asm__ volatile("pause");
    uint32_t reported = __atomic_load_n(&smp_reported, __ATOMIC_SEQ_CST);
    mailbox.counter = reported;

    char ids[SMP_MAX_CPUS * 4 + 1];
    size_t len = 0;
    ids[0] = '\0';
    for (uint32_t id = 0; id < SMP_MAX_CPUS; id++) {
        if (smp_seen[id])
            len += guest_snprintf(ids + len, sizeof(ids) - len, "%s%u", len ? "," : "", id);
    }
    guest_printf(GUEST_PREFIX "smp cpus=%u reported=%u apic_ids=%s\n", cpus, reported, ids);
    if (reported != cpus) {
        guest_printf(GUEST_PREFIX "smp FAIL (%u of %u CPUs reported in within %u ms)\n",
                     reported, cpus, REPORT_TIMEOUT_MS);
        return 1;
    }
    return 0;
}

SCENARIO("smp", smp_run);
