/* rng: read 32 bytes from rng0 (virtio entropy device, spec 5.4) and print
 * them in hex; all zero is a failure. The device may return fewer bytes than
 * asked for; the driver asks again for the rest. */
#include "guest.h"
#include "virtio.h"

#define RNG_BYTES 32

static uint8_t entropy[RNG_BYTES] __attribute__((aligned(16)));

static int rng_run(void)
{
    struct virtio_dev *dev = virtio_find(VIRTIO_ID_ENTROPY, 0);
    if (!dev) {
        guest_printf(GUEST_PREFIX "no virtio-rng device\n");
        return EXIT_FAILURE;
    }
    if (!virtio_begin_init(dev, 0) || !virtio_setup_queue(dev, 0) || !virtio_driver_ok(dev))
        return EXIT_FAILURE;
    struct virtq *vq = &dev->queues[0];

    memset(entropy, 0, sizeof(entropy));
    uint32_t have = 0;
    for (unsigned tries = 0; have < RNG_BYTES; tries++) {
        if (tries == 64) {
            guest_printf(GUEST_PREFIX "rng0 FAIL only %u bytes after %u requests\n", have,
                         tries);
            return EXIT_FAILURE;
        }
        struct virtq_buf buf = {(uintptr_t)entropy + have, RNG_BYTES - have, true};
        if (virtq_add(vq, &buf, 1, false) < 0)
            guest_panic("rng0: queue full");
        virtq_kick(vq);
        uint16_t head;
        uint32_t len;
        virtq_wait_used_or_die(vq, VIRTIO_TIMEOUT_MS, &head, &len);
        if (len > RNG_BYTES - have) {
            guest_printf(GUEST_PREFIX "rng0 FAIL used length %u for a %u-byte buffer\n", len,
                         RNG_BYTES - have);
            return EXIT_FAILURE;
        }
        have += len;
    }
    if (!virtio_reset(dev))
        return EXIT_FAILURE;

    char hex[2 * RNG_BYTES + 1];
    bool all_zero = true;
    for (unsigned i = 0; i < RNG_BYTES; i++) {
        guest_snprintf(hex + 2 * i, 3, "%02x", entropy[i]);
        all_zero &= entropy[i] == 0;
    }
    guest_printf(GUEST_PREFIX "rng0 %s\n", hex);
    if (all_zero) {
        guest_printf(GUEST_PREFIX "rng0 FAIL all bytes are zero\n");
        return EXIT_FAILURE;
    }
    mailbox.counter = RNG_BYTES;
    return EXIT_OK;
}

SCENARIO("rng", rng_run);
