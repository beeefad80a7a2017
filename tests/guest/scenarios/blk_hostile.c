/* blk-hostile: give blk0 one deliberately broken request (avmm.hostile=):
 *   loop  a read whose last descriptor (the status byte) has NEXT pointing
 *         back at the head: a chain that never ends;
 *   oob   a read whose data descriptor points at 0x4000000000 (256 GiB),
 *         far above any RAM the test VMs have;
 *   len   a read whose header descriptor is 8 bytes instead of 16 (and is
 *         the only device-readable one, so the header is truly short);
 * then watch Status for DEVICE_NEEDS_RESET for up to 5 s (stopping early if
 * the device completes the request instead), reset the device, initialise it
 * again and read sector 0 to show that it works. */
#include "guest.h"
#include "timer.h"
#include "virtio_blk.h"

#define HOSTILE_WAIT_MS 5000
#define HOSTILE_OOB_ADDR 0x4000000000ULL

static struct virtio_blk_req_header header __attribute__((aligned(16)));
static volatile uint8_t status_byte;

static bool option_is(const char *value, size_t len, const char *word)
{
    return strlen(word) == len && memcmp(value, word, len) == 0;
}

static int blk_hostile_run(void)
{
    const char *kind;
    size_t kind_len;
    if (!cmdline_get("avmm.hostile", &kind, &kind_len))
        guest_panic("avmm.hostile: loop, oob or len");
    bool loop = option_is(kind, kind_len, "loop");
    bool oob = option_is(kind, kind_len, "oob");
    bool len = option_is(kind, kind_len, "len");
    if (!loop && !oob && !len)
        guest_panic("avmm.hostile: loop, oob or len, not %.*s", (int)kind_len, kind);

    if (!blk_any())
        return EXIT_FAILURE;
    struct blk blk;
    if (!blk_open(&blk, 0))
        return EXIT_FAILURE;
    struct virtq *vq = &blk.dev->queues[0];
    if (vq->num < 3) {
        guest_printf(GUEST_PREFIX "blk0 queue too small for the hostile chain\n");
        return EXIT_FAILURE;
    }

    /* A fresh queue: descriptors 0, 1, 2 are free; write them by hand. */
    header.type = VIRTIO_BLK_T_IN;
    header.reserved = 0;
    header.sector = 0;
    status_byte = 0xff;
    struct virtq_desc *d = vq->desc;
    d[0] = (struct virtq_desc){(uintptr_t)&header, len ? 8 : sizeof(header), VIRTQ_DESC_F_NEXT,
                               1};
    d[1] = (struct virtq_desc){oob ? HOSTILE_OOB_ADDR : (uintptr_t)blk_buffer, 512,
                               VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2};
    d[2] = (struct virtq_desc){(uintptr_t)&status_byte, 1,
                               (uint16_t)(VIRTQ_DESC_F_WRITE | (loop ? VIRTQ_DESC_F_NEXT : 0)),
                               0};
    virtq_add_raw(vq, 0);
    virtq_kick(vq);

    bool needs_reset = false, completed = false;
    uint64_t deadline = timer_deadline(HOSTILE_WAIT_MS);
    while (!timer_expired(deadline)) {
        if (virtio_status(blk.dev) & VIRTIO_STATUS_DEVICE_NEEDS_RESET) {
            needs_reset = true;
            break;
        }
        if (*(volatile uint16_t *)&vq->used->idx != 0) {
            completed = true;
            needs_reset = (virtio_status(blk.dev) & VIRTIO_STATUS_DEVICE_NEEDS_RESET) != 0;
            break;
        }
        for (unsigned spin = 0; spin < 1024; spin++)
            cpu_relax();
    }
    guest_printf(GUEST_PREFIX "blk0 needs_reset=%u\n", needs_reset ? 1 : 0);
    if (completed)
        guest_printf(GUEST_PREFIX "blk0 hostile request completed status=%s\n",
                     blk_status_name(status_byte));
    else if (!needs_reset)
        guest_printf(GUEST_PREFIX "blk0 hostile request not completed\n");

    /* Reset (waits for Status to read 0), initialise again, read. */
    if (!virtio_reset(blk.dev) || !blk_reopen(&blk))
        return EXIT_FAILURE;
    if (!blk_read(&blk, 0, 1))
        return EXIT_FAILURE;
    blk_close(&blk);
    guest_printf(GUEST_PREFIX "blk0 recovered=ok\n");
    return EXIT_OK;
}

SCENARIO("blk-hostile", blk_hostile_run);
