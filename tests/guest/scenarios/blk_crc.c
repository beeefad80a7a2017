/* blk-crc: read every sector of every virtio-blk device and print its CRC-32
 * (zlib's). Mailbox: counter = sectors read so far (all devices); scratch
 * u64[0] = devices done, u64[1 + 2i] = sectors of blk<i>, u64[2 + 2i] = its
 * CRC-32. */
#include "crc32.h"
#include "guest.h"
#include "virtio_blk.h"

static int blk_crc_run(void)
{
    volatile uint64_t *scratch = (volatile uint64_t *)mailbox.scratch;

    if (!blk_any())
        return EXIT_FAILURE;
    unsigned count = virtio_count(VIRTIO_ID_BLOCK);
    scratch[0] = 0;
    for (unsigned i = 0; i < count; i++) {
        struct blk blk;
        if (!blk_open(&blk, i))
            return EXIT_FAILURE;
        uint32_t crc = 0;
        for (uint64_t sector = 0; sector < blk.capacity;) {
            uint64_t left = blk.capacity - sector;
            uint32_t n = left < blk.max_sectors ? (uint32_t)left : blk.max_sectors;
            if (!blk_read(&blk, sector, n))
                return EXIT_FAILURE;
            crc = crc32_update(crc, blk_buffer, n * 512u);
            sector += n;
            mailbox.counter += n;
        }
        blk_close(&blk);
        guest_printf(GUEST_PREFIX "blk%u sectors=%lu crc32=%08x\n", i, blk.capacity, crc);
        scratch[1 + 2 * i] = blk.capacity;
        scratch[2 + 2 * i] = crc;
        scratch[0] = i + 1;
    }
    return EXIT_OK;
}

SCENARIO("blk-crc", blk_crc_run);
