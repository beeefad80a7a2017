/* virtio-mmio transport, version 2 (virtio 1.2, section 4.2): discovery from
 * the command line, device initialisation, queue setup, configuration space. */
#include "guest.h"
#include "timer.h"
#include "virtio.h"

/* ---- Ring memory: a few fixed slots of 8 KiB, handed out by
 * virtio_setup_queue and returned by virtio_reset. Layout of a slot for a
 * queue of up to 256 entries: descriptors at +0 (16 * 256 = 4096 bytes),
 * available ring at +4096 (6 + 2 * 256 = 518), used ring at +5120
 * (6 + 8 * 256 = 2054). Separate, non-adjacent areas on purpose: the
 * device must use the three addresses it is given. */
#define RING_SLOTS       8
#define RING_SLOT_SIZE   8192
#define RING_AVAIL_OFF   4096
#define RING_USED_OFF    5120

static uint8_t ring_memory[RING_SLOTS][RING_SLOT_SIZE] __attribute__((aligned(4096)));
static bool ring_slot_busy[RING_SLOTS];

/* Indirect descriptor tables, per ring slot. */
static struct virtq_desc indirect_tables[RING_SLOTS][VIRTQ_INDIRECT_TABLES][VIRTQ_INDIRECT_MAX]
    __attribute__((aligned(16)));

static struct virtio_dev devices[VIRTIO_MAX_DEVICES];
static struct virtio_dev *device_list[VIRTIO_MAX_DEVICES];
static unsigned device_count;
static bool discovered;

bool virtio_debug(void)
{
    static int debug = -1;
    if (debug < 0)
        debug = cmdline_get_u64("avmm.virtio_debug", 0) != 0;
    return debug;
}

/* ---- Registers. */

uint32_t virtio_read32(struct virtio_dev *dev, uint32_t offset)
{
    return mmio_read32(dev->base + offset);
}

void virtio_write32(struct virtio_dev *dev, uint32_t offset, uint32_t value)
{
    mmio_write32(dev->base + offset, value);
}

uint32_t virtio_status(struct virtio_dev *dev)
{
    return virtio_read32(dev, VIRTIO_MMIO_STATUS);
}

static void set_status(struct virtio_dev *dev, uint32_t bits)
{
    virtio_write32(dev, VIRTIO_MMIO_STATUS, virtio_status(dev) | bits);
}

/* ---- Discovery. */

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Parse a number at *p up to one of the stop characters (or the end of the
 * word): decimal or 0x-hex, with an optional K/M/G suffix when `suffix`. */
static bool parse_field(const char **p, const char *end, const char *stops, bool suffix,
                        uint64_t *out)
{
    const char *start = *p;
    const char *q = start;
    while (q < end) {
        bool stop = false;
        for (const char *s = stops; *s; s++)
            stop |= *q == *s;
        if (stop)
            break;
        q++;
    }
    size_t len = (size_t)(q - start);
    uint64_t shift = 0;
    if (suffix && len > 0) {
        char last = start[len - 1];
        bool hex = len > 2 && start[0] == '0' && (start[1] == 'x' || start[1] == 'X');
        if (last == 'k' || last == 'K')
            shift = 10;
        else if (last == 'm' || last == 'M')
            shift = 20;
        else if ((last == 'g' || last == 'G') && !hex)
            shift = 30;
        if (shift)
            len--;
    }
    if (!parse_u64(start, len, out))
        return false;
    *out <<= shift;
    *p = q;
    return true;
}

/* One word "virtio_mmio.device=<size>@<base>:<irq>[:<id>]" (the key already
 * matched; `p` points after '='). */
static bool parse_device_word(const char *p, const char *end, uint64_t *size, uint64_t *base,
                              uint64_t *irq)
{
    if (!parse_field(&p, end, "@", true, size) || p >= end || *p++ != '@')
        return false;
    if (!parse_field(&p, end, ":", false, base) || p >= end || *p++ != ':')
        return false;
    /* The irq, then an optional ":<id>" that we ignore. */
    return parse_field(&p, end, ":", false, irq);
}

static const char *type_prefix(uint32_t device_id)
{
    switch (device_id) {
    case VIRTIO_ID_NET:
        return "net";
    case VIRTIO_ID_BLOCK:
        return "blk";
    case VIRTIO_ID_ENTROPY:
        return "rng";
    case VIRTIO_ID_CONSOLE:
        return "console";
    default:
        return "virtio";
    }
}

static void probe(uint64_t size, uint64_t base, uint64_t irq)
{
    if (base >= (1ULL << 32) || size < VIRTIO_MMIO_CONFIG) {
        guest_printf(GUEST_PREFIX "virtio@0x%lx unusable window (size 0x%lx), skipped\n", base,
                     size);
        return;
    }
    if (device_count >= VIRTIO_MAX_DEVICES) {
        guest_printf(GUEST_PREFIX "virtio@0x%lx too many devices, skipped\n", base);
        return;
    }
    uint32_t magic = mmio_read32(base + VIRTIO_MMIO_MAGIC_VALUE);
    if (magic != VIRTIO_MMIO_MAGIC) {
        guest_printf(GUEST_PREFIX "virtio@0x%lx bad magic 0x%x, skipped\n", base, magic);
        return;
    }
    uint32_t version = mmio_read32(base + VIRTIO_MMIO_VERSION);
    if (version == 1) {
        guest_printf(GUEST_PREFIX "virtio@0x%lx legacy device, skipped\n", base);
        return;
    }
    if (version != 2) {
        guest_printf(GUEST_PREFIX "virtio@0x%lx unknown version %u, skipped\n", base, version);
        return;
    }
    uint32_t device_id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
    if (device_id == 0)
        return; /* a placeholder transport with nothing behind it */

    struct virtio_dev *dev = &devices[device_count];
    memset(dev, 0, sizeof(*dev));
    dev->base = base;
    dev->size = size;
    dev->irq = (uint32_t)irq;
    dev->device_id = device_id;
    dev->type_index = virtio_count(device_id);
    guest_snprintf(dev->name, sizeof(dev->name), "%s%u", type_prefix(device_id),
                   dev->type_index);
    for (unsigned q = 0; q < VIRTIO_MAX_QUEUES; q++)
        dev->queues[q].mem_slot = -1;
    device_list[device_count++] = dev;
}

unsigned virtio_discover(struct virtio_dev **out)
{
    static const char key[] = "virtio_mmio.device=";
    const size_t key_len = sizeof(key) - 1;

    if (!discovered) {
        discovered = true;
        const char *p = cmdline();
        while (*p) {
            while (is_space(*p))
                p++;
            const char *word = p;
            while (*p && !is_space(*p))
                p++;
            size_t len = (size_t)(p - word);
            if (len <= key_len || memcmp(word, key, key_len) != 0)
                continue;
            uint64_t size, base, irq;
            if (!parse_device_word(word + key_len, p, &size, &base, &irq)) {
                guest_printf(GUEST_PREFIX "virtio: cannot parse %.*s, skipped\n", (int)len,
                             word);
                continue;
            }
            probe(size, base, irq);
        }
    }
    if (out) {
        for (unsigned i = 0; i < device_count; i++)
            out[i] = device_list[i];
    }
    return device_count;
}

struct virtio_dev *virtio_find(uint32_t device_id, unsigned n)
{
    virtio_discover(NULL);
    for (unsigned i = 0; i < device_count; i++) {
        if (device_list[i]->device_id == device_id && device_list[i]->type_index == n)
            return device_list[i];
    }
    return NULL;
}

unsigned virtio_count(uint32_t device_id)
{
    unsigned n = 0;
    virtio_discover(NULL); /* returns at once when called from the discovery */
    for (unsigned i = 0; i < device_count; i++)
        n += device_list[i]->device_id == device_id;
    return n;
}

/* ---- Initialisation. */

static void release_queues(struct virtio_dev *dev)
{
    for (unsigned q = 0; q < VIRTIO_MAX_QUEUES; q++) {
        if (dev->queues[q].mem_slot >= 0)
            ring_slot_busy[dev->queues[q].mem_slot] = false;
        memset(&dev->queues[q], 0, sizeof(dev->queues[q]));
        dev->queues[q].mem_slot = -1;
    }
    dev->num_queues = 0;
}

bool virtio_reset(struct virtio_dev *dev)
{
    virtio_write32(dev, VIRTIO_MMIO_STATUS, 0);
    /* The device may take a while to finish its reset (spec 4.2.3.1: the
     * driver waits until Status reads 0). Only then is ring memory free. */
    uint64_t deadline = timer_deadline(VIRTIO_TIMEOUT_MS);
    while (virtio_status(dev) != 0) {
        if (timer_expired(deadline)) {
            guest_printf(GUEST_PREFIX "%s timeout (reset: status stays 0x%x)\n", dev->name,
                         virtio_status(dev));
            return false;
        }
        cpu_relax();
    }
    release_queues(dev);
    dev->features = 0;
    return true;
}

bool virtio_begin_init(struct virtio_dev *dev, uint64_t wanted)
{
    if (!virtio_reset(dev))
        return false;
    set_status(dev, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status(dev, VIRTIO_STATUS_DRIVER);

    virtio_write32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t low = virtio_read32(dev, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint64_t high = virtio_read32(dev, VIRTIO_MMIO_DEVICE_FEATURES);
    dev->device_features = low | (high << 32);
    if (!virtio_offers(dev, VIRTIO_F_VERSION_1)) {
        set_status(dev, VIRTIO_STATUS_FAILED);
        guest_printf(GUEST_PREFIX "%s does not offer VIRTIO_F_VERSION_1 (features 0x%lx)\n",
                     dev->name, dev->device_features);
        return false;
    }
    dev->features = dev->device_features & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1));
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)dev->features);
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(dev->features >> 32));

    set_status(dev, VIRTIO_STATUS_FEATURES_OK);
    uint32_t status = virtio_status(dev);
    if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
        set_status(dev, VIRTIO_STATUS_FAILED);
        guest_printf(GUEST_PREFIX "%s refused features 0x%lx (status 0x%x)\n", dev->name,
                     dev->features, status);
        return false;
    }
    if (virtio_debug())
        guest_printf(GUEST_PREFIX "%s virtio@0x%lx irq=%u offered=0x%lx accepted=0x%lx\n",
                     dev->name, dev->base, dev->irq, dev->device_features, dev->features);
    return true;
}

static uint16_t queue_size_option(void)
{
    uint64_t size = cmdline_get_u64("avmm.qsize", VIRTQ_DEFAULT_SIZE);
    /* Split virtqueues have a power-of-2 size (spec 2.7). */
    if (size == 0 || size > VIRTQ_MAX_SIZE || (size & (size - 1)) != 0)
        guest_panic("avmm.qsize: must be a power of 2 up to %u", VIRTQ_MAX_SIZE);
    return (uint16_t)size;
}

bool virtio_setup_queue(struct virtio_dev *dev, unsigned index)
{
    if (index >= VIRTIO_MAX_QUEUES)
        guest_panic("%s: queue %u: the driver keeps at most %u", dev->name, index,
                    VIRTIO_MAX_QUEUES);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_read32(dev, VIRTIO_MMIO_QUEUE_READY) != 0) {
        guest_printf(GUEST_PREFIX "%s queue %u already ready after reset\n", dev->name, index);
        return false;
    }
    uint32_t max = virtio_read32(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0) {
        guest_printf(GUEST_PREFIX "%s queue %u not available\n", dev->name, index);
        return false;
    }
    /* The largest power of 2 within both the option and the device's maximum. */
    uint16_t num = queue_size_option();
    while (num > max)
        num >>= 1;

    int slot = -1;
    for (int s = 0; s < RING_SLOTS; s++) {
        if (!ring_slot_busy[s]) {
            slot = s;
            break;
        }
    }
    if (slot < 0)
        guest_panic("%s: out of ring memory", dev->name);
    ring_slot_busy[slot] = true;
    uint8_t *mem = ring_memory[slot];
    memset(mem, 0, RING_SLOT_SIZE);

    struct virtq *vq = &dev->queues[index];
    memset(vq, 0, sizeof(*vq));
    vq->dev = dev;
    vq->index = (uint16_t)index;
    vq->num = num;
    vq->mem_slot = slot;
    vq->desc = (struct virtq_desc *)mem;
    vq->avail = (struct virtq_avail *)(mem + RING_AVAIL_OFF);
    vq->used = (struct virtq_used *)(mem + RING_USED_OFF);
    for (uint16_t i = 0; i < num; i++) {
        vq->desc[i].next = (uint16_t)(i + 1);
        vq->indirect_slot[i] = -1;
    }
    vq->free_head = 0;
    vq->num_free = num;
    /* No interrupts wanted: this driver polls (spec 2.7.7). */
    vq->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;

    virtio_write32(dev, VIRTIO_MMIO_QUEUE_NUM, num);
    uint64_t desc = (uintptr_t)vq->desc, avail = (uintptr_t)vq->avail,
             used = (uintptr_t)vq->used;
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    mb();
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    if (virtio_debug())
        guest_printf(GUEST_PREFIX "%s queue %u size=%u max=%u\n", dev->name, index, num, max);
    if (index + 1 > dev->num_queues)
        dev->num_queues = index + 1;
    return true;
}

bool virtio_driver_ok(struct virtio_dev *dev)
{
    set_status(dev, VIRTIO_STATUS_DRIVER_OK);
    uint32_t status = virtio_status(dev);
    if (status & (VIRTIO_STATUS_DEVICE_NEEDS_RESET | VIRTIO_STATUS_FAILED) ||
        !(status & VIRTIO_STATUS_DRIVER_OK)) {
        guest_printf(GUEST_PREFIX "%s did not accept DRIVER_OK (status 0x%x)\n", dev->name,
                     status);
        return false;
    }
    return true;
}

/* ---- Configuration space (spec 4.2.2.2: 8-bit fields with 8-bit accesses,
 * 16-bit with 16-bit, 32- and 64-bit fields with 32-bit accesses). */

uint8_t virtio_config_read8(struct virtio_dev *dev, uint32_t offset)
{
    return mmio_read8(dev->base + VIRTIO_MMIO_CONFIG + offset);
}

uint16_t virtio_config_read16(struct virtio_dev *dev, uint32_t offset)
{
    return mmio_read16(dev->base + VIRTIO_MMIO_CONFIG + offset);
}

uint32_t virtio_config_read32(struct virtio_dev *dev, uint32_t offset)
{
    return mmio_read32(dev->base + VIRTIO_MMIO_CONFIG + offset);
}

uint64_t virtio_config_read64(struct virtio_dev *dev, uint32_t offset)
{
    for (unsigned tries = 0; tries < 1000; tries++) {
        uint32_t before = virtio_read32(dev, VIRTIO_MMIO_CONFIG_GENERATION);
        uint64_t low = virtio_config_read32(dev, offset);
        uint64_t high = virtio_config_read32(dev, offset + 4);
        if (virtio_read32(dev, VIRTIO_MMIO_CONFIG_GENERATION) == before)
            return low | (high << 32);
    }
    guest_panic("%s: ConfigGeneration never stable reading offset 0x%x", dev->name, offset);
}

/* ---- Split virtqueue. */

int virtq_add(struct virtq *vq, const struct virtq_buf *bufs, unsigned count, bool indirect)
{
    if (count == 0)
        guest_panic("%s: empty descriptor chain", vq->dev->name);
    unsigned ring_descs = indirect ? 1 : count;
    if (vq->num_free < ring_descs)
        return -1;

    int islot = -1;
    struct virtq_desc *table = NULL;
    if (indirect) {
        if (!virtio_has(vq->dev, VIRTIO_F_INDIRECT_DESC))
            guest_panic("%s: indirect descriptors not negotiated", vq->dev->name);
        if (count > VIRTQ_INDIRECT_MAX)
            guest_panic("%s: %u descriptors do not fit an indirect table", vq->dev->name,
                        count);
        for (int s = 0; s < VIRTQ_INDIRECT_TABLES; s++) {
            if (!(vq->indirect_busy & (1u << s))) {
                islot = s;
                break;
            }
        }
        if (islot < 0)
            return -1;
        vq->indirect_busy |= (uint8_t)(1u << islot);
        table = indirect_tables[vq->mem_slot][islot];
        for (unsigned i = 0; i < count; i++) {
            table[i].addr = bufs[i].addr;
            table[i].len = bufs[i].len;
            table[i].flags = (uint16_t)((bufs[i].writable ? VIRTQ_DESC_F_WRITE : 0) |
                                        (i + 1 < count ? VIRTQ_DESC_F_NEXT : 0));
            table[i].next = (uint16_t)(i + 1 < count ? i + 1 : 0);
        }
    }

    uint16_t head = vq->free_head;
    uint16_t d = head;
    for (unsigned i = 0; i < ring_descs; i++) {
        struct virtq_desc *desc = &vq->desc[d];
        uint16_t next_free = desc->next;
        if (indirect) {
            desc->addr = (uintptr_t)table;
            desc->len = (uint32_t)(count * sizeof(struct virtq_desc));
            desc->flags = VIRTQ_DESC_F_INDIRECT;
        } else {
            desc->addr = bufs[i].addr;
            desc->len = bufs[i].len;
            desc->flags = (uint16_t)((bufs[i].writable ? VIRTQ_DESC_F_WRITE : 0) |
                                     (i + 1 < ring_descs ? VIRTQ_DESC_F_NEXT : 0));
        }
        d = next_free;
    }
    vq->free_head = d;
    vq->num_free = (uint16_t)(vq->num_free - ring_descs);
    /* The last descriptor's next field keeps the free-list link: harmless
     * without F_NEXT, and how virtq_get_used finds the rest of the list. */
    vq->chain_len[head] = (uint16_t)ring_descs;
    vq->indirect_slot[head] = (int8_t)islot;
    virtq_add_raw(vq, head);
    return head;
}

void virtq_add_raw(struct virtq *vq, uint16_t head)
{
    vq->avail->ring[vq->avail_idx % vq->num] = head;
    /* The ring entry (and the descriptors) before the index (spec 2.7.13). */
    barrier();
    vq->avail_idx++;
    *(volatile uint16_t *)&vq->avail->idx = vq->avail_idx;
}

void virtq_kick(struct virtq *vq)
{
    /* The index store before the read of used->flags (spec 2.7.13.4). */
    mb();
    if (*(volatile uint16_t *)&vq->used->flags & VIRTQ_USED_F_NO_NOTIFY)
        return;
    virtio_write32(vq->dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

bool virtq_get_used(struct virtq *vq, uint16_t *head, uint32_t *len)
{
    uint16_t used_idx = *(volatile uint16_t *)&vq->used->idx;
    if (used_idx == vq->last_used)
        return false;
    /* x86 does not reorder loads with loads; keep the compiler from it. */
    barrier();
    volatile struct virtq_used_elem *elem = &vq->used->ring[vq->last_used % vq->num];
    uint32_t id = elem->id;
    uint32_t length = elem->len;
    vq->last_used++;
    if (id >= vq->num || vq->chain_len[id] == 0)
        guest_panic("%s: device returned bad used id %u", vq->dev->name, id);

    /* Return the chain to the free list: its descriptors, walked by their
     * next links, end with the one whose next still links the old list. */
    uint16_t n = vq->chain_len[id];
    uint16_t last = (uint16_t)id;
    for (uint16_t i = 1; i < n; i++)
        last = vq->desc[last].next;
    vq->desc[last].next = vq->free_head;
    vq->free_head = (uint16_t)id;
    vq->num_free = (uint16_t)(vq->num_free + n);
    vq->chain_len[id] = 0;
    if (vq->indirect_slot[id] >= 0) {
        vq->indirect_busy &= (uint8_t)~(1u << vq->indirect_slot[id]);
        vq->indirect_slot[id] = -1;
    }
    *head = (uint16_t)id;
    *len = length;
    return true;
}

/* How often to look at Status while polling (the read is a VM exit). */
#define STATUS_CHECK_MS 1

enum virtio_wait virtq_wait_used(struct virtq *vq, uint64_t timeout_ms, uint16_t *head,
                                 uint32_t *len)
{
    uint64_t deadline = timer_deadline(timeout_ms);
    uint64_t next_check = timer_deadline(STATUS_CHECK_MS);
    for (;;) {
        for (unsigned spin = 0; spin < 256; spin++) {
            if (virtq_get_used(vq, head, len))
                return VIRTIO_WAIT_OK;
            cpu_relax();
        }
        if (timer_expired(next_check)) {
            if (virtio_status(vq->dev) & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
                return VIRTIO_WAIT_NEEDS_RESET;
            next_check = timer_deadline(STATUS_CHECK_MS);
        }
        if (timer_expired(deadline)) {
            /* One last look: the answer may have come during the spin. */
            if (virtq_get_used(vq, head, len))
                return VIRTIO_WAIT_OK;
            return VIRTIO_WAIT_TIMEOUT;
        }
    }
}

void virtq_wait_used_or_die(struct virtq *vq, uint64_t timeout_ms, uint16_t *head,
                            uint32_t *len)
{
    switch (virtq_wait_used(vq, timeout_ms, head, len)) {
    case VIRTIO_WAIT_OK:
        return;
    case VIRTIO_WAIT_TIMEOUT:
        guest_printf(GUEST_PREFIX "%s timeout (queue %u, status 0x%x)\n", vq->dev->name,
                     vq->index, virtio_status(vq->dev));
        break;
    case VIRTIO_WAIT_NEEDS_RESET:
        guest_printf(GUEST_PREFIX "%s needs reset (status 0x%x)\n", vq->dev->name,
                     virtio_status(vq->dev));
        break;
    }
    guest_exit(EXIT_FAILURE);
}
