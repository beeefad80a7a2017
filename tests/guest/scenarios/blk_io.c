/* blk-io: write avmm.n sectors (default 1) of the pattern with seed 7 to blk0,
 * one sector per request from sector 0, stop at the first one that fails and
 * report it; then FLUSH (when offered) and report a failing flush the same
 * way, with sector=<n>. For host tests whose image cannot take the writes
 * (a full file system): the line is the result, the exit code is 0 whatever
 * the status. Mailbox counter: sectors written successfully. */
#include "guest.h"
#include "pattern.h"
#include "virtio_blk.h"

#define BLK_IO_SEED 7

static int blk_io_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", 1);

    if (!blk_any())
        return EXIT_FAILURE;
    struct blk blk;
    if (!blk_open(&blk, 0))
        return EXIT_FAILURE;
    if (n > blk.capacity) {
        guest_printf(GUEST_PREFIX "blk0 avmm.n=%lu exceeds the capacity of %lu sectors\n", n,
                     blk.capacity);
        return EXIT_FAILURE;
    }
    uint8_t status = VIRTIO_BLK_S_OK;
    uint64_t sector;
    for (sector = 0; sector < n; sector++) {
        pattern_fill(BLK_IO_SEED, sector, 1, blk_buffer);
        status = blk_request(&blk, VIRTIO_BLK_T_OUT, sector, 1);
        if (status != VIRTIO_BLK_S_OK)
            break;
        mailbox.counter = sector + 1;
    }
    if (status == VIRTIO_BLK_S_OK && blk.flush)
        status = blk_request(&blk, VIRTIO_BLK_T_FLUSH, 0, 0);
    guest_printf(GUEST_PREFIX "blk0 status=%s sector=%lu\n", blk_status_name(status), sector);
    blk_close(&blk);
    return EXIT_OK;
}

SCENARIO("blk-io", blk_io_run);
