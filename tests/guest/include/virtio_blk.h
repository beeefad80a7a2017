/* Polling virtio-blk driver (virtio 1.2, section 5.2): one request at a time,
 * the data in one buffer split into segments of at most size_max bytes. */
#ifndef AVMM_GUEST_VIRTIO_BLK_H
#define AVMM_GUEST_VIRTIO_BLK_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX   1
#define VIRTIO_BLK_F_SEG_MAX    2
#define VIRTIO_BLK_F_RO         5
#define VIRTIO_BLK_F_FLUSH      9

#define VIRTIO_BLK_T_IN         0
#define VIRTIO_BLK_T_OUT        1
#define VIRTIO_BLK_T_FLUSH      4

#define VIRTIO_BLK_S_OK         0
#define VIRTIO_BLK_S_IOERR      1
#define VIRTIO_BLK_S_UNSUPP     2

/* Config space offsets. */
#define VIRTIO_BLK_CFG_CAPACITY 0
#define VIRTIO_BLK_CFG_SIZE_MAX 8
#define VIRTIO_BLK_CFG_SEG_MAX  12

struct virtio_blk_req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* The driver's shared data buffer: requests carry at most this much. */
#define BLK_BUFFER_SIZE   65536
#define BLK_BUFFER_SECTORS (BLK_BUFFER_SIZE / 512)
extern uint8_t blk_buffer[BLK_BUFFER_SIZE];

struct blk {
    struct virtio_dev *dev;
    uint64_t capacity;      /* sectors */
    uint32_t size_max;      /* bytes per data segment (size_max, avmm.seg) */
    uint32_t seg_max;       /* data segments per request */
    uint32_t max_sectors;   /* sectors per request (avmm.req, limits) */
    bool indirect;          /* avmm.indirect=1 */
    bool readonly;
    bool flush;
    uint32_t used_len;      /* the used length of the last request */
};

/* Initialise blk device `index` (blk<index>): features VERSION_1, RO, FLUSH,
 * SIZE_MAX, SEG_MAX when offered (INDIRECT_DESC with avmm.indirect=1). On
 * failure prints a line and returns false. */
bool blk_open(struct blk *blk, unsigned index);

/* Reinitialise an opened device (after a reset). */
bool blk_reopen(struct blk *blk);

/* One request of `type` (IN, OUT) for `count` sectors at `sector` with the
 * data in blk_buffer (count <= blk->max_sectors), or FLUSH (count 0).
 * Returns the status byte; a timeout or NEEDS_RESET ends the guest. */
uint8_t blk_request(struct blk *blk, uint32_t type, uint64_t sector, uint32_t count);

/* blk_request(IN) that also checks the used length covers data and status
 * (spec 2.7.8: the driver may only rely on the first `len` bytes). Prints
 * "avmm-testguest: blk<i> read FAIL sector=<s> ..." and returns false on
 * any failure. */
bool blk_read(struct blk *blk, uint64_t sector, uint32_t count);

/* Reset the device at the end (quiesce it); exits on failure. */
void blk_close(struct blk *blk);

/* "ok", "ioerr", "unsupp", or the value in decimal (255: the device did not
 * write the status byte, which the driver sets to 0xff before each request).
 * The string may be a static buffer, overwritten by the next call. */
const char *blk_status_name(uint8_t status);

/* Print "avmm-testguest: no virtio-blk device" if there is none: false. */
bool blk_any(void);

#endif
