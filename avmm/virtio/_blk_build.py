"""cffi build script (API mode) for virtio-blk's inner loop (:mod:`avmm.virtio.blk_fast`).

At queue depth 32 the I/O thread spent about 15 µs of CPU per 4 KiB request, of which the
``preadv``/``pwritev`` itself was 3 to 4 µs: the rest was the interpreter popping the
chain, parsing the header, building memoryviews and pushing the used element, while the
driver waited for the whole batch. This function does that per-request work for the
common requests in C, outside the GIL: walk the available ring, check each chain, move
the data between the image and guest memory, write the status byte and publish each
completion on the used ring at once (a polling driver refills while the rest of the batch
is served).

Python stays the control plane (waits, notifications, limits, stats, dirty marks, the
device's state) and keeps every rule: the C loop serves only IN and OUT requests whose
chain it can prove well-formed, in range and served without error, and stops *before*
anything else (another request type, a chain of another shape, a buffer outside RAM, a
range past the disk's end, a failed or short transfer, an OUT in writethrough mode), so
the Python path takes the ring from exactly there and answers, refuses or logs as it
always does. The C code therefore never writes a failure status: a failed ``preadv`` is
simply done again by the Python path (reads and writes of the same bytes are
idempotent), which reports it. FLUSH is left to Python too: a failed ``fdatasync`` must
be reported by the call that saw it, not retried.

Every value the guest wrote is read once into a local (the guest may rewrite it at any
moment), checked, and only the local is used. The descriptor walk applies the rules of
avmm.virtio.queue's ``_walk`` (and stops where it would raise).
"""

import os

from cffi import FFI

#: The shared C (_virtq.h) sits beside this script (cffi runs it with __file__ set).
_HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()


def _virtq_cdef() -> str:
    """The declarations every device's C loop shares (the structs of _virtq.h)."""
    with open(os.path.join(_HERE, "_virtq.cdef")) as f:
        return f.read()


ffibuilder.cdef(_virtq_cdef() + """
struct avmm_blk_batch {
    uint32_t requests;      /* chains returned to the used ring */
    uint32_t reads, writes;
    int32_t stop;           /* why the batch ended: AVMM_BLK_* */
    uint64_t bytes_read, bytes_written;
    uint64_t readable;      /* device-readable bytes of the chains returned */
    uint64_t used;          /* their used lengths, summed */
    uint32_t marks;         /* (address, length) pairs written into marks */
};

#define AVMM_BLK_LIMIT ...
#define AVMM_BLK_EMPTY ...
#define AVMM_BLK_SLOW ...
#define AVMM_BLK_WRITES ...
#define AVMM_BLK_INDIRECT ...
#define AVMM_BLK_MAX_CHAIN ...

int avmm_blk_serve(struct avmm_ring *ring, const struct avmm_region *regions,
                   int nregions, int fd, uint64_t capacity, uint32_t flags,
                   uint32_t limit, uint64_t *marks, uint32_t marks_capacity,
                   struct avmm_blk_batch *out);
""")

ffibuilder.set_source("avmm.virtio._blk_ffi", r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "_virtq.h"

struct avmm_blk_batch {
    uint32_t requests, reads, writes;
    int32_t stop;
    uint64_t bytes_read, bytes_written, readable, used;
    uint32_t marks;
};

/* Why a batch ended. */
#define AVMM_BLK_LIMIT 0   /* it served `limit` requests, BYTE_BUDGET bytes, or the
                              marks array is full */
#define AVMM_BLK_EMPTY 1   /* it served every chain that was available when it began */
#define AVMM_BLK_SLOW 2    /* the chain at next_avail is for the Python path */

/* flags */
#define AVMM_BLK_WRITES 1u    /* OUT may be served: a writable disk in writeback mode */
#define AVMM_BLK_INDIRECT 2u  /* VIRTIO_F_INDIRECT_DESC was negotiated */

/* Descriptors per chain (and entries per indirect table) served here; the device's
   seg_max (avmm.virtio.blk.SEG_MAX) keeps a driver's chains to this. */
#define AVMM_BLK_MAX_CHAIN 256u

/* A call stops (LIMIT) once it has moved this much: a hostile chain may claim up to
   4 GiB, all of it the same RAM, and a pause or reset waits for the call to end. */
#define BYTE_BUDGET (64ull << 20)
#define HEADER 16u
#define SECTOR_SHIFT 9
#define T_IN 0u
#define T_OUT 1u

struct segment { uint8_t *host; uint64_t guest; uint64_t length; };

struct chain {
    /* Non-empty buffers: the readable ones, then the writable ones. */
    struct segment segments[AVMM_BLK_MAX_CHAIN];
    uint32_t readable, writable;
    uint64_t readable_length, writable_length;
};

/* Walk the chain at `head` as avmm.virtio.queue walks it; -1 where that walk would
   raise, or for a chain longer than AVMM_BLK_MAX_CHAIN (the Python path decides). */
static int walk(const struct rings *r, uint32_t size, uint32_t head, int indirect_ok,
                const struct avmm_region *regions, int nregions, struct chain *c)
{
    const uint8_t *table = r->desc;
    uint32_t entries = size, hops = 1, count = 0;
    uint64_t total = 0;
    int seen_writable = 0;
    c->readable = c->writable = 0;
    c->readable_length = c->writable_length = 0;
    struct descriptor d = read_descriptor(table, head);
    if (d.flags & F_INDIRECT) {
        if (!indirect_ok || (d.flags & F_NEXT) || !d.length || (d.length & 15)
                || d.length / 16 > AVMM_BLK_MAX_CHAIN)
            return -1;
        table = guest_to_host(regions, nregions, d.address, d.length);
        if (!table)
            return -1;
        entries = d.length / 16;
        d = read_descriptor(table, 0);
    }
    for (;;) {
        if (d.flags & F_INDIRECT)
            return -1;  /* nested, or inside a chain */
        if (d.flags & F_WRITE)
            seen_writable = 1;
        else if (seen_writable)
            return -1;  /* readable after writable */
        if (d.length) {
            uint8_t *host = guest_to_host(regions, nregions, d.address, d.length);
            if (!host)
                return -1;
            total += d.length;  /* at most 256 * (2^32 - 1): no overflow */
            c->segments[count].host = host;
            c->segments[count].guest = d.address;
            c->segments[count].length = d.length;
            count++;
            if (d.flags & F_WRITE) {
                c->writable++;
                c->writable_length += d.length;
            } else {
                c->readable++;
                c->readable_length += d.length;
            }
        }
        if (!(d.flags & F_NEXT))
            break;
        if (d.next >= entries || ++hops > entries || hops > AVMM_BLK_MAX_CHAIN)
            return -1;
        d = read_descriptor(table, d.next);
    }
    return total > (1ull << 32) ? -1 : 0;
}

/* preadv/pwritev all of `length` bytes (short transfers continue where they ended);
   -1 on an error or an end of file, which the Python path meets again and reports. */
static int transfer(int write, int fd, struct iovec *iov, int count, uint64_t offset,
                    uint64_t length)
{
    uint64_t done = 0;
    while (done < length) {
        ssize_t n = write ? pwritev(fd, iov, count, (off_t)(offset + done))
                          : preadv(fd, iov, count, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        done += (uint64_t)n;
        while (n && count) {
            if ((size_t)n >= iov->iov_len) {
                n -= (ssize_t)iov->iov_len;
                iov++;
                count--;
            } else {
                iov->iov_base = (uint8_t *)iov->iov_base + n;
                iov->iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
    return 0;
}

/* The iovecs of `length` bytes of segments[first..first+n), after `skip` bytes. */
static int data_iov(const struct segment *segments, uint32_t n, uint64_t skip,
                    uint64_t length, struct iovec *iov)
{
    int count = 0;
    for (uint32_t i = 0; i < n && length; i++) {
        uint64_t size = segments[i].length;
        if (skip >= size) {
            skip -= size;
            continue;
        }
        uint64_t take = size - skip < length ? size - skip : length;
        iov[count].iov_base = segments[i].host + skip;
        iov[count].iov_len = take;
        count++;
        length -= take;
        skip = 0;
    }
    return count;
}

static int in_range(uint64_t sector, uint64_t length, uint64_t capacity)
{
    uint64_t sectors = length >> SECTOR_SHIFT;
    return !(length & ((1u << SECTOR_SHIFT) - 1)) && sectors <= capacity
        && sector <= capacity - sectors;
}

/* Serve the IN and OUT requests available when it begins, in ring order, at most
   `limit`: each is returned to the used ring (with its idx published) as soon as its
   transfer is done. Every guest range written (data read, status bytes) goes into
   marks as (address, length) for the dirty log. */
int avmm_blk_serve(struct avmm_ring *ring, const struct avmm_region *regions,
                   int nregions, int fd, uint64_t capacity, uint32_t flags,
                   uint32_t limit, uint64_t *marks, uint32_t marks_capacity,
                   struct avmm_blk_batch *out)
{
    struct rings r;
    struct chain c;
    struct iovec iov[AVMM_BLK_MAX_CHAIN];
    memset(out, 0, sizeof *out);
    out->stop = AVMM_BLK_SLOW;
    int32_t available = begin_batch(ring, regions, nregions, &r);
    if (available < 0 || marks_capacity < AVMM_BLK_MAX_CHAIN + 1)
        return 0;
    uint32_t size = ring->size;
    uint16_t next_avail = ring->next_avail, next_used = ring->next_used;
    uint16_t pending = (uint16_t)available;
    out->stop = AVMM_BLK_EMPTY;
    while (pending) {
        if (out->requests >= limit || out->bytes_read + out->bytes_written >= BYTE_BUDGET
                || out->marks + AVMM_BLK_MAX_CHAIN + 1 > marks_capacity) {
            out->stop = AVMM_BLK_LIMIT;
            break;
        }
        out->stop = AVMM_BLK_SLOW;
        uint32_t head = available_head(&r, size, next_avail);
        if (head >= size)
            break;
        if (walk(&r, size, head, (flags & AVMM_BLK_INDIRECT) != 0, regions, nregions, &c) < 0)
            break;
        if (c.readable_length < HEADER || c.writable_length < 1 || c.segments[0].length < HEADER)
            break;  /* the Python path refuses it, or reads a header split in two */
        struct { uint32_t type, reserved; uint64_t sector; } header;
        memcpy(&header, c.segments[0].host, HEADER);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        const struct segment *writable = c.segments + c.readable;
        const struct segment *last = &writable[c.writable - 1];
        uint8_t *status = last->host + last->length - 1;
        uint64_t used, length;
        int count;
        if (header.type == T_IN) {
            length = c.writable_length - 1;
            /* A used length past u32 is a protocol error the Python path names. */
            if (!in_range(header.sector, length, capacity) || c.writable_length > 0xffffffffu)
                break;
            count = data_iov(writable, c.writable, 0, length, iov);
            /* Marked whatever the read does: a failed or short one may have written part
               of the buffers too (the caller applies the marks after the call). */
            uint64_t left = length;
            for (uint32_t i = 0; i < c.writable && left; i++) {
                uint64_t take = writable[i].length < left ? writable[i].length : left;
                marks[2 * out->marks] = writable[i].guest;
                marks[2 * out->marks + 1] = take;
                out->marks++;
                left -= take;
            }
            if (transfer(0, fd, iov, count, header.sector << SECTOR_SHIFT, length) < 0)
                break;
            used = c.writable_length;
            out->reads++;
            out->bytes_read += c.writable_length - 1;
        } else if (header.type == T_OUT && (flags & AVMM_BLK_WRITES)) {
            length = c.readable_length - HEADER;
            if (!in_range(header.sector, length, capacity))
                break;
            count = data_iov(c.segments, c.readable, HEADER, length, iov);
            if (transfer(1, fd, iov, count, header.sector << SECTOR_SHIFT, length) < 0)
                break;
            used = 1;
            out->writes++;
            out->bytes_written += length;
        } else {
            break;  /* another type, or a write the Python path refuses or syncs */
        }
        *status = 0;  /* VIRTIO_BLK_S_OK */
        marks[2 * out->marks] = last->guest + last->length - 1;
        marks[2 * out->marks + 1] = 1;
        out->marks++;
        push_used(&r, size, next_used, head, (uint32_t)used);
        next_avail++;
        next_used++;
        pending--;
        /* Published at once: the element (and the data and status before it) first. */
        publish_used(&r, next_used);
        out->requests++;
        out->readable += c.readable_length;
        out->used += used;
        out->stop = AVMM_BLK_EMPTY;
    }
    ring->next_avail = next_avail;
    ring->next_used = next_used;
    return 0;
}
""", include_dirs=[_HERE], depends=[os.path.join(_HERE, "_virtq.h")])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
