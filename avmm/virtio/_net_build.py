"""cffi build script (API mode) for virtio-net's inner loops (:mod:`avmm.virtio.net_fast`).

Per frame, the Python path costs several microseconds of interpreter work on top of the
tap's ``readv``/``writev``, and it holds the GIL that the vCPU threads need. These two
functions do the per-frame work of the usual layouts in C, outside the GIL: walk the
available ring, check each chain, move the frame between guest memory and the tap, fill
the used ring. Python stays the control plane (waits, notifications, limits, stats, the
device's state) and keeps every rule: the C loop handles only what it can prove is the
common case and stops *before* anything else (a chain of another shape, a buffer outside
RAM, a frame of a size to drop, a tap error), leaving the ring exactly where the Python
path takes over. So the C code never reports a protocol error and never drops a frame
silently: what it does is what the Python path would have done, chain for chain
(tests/virtio/test_fuzz_net.py compares the two on the fuzz corpus).

Every value the guest wrote is read once into a local (the guest may rewrite it at any
moment), checked, and only the local is used. Ring indices are 16-bit loads and stores;
the used idx is published with a release store after the elements (x86 keeps stores in
order; the release keeps the compiler from moving them), and the available idx is read
with an acquire load before the entries and descriptors it covers.
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
struct avmm_net_batch {
    uint32_t frames;      /* chains returned to the used ring */
    uint32_t dropped;     /* receive: reads too short for an Ethernet header, dropped */
    uint64_t bytes;       /* frame bytes moved (virtio header excluded) */
    uint64_t chain_bytes; /* transmit: readable bytes of the chains taken */
    int32_t stop;         /* why the batch ended: AVMM_NET_* */
    int32_t error;        /* errno of AVMM_NET_TAP_ERROR */
    uint32_t total;       /* AVMM_NET_OVERFLOW: bytes read (header included) */
    uint32_t first;       /* AVMM_NET_OVERFLOW: of which in the guest's buffer */
    uint32_t marks;       /* receive: (address, length) pairs written into marks */
    uint32_t kept;        /* receive: a runt was read into the chain at next_avail,
                             which was not taken (see avmm_net_receive) */
    uint64_t address;     /* AVMM_NET_OVERFLOW: guest address of that buffer */
};

#define AVMM_NET_LIMIT ...
#define AVMM_NET_EMPTY ...
#define AVMM_NET_SLOW ...
#define AVMM_NET_TAP_BLOCKED ...
#define AVMM_NET_TAP_ERROR ...
#define AVMM_NET_OVERFLOW ...
#define AVMM_NET_NO_BUFFERS ...

int avmm_net_transmit(struct avmm_ring *ring, const struct avmm_region *regions,
                      int nregions, int tap_fd, uint32_t limit, uint32_t offloads,
                      struct avmm_net_batch *out);
int avmm_net_receive(struct avmm_ring *ring, const struct avmm_region *regions,
                     int nregions, int tap_fd, uint32_t limit, int mergeable,
                     int keep_header, uint8_t *bounce, uint32_t bounce_length,
                     uint64_t *marks, struct avmm_net_batch *out);
""")

ffibuilder.set_source("avmm.virtio._net_ffi", r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#include "_virtq.h"

struct avmm_net_batch {
    uint32_t frames, dropped;
    uint64_t bytes, chain_bytes;
    int32_t stop, error;
    uint32_t total, first, marks, kept;
    uint64_t address;
};

/* Why a batch ended. */
#define AVMM_NET_LIMIT 0        /* it handled `limit` chains (receive: frames) */
#define AVMM_NET_EMPTY 1        /* no chain available (transmit), or no frame (receive) */
#define AVMM_NET_SLOW 2         /* the chain at next_avail is for the Python path */
#define AVMM_NET_TAP_BLOCKED 3  /* transmit: the tap's queue is full (EAGAIN) */
#define AVMM_NET_TAP_ERROR 4    /* receive: reading the tap failed (errno in error) */
#define AVMM_NET_OVERFLOW 5     /* receive: a frame larger than the chain's buffer was
                                   read (see avmm_net_receive) */
#define AVMM_NET_NO_BUFFERS 6   /* receive: the driver has no receive buffer available */

#define HEADER 12u              /* struct virtio_net_hdr with num_buffers */
#define MIN_FRAME 14u           /* an Ethernet header */
#define MAX_FRAME 65550u        /* avmm.virtio.net.MAX_FRAME_SIZE */
#define MAX_CHAIN 64u           /* longer transmit chains go the Python way */

static const uint8_t zero_header[HEADER];

/* avmm.virtio.net.transmit_header: the header sent in front of a frame whose driver
   negotiated `offloads` (TX_CSUM 1, TX_TSO4 2, TX_TSO6 4; never 0 here), from the
   guest's copy of it. 0, or -1 where the frame asks for a segmentation never
   negotiated (the Python path drops it, with its log line). */
#define TX_TSO4 2u
#define TX_TSO6 4u
static int transmit_header(const uint8_t guest[HEADER], uint32_t offloads,
                           uint8_t header[HEADER])
{
    uint8_t flags = guest[0] & 1u, gso_type = guest[1];
    memset(header, 0, HEADER);
    header[0] = flags;
    if (flags)
        memcpy(header + 6, guest + 6, 4);       /* csum_start, csum_offset */
    if (gso_type != 0) {
        if (!((gso_type == 1 && (offloads & TX_TSO4))
                || (gso_type == 4 && (offloads & TX_TSO6))))
            return -1;
        header[1] = gso_type;
        memcpy(header + 2, guest + 2, 4);       /* hdr_len, gso_size */
    }
    return 0;
}

int avmm_net_transmit(struct avmm_ring *ring, const struct avmm_region *regions,
                      int nregions, int tap_fd, uint32_t limit, uint32_t offloads,
                      struct avmm_net_batch *out)
{
    struct rings r;
    memset(out, 0, sizeof *out);
    out->stop = AVMM_NET_SLOW;
    int32_t available = begin_batch(ring, regions, nregions, &r);
    if (available < 0)
        return 0;
    uint32_t size = ring->size;
    uint16_t next_avail = ring->next_avail, next_used = ring->next_used;
    uint16_t pending = (uint16_t)available;
    out->stop = AVMM_NET_EMPTY;
    while (pending) {
        if (out->frames == limit) {
            out->stop = AVMM_NET_LIMIT;
            break;
        }
        out->stop = AVMM_NET_SLOW;
        uint32_t head = available_head(&r, size, next_avail);
        if (head >= size)
            break;
        struct iovec iov[MAX_CHAIN + 1];
        uint8_t header[HEADER];
        int count = 1;
        uint64_t chain = 0, skip = HEADER;
        uint32_t index = head, hops = 1;
        iov[0].iov_base = (void *)zero_header;
        iov[0].iov_len = HEADER;
        int ok = 1;
        for (;;) {
            struct descriptor d = read_descriptor(r.desc, index);
            if (d.flags & (F_WRITE | F_INDIRECT)) { ok = 0; break; }
            if (d.length) {
                uint8_t *host = guest_to_host(regions, nregions, d.address, d.length);
                if (!host) { ok = 0; break; }
                if (offloads && chain == 0) {
                    /* The guest's header, whole in the first buffer, copied once. */
                    uint8_t guest[HEADER];
                    if (d.length < HEADER) { ok = 0; break; }
                    memcpy(guest, host, HEADER);
                    __atomic_signal_fence(__ATOMIC_SEQ_CST);
                    if (transmit_header(guest, offloads, header) < 0) { ok = 0; break; }
                    iov[0].iov_base = header;
                }
                chain += d.length;
                if (skip < d.length) {
                    iov[count].iov_base = host + skip;
                    iov[count].iov_len = d.length - skip;
                    count++;
                    skip = 0;
                } else {
                    skip -= d.length;
                }
            }
            if (!(d.flags & F_NEXT))
                break;
            if (d.next >= size || ++hops > MAX_CHAIN || hops > size) { ok = 0; break; }
            index = d.next;
        }
        if (!ok || chain < HEADER + MIN_FRAME || chain > HEADER + MAX_FRAME)
            break;  /* another shape, or a frame the Python path drops (and logs) */
        ssize_t sent = writev(tap_fd, iov, count);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                out->stop = AVMM_NET_TAP_BLOCKED;
            /* Other errors: the Python path sends it again and drops it with a log. */
            break;
        }
        push_used(&r, size, next_used, head, 0);
        next_avail++;
        next_used++;
        pending--;
        out->frames++;
        /* The driver gets its buffers back as the batch goes, not only at its end. */
        if (!(out->frames % 16))
            publish_used(&r, next_used);
        out->bytes += chain - HEADER;
        out->chain_bytes += chain;
        out->stop = AVMM_NET_EMPTY;
    }
    if (out->frames)
        publish_used(&r, next_used);
    ring->next_avail = next_avail;
    ring->next_used = next_used;
    return 0;
}

/* Receive: while the chain at next_avail is one device-writable buffer, read a frame
   from the tap into it (and into `bounce` for what does not fit), write the header
   (flags 0, GSO_NONE, num_buffers 1; with `keep_header`, a driver that takes offloads,
   only num_buffers: the rest is the kernel's) and return it. A read shorter than header +
   Ethernet header is dropped and counted, the buffer kept for the next frame (a batch
   that ends before one arrives says so in `kept`: the Python path, which takes a
   buffer before it reads into it, then takes that chain). A frame
   larger than the buffer ends the batch with AVMM_NET_OVERFLOW: the chain is not taken
   (next_avail stays on it), `first` bytes are in its buffer and total - first in bounce,
   for the Python path to spread over more buffers or drop. At most `limit` reads. Every
   buffer range written goes into marks (address, length) for the dirty log: at most
   `limit` pairs. */
int avmm_net_receive(struct avmm_ring *ring, const struct avmm_region *regions,
                     int nregions, int tap_fd, uint32_t limit, int mergeable,
                     int keep_header, uint8_t *bounce, uint32_t bounce_length,
                     uint64_t *marks, struct avmm_net_batch *out)
{
    struct rings r;
    memset(out, 0, sizeof *out);
    out->stop = AVMM_NET_SLOW;
    int32_t available = begin_batch(ring, regions, nregions, &r);
    if (available < 0 || bounce_length == 0)
        return 0;
    uint32_t size = ring->size;
    uint16_t next_avail = ring->next_avail, next_used = ring->next_used;
    uint16_t pending = (uint16_t)available;
    out->stop = AVMM_NET_EMPTY;
    /* The chain read last: a dropped runt leaves it for the next frame, unread again. */
    int have = 0, written_into = 0;
    uint32_t head = 0;
    uint64_t address = 0;
    uint32_t length = 0;
    uint8_t *host = NULL;
    for (;;) {
        /* Reads, not frames: a flood of runts ends the batch too. */
        if (out->frames + out->dropped == limit) {
            out->stop = AVMM_NET_LIMIT;
            break;
        }
        if (!have) {
            if (!pending) {
                out->stop = AVMM_NET_NO_BUFFERS;
                break;
            }
            out->stop = AVMM_NET_SLOW;
            head = available_head(&r, size, next_avail);
            if (head >= size)
                break;
            struct descriptor d = read_descriptor(r.desc, head);
            if ((d.flags & (F_NEXT | F_INDIRECT)) || !(d.flags & F_WRITE) || !d.length
                    || (mergeable && d.length < HEADER))
                break;
            host = guest_to_host(regions, nregions, d.address, d.length);
            if (!host)
                break;
            address = d.address;
            length = d.length;
            have = 1;
        }
        /* The part of the buffer a frame can use at most: one byte less than the bounce
           buffer, so that a frame larger than the largest one is seen as such. */
        uint32_t first = length < bounce_length - 1 ? length : bounce_length - 1;
        struct iovec iov[2] = { { host, first }, { bounce, bounce_length } };
        ssize_t total = readv(tap_fd, iov, 2);
        if (total < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                out->stop = AVMM_NET_EMPTY;
            } else {
                out->stop = AVMM_NET_TAP_ERROR;
                out->error = errno;
            }
            break;
        }
        uint32_t in_buffer = (uint64_t)total < first ? (uint32_t)total : first;
        if (in_buffer) {
            marks[2 * out->marks] = address;
            marks[2 * out->marks + 1] = in_buffer;
            out->marks++;
        }
        if ((uint64_t)total > first) {
            out->stop = AVMM_NET_OVERFLOW;
            out->total = (uint32_t)total;
            out->first = first;
            out->address = address;
            break;
        }
        if ((uint64_t)total < HEADER + MIN_FRAME) {
            out->dropped++;
            written_into = 1;
            continue;
        }
        /* flags 0, gso_type NONE, hdr_len, gso_size, csum_start, csum_offset 0,
           num_buffers 1 (little-endian). */
        static const uint8_t one_buffer[HEADER] = { [10] = 1 };
        if (keep_header)
            memcpy(host + 10, one_buffer + 10, 2);  /* the kernel's offload fields stay */
        else
            memcpy(host, one_buffer, HEADER);
        push_used(&r, size, next_used, head, (uint32_t)total);
        next_avail++;
        next_used++;
        pending--;
        have = written_into = 0;
        out->frames++;
        out->bytes += (uint64_t)total - HEADER;
    }
    out->kept = written_into && out->stop != AVMM_NET_OVERFLOW;
    if (out->frames)
        publish_used(&r, next_used);
    ring->next_avail = next_avail;
    ring->next_used = next_used;
    return 0;
}
""", include_dirs=[_HERE], depends=[os.path.join(_HERE, "_virtq.h")])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
