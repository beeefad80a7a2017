#include "virtio_blk.h"

#include "guest.h"

uint8_t blk_buffer[BLK_BUFFER_SIZE] __attribute__((aligned(4096)));
static struct virtio_blk_req_header blk_header __attribute__((aligned(16)));
static volatile uint8_t blk_status_byte __attribute__((aligned(16)));

bool blk_any(void)
{
    if (virtio_count(VIRTIO_ID_BLOCK) == 0) {
        guest_printf(GUEST_PREFIX "no virtio-blk device\n");
        return false;
    }
    return true;
}

const char *blk_status_name(uint8_t status)
{
    switch (status) {
    case VIRTIO_BLK_S_OK:
        return "ok";
    case VIRTIO_BLK_S_IOERR:
        return "ioerr";
    case VIRTIO_BLK_S_UNSUPP:
        return "unsupp";
    default: {
        static char number[8];
        guest_snprintf(number, sizeof(number), "%u", status);
        return number;
    }
    }
}

bool blk_reopen(struct blk *blk)
{
    struct virtio_dev *dev = blk->dev;
    uint64_t wanted = VIRTIO_BIT(VIRTIO_BLK_F_RO) | VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) |
                      VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX);
    if (blk->indirect)
        wanted |= VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
    if (!virtio_begin_init(dev, wanted))
        return false;
    if (blk->indirect && !virtio_has(dev, VIRTIO_F_INDIRECT_DESC)) {
        guest_printf(GUEST_PREFIX "%s does not offer VIRTIO_F_INDIRECT_DESC\n", dev->name);
        return false;
    }
    blk->capacity = virtio_config_read64(dev, VIRTIO_BLK_CFG_CAPACITY);
    blk->readonly = virtio_has(dev, VIRTIO_BLK_F_RO);
    blk->flush = virtio_has(dev, VIRTIO_BLK_F_FLUSH);
    blk->size_max = BLK_BUFFER_SIZE;
    if (virtio_has(dev, VIRTIO_BLK_F_SIZE_MAX)) {
        uint32_t size_max = virtio_config_read32(dev, VIRTIO_BLK_CFG_SIZE_MAX);
        /* QEMU 7.2's vhost-user-blk offers SIZE_MAX whatever its back-end says
         * and passes on the back-end's 0 (qemu-storage-daemon's); with
         * avmm.lax_size_max=1 that means no limit. */
        bool lax = cmdline_get_u64("avmm.lax_size_max", 0) != 0;
        if (size_max == 0 && !lax) {
            guest_printf(GUEST_PREFIX "%s size_max is 0\n", dev->name);
            return false;
        }
        if (size_max != 0 && size_max < blk->size_max)
            blk->size_max = size_max;
    }
    /* avmm.seg: split the data into smaller descriptors than the device needs,
     * to exercise multi-segment requests (any size, also not sector-sized). */
    uint64_t seg = cmdline_get_u64("avmm.seg", BLK_BUFFER_SIZE);
    if (seg == 0 || seg > BLK_BUFFER_SIZE)
        guest_panic("avmm.seg: must be 1..%u bytes", BLK_BUFFER_SIZE);
    if (seg < blk->size_max)
        blk->size_max = (uint32_t)seg;
    if (!virtio_setup_queue(dev, 0))
        return false;
    /* Data segments: a chain also holds the header and the status, and is
     * never longer than the queue (spec 2.7.5.3.1, indirect or not) nor, with
     * indirect descriptors, than the driver's tables. */
    uint32_t chain = dev->queues[0].num;
    if (blk->indirect && chain > VIRTQ_INDIRECT_MAX)
        chain = VIRTQ_INDIRECT_MAX;
    uint32_t segs = chain - 2;
    if (dev->queues[0].num < 3) {
        guest_printf(GUEST_PREFIX "%s queue of %u entries is too small\n", dev->name,
                     dev->queues[0].num);
        return false;
    }
    if (virtio_has(dev, VIRTIO_BLK_F_SEG_MAX)) {
        uint32_t seg_max = virtio_config_read32(dev, VIRTIO_BLK_CFG_SEG_MAX);
        if (seg_max == 0) {
            guest_printf(GUEST_PREFIX "%s seg_max is 0\n", dev->name);
            return false;
        }
        if (seg_max < segs)
            segs = seg_max;
    }
    blk->seg_max = segs;
    uint64_t bytes = (uint64_t)segs * blk->size_max;
    if (bytes > BLK_BUFFER_SIZE)
        bytes = BLK_BUFFER_SIZE;
    uint32_t sectors = (uint32_t)(bytes / 512);
    uint64_t req = cmdline_get_u64("avmm.req", BLK_BUFFER_SECTORS);
    if (req == 0 || req > BLK_BUFFER_SECTORS)
        guest_panic("avmm.req: must be 1..%u sectors", BLK_BUFFER_SECTORS);
    if (req < sectors)
        sectors = (uint32_t)req;
    if (sectors == 0) {
        guest_printf(GUEST_PREFIX "%s limits allow no whole sector per request\n", dev->name);
        return false;
    }
    blk->max_sectors = sectors;
    return virtio_driver_ok(dev);
}

bool blk_open(struct blk *blk, unsigned index)
{
    memset(blk, 0, sizeof(*blk));
    blk->dev = virtio_find(VIRTIO_ID_BLOCK, index);
    if (!blk->dev)
        guest_panic("no blk%u", index);
    blk->indirect = cmdline_get_u64("avmm.indirect", 0) != 0;
    return blk_reopen(blk);
}

uint8_t blk_request(struct blk *blk, uint32_t type, uint64_t sector, uint32_t count)
{
    struct virtq *vq = &blk->dev->queues[0];
    struct virtq_buf bufs[VIRTQ_MAX_SIZE];
    unsigned n = 0;

    if (count > blk->max_sectors)
        guest_panic("%s: request of %u sectors", blk->dev->name, count);
    blk_header.type = type;
    blk_header.reserved = 0;
    blk_header.sector = sector;
    blk_status_byte = 0xff;
    bufs[n++] = (struct virtq_buf){(uintptr_t)&blk_header, sizeof(blk_header), false};
    uint32_t bytes = count * 512;
    for (uint32_t off = 0; off < bytes; off += blk->size_max) {
        uint32_t len = bytes - off < blk->size_max ? bytes - off : blk->size_max;
        bufs[n++] = (struct virtq_buf){(uintptr_t)blk_buffer + off, len, type == VIRTIO_BLK_T_IN};
    }
    bufs[n++] = (struct virtq_buf){(uintptr_t)&blk_status_byte, 1, true};

    int head = virtq_add(vq, bufs, n, blk->indirect);
    if (head < 0)
        guest_panic("%s: queue full", blk->dev->name);
    virtq_kick(vq);
    uint16_t used_head;
    uint32_t used_len;
    virtq_wait_used_or_die(vq, VIRTIO_TIMEOUT_MS, &used_head, &used_len);
    if (used_head != head)
        guest_panic("%s: used id %u, expected %d", blk->dev->name, used_head, head);
    blk->used_len = used_len;
    return blk_status_byte;
}

void blk_close(struct blk *blk)
{
    if (!virtio_reset(blk->dev))
        guest_exit(EXIT_FAILURE);
}

bool blk_read(struct blk *blk, uint64_t sector, uint32_t count)
{
    uint8_t status = blk_request(blk, VIRTIO_BLK_T_IN, sector, count);
    if (status != VIRTIO_BLK_S_OK) {
        guest_printf(GUEST_PREFIX "%s read FAIL sector=%lu status=%s\n", blk->dev->name,
                     sector, blk_status_name(status));
        return false;
    }
    if (blk->used_len < count * 512u + 1) {
        guest_printf(GUEST_PREFIX "%s read FAIL sector=%lu used_len=%u expected=%u\n",
                     blk->dev->name, sector, blk->used_len, count * 512u + 1);
        return false;
    }
    return true;
}
