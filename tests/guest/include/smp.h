/* The smp scenario's numbers and its assembly side (smp.S), shared by C and
 * assembly. See README.md, "smp". */
#ifndef AVMM_GUEST_SMP_H
#define AVMM_GUEST_SMP_H

/* Where the AP start-up code is copied: a 4 KiB page below 1 MiB (SIPI vector
 * SMP_TRAMPOLINE_ADDR >> 12). Clear of avmm's boot structures (0x1000-0xefff,
 * command line 0x20000-0x2ffff), of the EBDA and ROM area (0x9fc00 up) and
 * of the guest itself (0x100000 up). */
#define SMP_TRAMPOLINE_ADDR 0x70000
/* APIC IDs 0..SMP_MAX_CPUS-1 can report in; each AP gets a stack this big. */
#define SMP_MAX_CPUS        64
#define SMP_AP_STACK_SIZE   1024

/* xAPIC registers (MMIO). */
#define APIC_BASE_ADDR      0xfee00000
#define APIC_ID             0x020
#define APIC_SVR            0x0f0
#define APIC_ICR_LOW        0x300
#define APIC_ICR_HIGH       0x310

#ifndef __ASSEMBLER__
#include <stdint.h>

/* The real-mode start-up code, [smp_trampoline_start, smp_trampoline_end),
 * position-independent within its page; copy it to SMP_TRAMPOLINE_ADDR. */
extern const char smp_trampoline_start[];
extern const char smp_trampoline_end[];

/* Set by each AP once it runs 64-bit code on the guest's tables: its flag
 * smp_seen[APIC ID] = 1 (IDs below SMP_MAX_CPUS), then smp_reported += 1
 * (locked, so the flag is visible first). The boot CPU reports in the same way. */
extern volatile uint8_t smp_seen[SMP_MAX_CPUS];
extern volatile uint32_t smp_reported;
#endif

#endif
