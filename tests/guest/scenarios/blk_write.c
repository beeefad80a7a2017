/* blk-write: write the test pattern (avmm.seed, default 1) over every sector of
 * every virtio-blk device, flush (unless avmm.flush=0, which leaves the data in
 * the device's write cache for a host test of what the VMM flushes itself),
 * read it all back and compare. A read-only
 * device instead gets one write that must fail with IOERR and change nothing.
 * Mailbox counter: sectors written plus sectors verified so far. */
#include "guest.h"
#include "pattern.h"
#include "virtio_blk.h"

/* Sector 0 as read before the write attempt on a read-only device. */
static uint8_t before[512] __attribute__((aligned(8)));

static int readonly_check(struct blk *blk, unsigned i)
{
    if (!blk_read(blk, 0, 1))
        return EXIT_FAILURE;
    memcpy(before, blk_buffer, sizeof(before));
    /* Data that differs from what is there in every byte. */
    for (unsigned b = 0; b < 512; b++)
        blk_buffer[b] = before[b] ^ 0x5a;
    uint8_t status = blk_request(blk, VIRTIO_BLK_T_OUT, 0, 1);
    if (status != VIRTIO_BLK_S_IOERR) {
        guest_printf(GUEST_PREFIX "blk%u readonly write=%s FAIL (expected ioerr)\n", i,
                     blk_status_name(status));
        return EXIT_FAILURE;
    }
    if (!blk_read(blk, 0, 1))
        return EXIT_FAILURE;
    if (memcmp(before, blk_buffer, sizeof(before)) != 0) {
        guest_printf(GUEST_PREFIX "blk%u readonly write=ioerr FAIL (sector 0 changed)\n", i);
        return EXIT_FAILURE;
    }
    guest_printf(GUEST_PREFIX "blk%u readonly write=ioerr\n", i);
    return EXIT_OK;
}

static int write_verify(struct blk *blk, unsigned i, uint64_t seed, bool flush)
{
    for (uint64_t sector = 0; sector < blk->capacity;) {
        uint64_t left = blk->capacity - sector;
        uint32_t n = left < blk->max_sectors ? (uint32_t)left : blk->max_sectors;
        pattern_fill(seed, sector, n, blk_buffer);
        uint8_t status = blk_request(blk, VIRTIO_BLK_T_OUT, sector, n);
        if (status != VIRTIO_BLK_S_OK) {
            guest_printf(GUEST_PREFIX "blk%u write FAIL sector=%lu status=%s\n", i, sector,
                         blk_status_name(status));
            return EXIT_FAILURE;
        }
        sector += n;
        mailbox.counter += n;
    }
    if (!flush) {
        guest_printf(GUEST_PREFIX "blk%u flush=skipped (avmm.flush=0)\n", i);
    } else if (blk->flush) {
        uint8_t status = blk_request(blk, VIRTIO_BLK_T_FLUSH, 0, 0);
        if (status != VIRTIO_BLK_S_OK) {
            guest_printf(GUEST_PREFIX "blk%u flush FAIL status=%s\n", i,
                         blk_status_name(status));
            return EXIT_FAILURE;
        }
    } else {
        guest_printf(GUEST_PREFIX "blk%u flush=skipped (VIRTIO_BLK_F_FLUSH not offered)\n", i);
    }
    for (uint64_t sector = 0; sector < blk->capacity;) {
        uint64_t left = blk->capacity - sector;
        uint32_t n = left < blk->max_sectors ? (uint32_t)left : blk->max_sectors;
        memset(blk_buffer, 0, n * 512u);
        if (!blk_read(blk, sector, n))
            return EXIT_FAILURE;
        uint64_t bad = pattern_check(seed, sector, n, blk_buffer);
        if (bad != n) {
            guest_printf(GUEST_PREFIX "blk%u written=%lu verify=FAIL sector=%lu\n", i,
                         blk->capacity, sector + bad);
            return EXIT_FAILURE;
        }
        sector += n;
        mailbox.counter += n;
    }
    guest_printf(GUEST_PREFIX "blk%u written=%lu verify=ok\n", i, blk->capacity);
    return EXIT_OK;
}

static int blk_write_run(void)
{
    uint64_t seed = cmdline_get_u64("avmm.seed", 1);
    bool flush = cmdline_get_u64("avmm.flush", 1) != 0;

    if (!blk_any())
        return EXIT_FAILURE;
    unsigned count = virtio_count(VIRTIO_ID_BLOCK);
    for (unsigned i = 0; i < count; i++) {
        struct blk blk;
        if (!blk_open(&blk, i))
            return EXIT_FAILURE;
        int result = blk.readonly ? readonly_check(&blk, i) : write_verify(&blk, i, seed, flush);
        if (result != EXIT_OK)
            return result;
        blk_close(&blk);
    }
    return EXIT_OK;
}

SCENARIO("blk-write", blk_write_run);
