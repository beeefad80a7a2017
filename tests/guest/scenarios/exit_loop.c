/* exit-loop: avmm.n (default 1000) VM exits of one kind, for benchmarks
 * (benchmarks/run.py). avmm.kind selects what each exit is:
 *
 *   pio    (default) byte writes to port 0x510, which no device claims;
 *   mmio   32-bit writes to 0xd8000000, in the uncached fourth GiB but outside
 *          every virtio-mmio window (avmm's start at 0xd0000000, QEMU
 *          microvm's at 0xfeb00000);
 *   uart   byte writes to COM1's scratch register (port 0x3ff), which the
 *          16550 model of either VMM stores: the PIO a real guest pays, a
 *          register of a device model;
 *   virtio 32-bit reads of the Version register of rng0's virtio-mmio window
 *          (the VMM must have a virtio-rng device): the MMIO a real guest pays.
 *          Reads, because every virtio-mmio register a driver writes has side
 *          effects; Version has none and reads 2 on both VMMs.
 *
 * Nothing claims the first two, so a VMM may answer them on a shortcut; the
 * last two go through the VMM's device models. Each access is one exit to the
 * VMM. The host measures wall time; the guest also reports the TSC ticks the
 * loop took (cycles=...), for people. Mailbox counter: N. */
#include "guest.h"
#include "timer.h"
#include "virtio.h"

#define EXIT_LOOP_PORT 0x510
#define EXIT_LOOP_MMIO 0xd8000000ULL
#define COM1_SCRATCH   0x3ff

enum exit_kind { KIND_PIO, KIND_MMIO, KIND_UART, KIND_VIRTIO };

static const char *const kind_names[] = {"pio", "mmio", "uart", "virtio"};

static bool parse_kind(enum exit_kind *out)
{
    const char *kind = "pio";
    size_t len = 3;

    cmdline_get("avmm.kind", &kind, &len);
    for (unsigned i = 0; i < sizeof(kind_names) / sizeof(kind_names[0]); i++) {
        if (strlen(kind_names[i]) == len && memcmp(kind, kind_names[i], len) == 0) {
            *out = (enum exit_kind)i;
            return true;
        }
    }
    guest_printf(GUEST_PREFIX "avmm.kind: must be pio, mmio, uart or virtio, not %.*s\n",
                 (int)len, kind);
    return false;
}

static int exit_loop_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", 1000);
    enum exit_kind kind;
    uint64_t version_register = 0;

    if (!parse_kind(&kind))
        return EXIT_FAILURE;
    if (kind == KIND_VIRTIO) {
        struct virtio_dev *dev = virtio_find(VIRTIO_ID_ENTROPY, 0);
        if (!dev) {
            guest_printf(GUEST_PREFIX "exit-loop kind=virtio: no virtio-rng device\n");
            return EXIT_FAILURE;
        }
        version_register = dev->base + VIRTIO_MMIO_VERSION;
    }
    uint32_t mismatches = 0;
    uint64_t start = rdtsc();
    switch (kind) {
    case KIND_PIO:
        for (uint64_t i = 0; i < n; i++)
            outb(EXIT_LOOP_PORT, (uint8_t)i);
        break;
    case KIND_MMIO:
        for (uint64_t i = 0; i < n; i++)
            mmio_write32(EXIT_LOOP_MMIO, (uint32_t)i);
        break;
    case KIND_UART:
        for (uint64_t i = 0; i < n; i++)
            outb(COM1_SCRATCH, (uint8_t)i);
        break;
    case KIND_VIRTIO:
        /* Counting wrong answers keeps each read a real one the VMM must serve. */
        for (uint64_t i = 0; i < n; i++)
            mismatches += mmio_read32(version_register) != 2;
        break;
    }
    uint64_t cycles = rdtsc() - start;
    if (mismatches) {
        guest_printf(GUEST_PREFIX "exit-loop kind=virtio: Version read other than 2 %u times\n",
                     mismatches);
        return EXIT_FAILURE;
    }
    /* Read back with n = 0 too, so that the n - 0 difference holds n exits. */
    uint8_t scratch = kind == KIND_UART ? inb(COM1_SCRATCH) : 0;
    if (kind == KIND_UART && n > 0 && scratch != (uint8_t)(n - 1)) {
        guest_printf(GUEST_PREFIX "exit-loop kind=uart: the scratch register lost its value\n");
        return EXIT_FAILURE;
    }
    mailbox.counter = n;
    guest_printf(GUEST_PREFIX "exit-loop kind=%s n=%lu done cycles=%lu\n", kind_names[kind], n,
                 cycles);
    return EXIT_OK;
}

SCENARIO("exit-loop", exit_loop_run);
