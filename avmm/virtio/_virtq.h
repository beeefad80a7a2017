/* What the C loops of avmm's devices (avmm/virtio/_net_build.py, _blk_build.py) share:
   guest RAM as a region table, a split virtqueue's three parts found in it, and the
   guest's ring fields read once and the device's written in order (virtio 1.2 §2.7).
   Every value the guest wrote is read once into a local, checked, and only the local is
   used; ring indices are 16-bit loads and stores; the used idx is published with a
   release store after the elements it covers, and the available idx is read with an
   acquire load before the entries and descriptors it covers. */
#ifndef AVMM_VIRTQ_H
#define AVMM_VIRTQ_H

/* The layout of what the C loops and their Python side exchange (these structs and each
   device's batch record): bump it with any change, so that a module built before the
   change is refused (avmm.virtio._regions.compiled) rather than misread. */
#define AVMM_VIRTQ_ABI 3

#include <stdint.h>
#include <string.h>

struct avmm_region { uint64_t guest; uint64_t size; uint8_t *host; };
struct avmm_ring {
    uint64_t desc, avail, used;
    uint32_t size;
    uint16_t next_avail, next_used;
};

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u

/* The host address of guest [address, address + length), wholly inside one region,
   or NULL. length 0 is never asked for. */
static uint8_t *guest_to_host(const struct avmm_region *regions, int nregions,
                              uint64_t address, uint64_t length)
{
    for (int i = 0; i < nregions; i++) {
        const struct avmm_region *r = &regions[i];
        if (address >= r->guest && address - r->guest <= r->size
                && length <= r->size - (address - r->guest))
            return r->host + (address - r->guest);
    }
    return NULL;
}

struct rings { uint8_t *desc, *avail, *used; };

/* The three parts of `ring` in the regions, each whole in one and aligned as the spec
   asks; -1 for a ring the Python path must name the fault of. */
static int map_rings(const struct avmm_ring *ring, const struct avmm_region *regions,
                     int nregions, struct rings *out)
{
    uint64_t size = ring->size;
    if (!size || (size & (size - 1)) || size > 32768)
        return -1;
    out->desc = guest_to_host(regions, nregions, ring->desc, 16 * size);
    out->avail = guest_to_host(regions, nregions, ring->avail, 4 + 2 * size);
    out->used = guest_to_host(regions, nregions, ring->used, 4 + 8 * size);
    if (!out->desc || !out->avail || !out->used
            || (ring->desc & 15) || (ring->avail & 1) || (ring->used & 3))
        return -1;
    return 0;
}

/* The start of a batch: `ring`'s parts in the regions (map_rings), and how many chains
   the driver has made available past the device's position. -1 (nothing to do here, all
   for the Python path) for a ring map_rings refuses, for a caller that holds chains (the
   used position behind the available one: a C loop takes and returns chains in order,
   never past one it does not hold) and for an available idx further ahead than the
   ring holds (the Python path names the breach). */
static inline int32_t begin_batch(const struct avmm_ring *ring,
                                  const struct avmm_region *regions, int nregions,
                                  struct rings *r)
{
    if (map_rings(ring, regions, nregions, r) < 0 || ring->next_used != ring->next_avail)
        return -1;
    uint16_t available = __atomic_load_n((const uint16_t *)(r->avail + 2), __ATOMIC_ACQUIRE);
    uint16_t pending = (uint16_t)(available - ring->next_avail);
    return pending > ring->size ? -1 : pending;
}

static inline uint16_t load_u16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

/* The head of the chain at available-ring position `position`. */
static inline uint32_t available_head(const struct rings *r, uint32_t size, uint16_t position)
{
    return load_u16(r->avail + 4 + 2 * (size_t)(position & (size - 1)));
}

struct descriptor { uint64_t address; uint32_t length; uint16_t flags, next; };

static inline struct descriptor read_descriptor(const uint8_t *table, uint32_t index)
{
    struct descriptor d;
    /* One copy of the guest's 16 bytes: what is checked is what is used. */
    memcpy(&d, table + 16 * (size_t)index, sizeof d);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    return d;
}

static inline void push_used(const struct rings *r, uint32_t size, uint16_t position,
                             uint32_t head, uint32_t written)
{
    uint32_t element[2] = { head, written };
    memcpy(r->used + 4 + 8 * (size_t)(position & (size - 1)), element, 8);
}

/* The elements (and whatever the device wrote before them) first. */
static inline void publish_used(const struct rings *r, uint16_t next_used)
{
    __atomic_store_n((uint16_t *)(r->used + 2), next_used, __ATOMIC_RELEASE);
}

#endif
