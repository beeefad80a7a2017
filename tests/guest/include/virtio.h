/* Polling virtio drivers: the virtio-mmio transport (version 2 only) and split
 * virtqueues, written from the virtio 1.2 specification (sections 2.7, 4.2).
 *
 * No interrupts: a driver submits a descriptor chain, notifies the queue and
 * polls the used ring with a deadline, looking at the device status now and
 * then for DEVICE_NEEDS_RESET. Guest RAM is identity-mapped, so the address of
 * a ring or a buffer in .bss is its guest-physical address. */
#ifndef AVMM_GUEST_VIRTIO_H
#define AVMM_GUEST_VIRTIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- virtio-mmio registers (spec 4.2.2), offsets from the device base. */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC               0x74726976 /* "virt" */

/* ---- Device status bits (spec 2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE       0x01
#define VIRTIO_STATUS_DRIVER            0x02
#define VIRTIO_STATUS_DRIVER_OK         0x04
#define VIRTIO_STATUS_FEATURES_OK       0x08
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED            0x80

/* ---- Device IDs (spec 5). */
#define VIRTIO_ID_NET                   1
#define VIRTIO_ID_BLOCK                 2
#define VIRTIO_ID_CONSOLE               3
#define VIRTIO_ID_ENTROPY               4

/* ---- Reserved feature bits (spec 6). */
#define VIRTIO_F_INDIRECT_DESC          28
#define VIRTIO_F_EVENT_IDX              29
#define VIRTIO_F_VERSION_1              32

#define VIRTIO_BIT(n)                   (1ULL << (n))

/* ---- Split virtqueue (spec 2.7). */
#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2
#define VIRTQ_DESC_F_INDIRECT           4
#define VIRTQ_AVAIL_F_NO_INTERRUPT      1
#define VIRTQ_USED_F_NO_NOTIFY          1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* num entries (no used_event: EVENT_IDX is never negotiated) */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[]; /* num entries */
};

/* Largest queue the driver sets up, and the default size (avmm.qsize). */
#define VIRTQ_MAX_SIZE                  256
#define VIRTQ_DEFAULT_SIZE              64
/* Indirect tables: per queue, this many tables of this many descriptors. */
#define VIRTQ_INDIRECT_TABLES           4
#define VIRTQ_INDIRECT_MAX              32

/* One buffer of a request: device-readable unless `writable`. */
struct virtq_buf {
    uint64_t addr;
    uint32_t len;
    bool writable;
};

struct virtio_dev;

struct virtq {
    struct virtio_dev *dev;
    uint16_t index;
    uint16_t num;
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    uint16_t avail_idx;     /* next avail->idx to publish */
    uint16_t last_used;     /* used->idx seen so far */
    uint16_t free_head;
    uint16_t num_free;
    uint16_t chain_len[VIRTQ_MAX_SIZE];    /* per head: descriptors in the ring */
    int8_t indirect_slot[VIRTQ_MAX_SIZE];  /* per head: indirect table or -1 */
    uint8_t indirect_busy;
    int mem_slot;                          /* ring memory slot, -1 when none */
};

#define VIRTIO_MAX_QUEUES 2

struct virtio_dev {
    uint64_t base;          /* MMIO base */
    uint64_t size;          /* MMIO window size from the command line */
    uint32_t irq;
    uint32_t device_id;
    unsigned type_index;    /* blk<type_index>, net<...>, rng<...> */
    char name[16];          /* "blk0", ... */
    uint64_t device_features;
    uint64_t features;      /* negotiated */
    unsigned num_queues;
    struct virtq queues[VIRTIO_MAX_QUEUES];
};

#define VIRTIO_MAX_DEVICES 16

/* Parse every virtio_mmio.device=<size>@<base>:<irq>[:<id>] word of the
 * command line, probe each device and return the modern ones with a nonzero
 * device ID, in command-line order (legacy and broken ones are reported and
 * skipped). Idempotent: the second call returns the same table. */
unsigned virtio_discover(struct virtio_dev **devices);

/* avmm.virtio_debug=1: print the features and queue sizes of each device
 * as it is initialised (lines "<dev> virtio@... offered=... accepted=..."
 * and "<dev> queue <i> size=<n> max=<m>"). */
bool virtio_debug(void);

/* The n-th (0-based) device of a type, or NULL. */
struct virtio_dev *virtio_find(uint32_t device_id, unsigned n);
/* Number of devices of a type. */
unsigned virtio_count(uint32_t device_id);

/* Register access. */
uint32_t virtio_read32(struct virtio_dev *dev, uint32_t offset);
void virtio_write32(struct virtio_dev *dev, uint32_t offset, uint32_t value);
uint32_t virtio_status(struct virtio_dev *dev);

/* Reset the device (Status = 0, then wait until it reads 0) and forget its
 * queues. False (with a line printed) if it does not read 0 in time. */
bool virtio_reset(struct virtio_dev *dev);

/* Start initialisation (spec 3.1.1): reset, ACKNOWLEDGE, DRIVER, read the
 * device features, accept `wanted & offered` (VERSION_1 is required and always
 * wanted), FEATURES_OK and check it stuck. Prints a line and returns false
 * when the device refuses. */
bool virtio_begin_init(struct virtio_dev *dev, uint64_t wanted);

/* Set up queue `index`: avmm.qsize entries (a power of 2, default 64), halved
 * until it is within QueueNumMax. */
bool virtio_setup_queue(struct virtio_dev *dev, unsigned index);

/* Set DRIVER_OK. */
bool virtio_driver_ok(struct virtio_dev *dev);

static inline bool virtio_has(const struct virtio_dev *dev, unsigned bit)
{
    return (dev->features >> bit) & 1;
}

static inline bool virtio_offers(const struct virtio_dev *dev, unsigned bit)
{
    return (dev->device_features >> bit) & 1;
}

/* Device-specific configuration space with the access widths the spec asks
 * for; multi-word reads are retried until ConfigGeneration is stable. */
uint8_t virtio_config_read8(struct virtio_dev *dev, uint32_t offset);
uint16_t virtio_config_read16(struct virtio_dev *dev, uint32_t offset);
uint32_t virtio_config_read32(struct virtio_dev *dev, uint32_t offset);
uint64_t virtio_config_read64(struct virtio_dev *dev, uint32_t offset);

/* Put a chain (all device-readable buffers first, then the writable ones) on
 * the available ring, without notifying. With `indirect` the chain goes into
 * an indirect table (VIRTIO_F_INDIRECT_DESC must be negotiated). Returns the
 * head descriptor index, or -1 when the queue is full. */
int virtq_add(struct virtq *vq, const struct virtq_buf *bufs, unsigned count, bool indirect);

/* Put a raw descriptor chain on the available ring: descriptors already
 * written by the caller starting at head `head` (used by blk-hostile to build
 * broken chains). The caller owns descriptor bookkeeping. */
void virtq_add_raw(struct virtq *vq, uint16_t head);

/* Notify the device about new buffers (QueueNotify), unless the device set
 * VIRTQ_USED_F_NO_NOTIFY. */
void virtq_kick(struct virtq *vq);

/* Take one used element if there is one: true, with its head and length. The
 * descriptors return to the free list. */
bool virtq_get_used(struct virtq *vq, uint16_t *head, uint32_t *len);

/* Outcome of a wait on the used ring. */
enum virtio_wait {
    VIRTIO_WAIT_OK,
    VIRTIO_WAIT_TIMEOUT,
    VIRTIO_WAIT_NEEDS_RESET,
};

/* Poll until a used element is there or `timeout_ms` passed; also watches
 * Status for DEVICE_NEEDS_RESET. Prints nothing. */
enum virtio_wait virtq_wait_used(struct virtq *vq, uint64_t timeout_ms, uint16_t *head,
                                 uint32_t *len);

/* virtq_wait_used, and on failure print "avmm-testguest: <dev> timeout" or
 * "avmm-testguest: <dev> needs reset" and exit 1. */
void virtq_wait_used_or_die(struct virtq *vq, uint64_t timeout_ms, uint16_t *head,
                            uint32_t *len);

/* Default deadline for one request. */
#define VIRTIO_TIMEOUT_MS 10000

#endif
