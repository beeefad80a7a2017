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

struct avmm_blk_wait {
    int32_t kick_fd, stop_fd, call_fd;
    uint32_t signalled;
    uint32_t control;
    uint64_t publish_ns;
    uint64_t spin_ns;
    uint32_t spin_misses, spin_rest;
    uint64_t kicks;
    uint32_t signals, batches;
};

#define AVMM_BLK_LIMIT ...
#define AVMM_BLK_EMPTY ...
#define AVMM_BLK_SLOW ...
#define AVMM_BLK_STOPPED ...
#define AVMM_BLK_PUBLISH ...
#define AVMM_BLK_NONE_SIGNALLED ...
#define AVMM_BLK_EVENT_IDX ...
#define AVMM_BLK_WRITES ...
#define AVMM_BLK_INDIRECT ...
#define AVMM_BLK_MAX_CHAIN ...

int avmm_blk_serve(struct avmm_ring *ring, const struct avmm_region *regions,
                   int nregions, int fd, uint64_t capacity, uint32_t flags,
                   uint32_t limit, uint64_t *marks, uint32_t marks_capacity,
                   struct avmm_blk_batch *out);
int avmm_blk_run(struct avmm_ring *ring, const struct avmm_region *regions,
                 int nregions, int fd, uint64_t capacity, uint32_t flags,
                 uint64_t *marks, uint32_t marks_capacity, struct avmm_blk_wait *wait,
                 struct avmm_blk_batch *out);
""")

ffibuilder.set_source("avmm.virtio._blk_ffi", r"""
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_virtq.h"

struct avmm_blk_batch {
    uint32_t requests, reads, writes;
    int32_t stop;
    uint64_t bytes_read, bytes_written, readable, used;
    uint32_t marks;
};

struct avmm_blk_wait {
    int32_t kick_fd, stop_fd, call_fd;
    uint32_t signalled;     /* in/out: the used idx at the last look for a notification
                               (QueueState.signalled_used), AVMM_BLK_NONE_SIGNALLED: none */
    uint32_t control;       /* set by Python from any thread: return at the next look */
    uint64_t publish_ns;    /* return this long after the first completion not yet
                               reported, so that the counters stay current */
    uint64_t spin_ns;       /* the longest look for a new request after a batch, the
                               driver's notifications still off, before re-arming them
                               and sleeping in poll(2) */
    uint32_t spin_misses, spin_rest;  /* in/out: whether looks pay (see SPIN_MISSES) */
    uint64_t kicks;         /* out: the driver's notifications read from kick_fd */
    uint32_t signals;       /* out: interrupts written to call_fd */
    uint32_t batches;       /* out: batches that served a request */
};

/* Why a batch (avmm_blk_serve) or a run (avmm_blk_run) ended. */
#define AVMM_BLK_LIMIT 0   /* it served `limit` requests (a batch), BYTE_BUDGET bytes, or
                              the marks array is full */
#define AVMM_BLK_EMPTY 1   /* it served every chain that was available when it began */
#define AVMM_BLK_SLOW 2    /* the chain at next_avail is for the Python path */
#define AVMM_BLK_STOPPED 3 /* a run: `control` was set or stop_fd became readable */
#define AVMM_BLK_PUBLISH 4 /* a run: publish_ns passed since the first completion */
/* Internal: a batch served `limit` requests; a run goes on with the next one. */
#define BATCH_FULL 5

#define AVMM_BLK_NONE_SIGNALLED 0x10000u

/* flags */
#define AVMM_BLK_WRITES 1u    /* OUT may be served: a writable disk in writeback mode */
#define AVMM_BLK_INDIRECT 2u  /* VIRTIO_F_INDIRECT_DESC was negotiated */
#define AVMM_BLK_EVENT_IDX 4u /* VIRTIO_F_EVENT_IDX was negotiated (a run's notifications) */

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

/* One batch: serve the IN and OUT requests available when it begins, in ring order,
   at most `limit`, adding to `out`'s counts and marks: each is returned to the used ring
   (with its idx published) as soon as its transfer is done. Every guest range written
   (data read, status bytes) goes into marks as (address, length) for the dirty log.
   Returns why it ended (AVMM_BLK_*, BATCH_FULL for `limit`); `r` holds the ring's
   parts, for a caller that goes on to notify. A run passes its `control` word, looked
   at before each request (STOPPED once set): a VM that starts to pause sets it, and
   its disk then takes no request it had not started, as the Python path's pop. */
static int32_t serve(struct avmm_ring *ring, const struct avmm_region *regions,
                     int nregions, int fd, uint64_t capacity, uint32_t flags,
                     uint32_t limit, uint64_t *marks, uint32_t marks_capacity,
                     struct avmm_blk_batch *out, struct rings *rings,
                     const uint32_t *control)
{
    struct rings r;
    struct chain c;
    struct iovec iov[AVMM_BLK_MAX_CHAIN];
    int32_t available = begin_batch(ring, regions, nregions, &r);
    if (available < 0 || marks_capacity < AVMM_BLK_MAX_CHAIN + 1)
        return AVMM_BLK_SLOW;
    *rings = r;
    uint32_t size = ring->size, served = 0;
    uint16_t next_avail = ring->next_avail, next_used = ring->next_used;
    uint16_t pending = (uint16_t)available;
    int32_t stop = AVMM_BLK_EMPTY;
    while (pending) {
        if (out->bytes_read + out->bytes_written >= BYTE_BUDGET
                || out->marks + AVMM_BLK_MAX_CHAIN + 1 > marks_capacity) {
            stop = AVMM_BLK_LIMIT;
            break;
        }
        if (served >= limit) {
            stop = BATCH_FULL;
            break;
        }
        if (control && __atomic_load_n(control, __ATOMIC_ACQUIRE)) {
            stop = AVMM_BLK_STOPPED;
            break;
        }
        stop = AVMM_BLK_SLOW;
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
        served++;
        out->requests++;
        out->readable += c.readable_length;
        out->used += used;
        stop = AVMM_BLK_EMPTY;
    }
    ring->next_avail = next_avail;
    ring->next_used = next_used;
    return stop;
}

/* A batch for the Python loop (avmm.virtio.blk_fast.BlockFastPath.serve). */
int avmm_blk_serve(struct avmm_ring *ring, const struct avmm_region *regions,
                   int nregions, int fd, uint64_t capacity, uint32_t flags,
                   uint32_t limit, uint64_t *marks, uint32_t marks_capacity,
                   struct avmm_blk_batch *out)
{
    struct rings r;
    memset(out, 0, sizeof *out);
    int32_t stop = serve(ring, regions, nregions, fd, capacity, flags, limit, marks,
                         marks_capacity, out, &r, NULL);
    out->stop = stop == BATCH_FULL ? AVMM_BLK_LIMIT : stop;
    return 0;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* After a batch's pushes: interrupt the driver if it wants a used buffer notification
   now, by the rules of avmm.virtio.queue's should_notify (vring_need_event with
   EVENT_IDX, else the NO_INTERRUPT flag), which this replaces for the run. */
static void notify(const struct rings *r, uint32_t size, uint32_t flags, uint16_t next_used,
                   struct avmm_blk_wait *w)
{
    uint32_t old = w->signalled;
    w->signalled = next_used;
    if (old == next_used)
        return;
    /* The used idx store must be visible before we read what the driver wants, or a
       driver that just re-armed would wait for an interrupt we skip. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int wanted;
    if (flags & AVMM_BLK_EVENT_IDX) {
        uint16_t used_event = load_u16(r->avail + 4 + 2 * (size_t)size);
        wanted = old == AVMM_BLK_NONE_SIGNALLED
            || (uint16_t)(next_used - used_event - 1) < (uint16_t)(next_used - (uint16_t)old);
    } else {
        wanted = !(load_u16(r->avail) & 1u);  /* VIRTQ_AVAIL_F_NO_INTERRUPT */
    }
    if (!wanted)
        return;
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(w->call_fd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
    /* EAGAIN: the counter is full, so an interrupt is pending anyway. */
    if (n == (ssize_t)sizeof one)
        w->signals++;
}

/* The driver's notifications on (EVENT_IDX: avail_event at our position; else the used
   ring's NO_NOTIFY flag cleared) or off, as VirtQueue's enable/disable_notifications. */
static void set_notifications(const struct rings *r, uint32_t size, uint32_t flags,
                              uint16_t next_avail, int on)
{
    if (flags & AVMM_BLK_EVENT_IDX) {
        if (on)
            __atomic_store_n((uint16_t *)(r->used + 4 + 8 * (size_t)size), next_avail,
                             __ATOMIC_RELAXED);
    } else {
        __atomic_store_n((uint16_t *)r->used, on ? 0 : 1 /* VIRTQ_USED_F_NO_NOTIFY */,
                         __ATOMIC_RELAXED);
    }
}

/* Look at the available idx for up to `window` ns (or until `control` is set): whether
   the driver made a new request available meanwhile. The driver's notifications stay
   off while we look, so a driver that submits its next request soon after a completion
   (queue depth 1) neither exits to kick us nor waits for this thread to wake up: on this
   project's KVM an exit costs 8 to 80 us and a wake-up tens more, against a few us for
   the request itself. QEMU's iothreads poll the same way (poll-max-ns). */
static int spin(const struct rings *r, uint16_t next_avail, uint64_t window,
                const struct avmm_blk_wait *w)
{
    uint64_t until = now_ns() + window;
    do {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n((const uint16_t *)(r->avail + 2), __ATOMIC_ACQUIRE)
                    != next_avail)
                return 1;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    } while (!__atomic_load_n(&w->control, __ATOMIC_RELAXED) && now_ns() < until);
    return 0;
}

/* Whether a look pays is learnt from the looks themselves (not from how long a sleep
   lasted: on this project's KVM the kick's exit and the wake-up alone can take longer
   than the longest look): after SPIN_MISSES looks in a row that found nothing, the next
   SPIN_REST batches go without one, then looks are tried again. A driver whose requests
   come further apart than the look then costs a look every few dozen batches; one that
   polls keeps them all. */
#define SPIN_MISSES 4u
#define SPIN_REST 64u

/* The event fields (used_event after the available ring, avail_event after the used
   ring) are in RAM too: map_rings covers the rings without them, and VirtQueue.validate
   checks them, but this loop writes avail_event and must not rely on a caller for it. */
static int event_fields_mapped(const struct avmm_ring *ring,
                               const struct avmm_region *regions, int nregions)
{
    uint64_t size = ring->size;
    return guest_to_host(regions, nregions, ring->avail, 6 + 2 * size)
        && guest_to_host(regions, nregions, ring->used, 6 + 8 * size);
}

/* The I/O thread's whole loop while nothing needs Python: batches as avmm_blk_serve
   serves them, the notifications, the interrupts, a look for the driver's next request
   after a batch (spin) and the waits for the driver's kicks, all outside the GIL.
   Returns (out->stop) at the first chain for the Python path (SLOW; also a ring whose
   event fields are not in RAM), when the marks array or byte budget is used up (LIMIT),
   when `control` is set or stop_fd is readable (STOPPED), or publish_ns after the first
   completion not yet reported (PUBLISH); the caller then reports what `out` and `wait`
   counted and applies the marks. 0, or -errno where poll(2) or reading the kick eventfd
   failed (what was served is in `out` either way). */
int avmm_blk_run(struct avmm_ring *ring, const struct avmm_region *regions,
                 int nregions, int fd, uint64_t capacity, uint32_t flags,
                 uint64_t *marks, uint32_t marks_capacity, struct avmm_blk_wait *w,
                 struct avmm_blk_batch *out)
{
    memset(out, 0, sizeof *out);
    w->kicks = 0;
    w->signals = 0;
    w->batches = 0;
    if ((flags & AVMM_BLK_EVENT_IDX) && !event_fields_mapped(ring, regions, nregions)) {
        out->stop = AVMM_BLK_SLOW;
        return 0;
    }
    uint64_t first = 0;  /* when the first completion not yet reported was made */
    int busy = 0;        /* the pass before served requests: the driver is active */
    for (;;) {
        if (__atomic_load_n(&w->control, __ATOMIC_ACQUIRE)) {
            out->stop = AVMM_BLK_STOPPED;
            return 0;
        }
        struct rings r;
        if (map_rings(ring, regions, nregions, &r) < 0) {
            out->stop = AVMM_BLK_SLOW;
            return 0;
        }
        set_notifications(&r, ring->size, flags, ring->next_avail, 0);
        uint32_t before = out->requests;
        int32_t stop = serve(ring, regions, nregions, fd, capacity, flags, ring->size,
                             marks, marks_capacity, out, &r, &w->control);
        int served = out->requests != before;
        if (served) {
            w->batches++;
            notify(&r, ring->size, flags, ring->next_used, w);
            if (!first)
                first = now_ns();
        }
        if (stop == AVMM_BLK_SLOW || stop == AVMM_BLK_LIMIT || stop == AVMM_BLK_STOPPED) {
            out->stop = stop;
            return 0;
        }
        if (first && now_ns() - first >= w->publish_ns) {
            out->stop = AVMM_BLK_PUBLISH;
            return 0;
        }
        if (stop == BATCH_FULL || served) {
            busy = 1;
            continue;  /* look again before re-arming: a polling driver refills */
        }
        /* Only after a batch: a kick that brought nothing starts no look. */
        if (busy && w->spin_ns) {
            if (w->spin_rest) {
                w->spin_rest--;
            } else if (spin(&r, ring->next_avail, w->spin_ns, w)) {
                w->spin_misses = 0;
                continue;
            } else if (++w->spin_misses >= SPIN_MISSES) {
                w->spin_misses = 0;
                w->spin_rest = SPIN_REST;
            }
        }
        busy = 0;
        set_notifications(&r, ring->size, flags, ring->next_avail, 1);
        /* The request must be visible before we look at the available idx. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n((const uint16_t *)(r.avail + 2), __ATOMIC_ACQUIRE)
                != ring->next_avail)
            continue;  /* made available before the driver saw the request */
        if (__atomic_load_n(&w->control, __ATOMIC_ACQUIRE)) {
            out->stop = AVMM_BLK_STOPPED;  /* asked during the look: not after a sleep */
            return 0;
        }
        uint64_t asleep = now_ns();
        int timeout = -1;
        if (first) {
            uint64_t left = w->publish_ns - (asleep - first);
            if (asleep - first >= w->publish_ns)
                left = 0;
            timeout = (int)((left + 999999) / 1000000);
        }
        struct pollfd fds[2] = {
            { .fd = w->kick_fd, .events = POLLIN },
            { .fd = w->stop_fd, .events = POLLIN },
        };
        int n = poll(fds, 2, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int error = errno;
            out->stop = AVMM_BLK_STOPPED;
            return -error;
        }
        if (n == 0) {
            out->stop = AVMM_BLK_PUBLISH;
            return 0;
        }
        if ((fds[0].revents | fds[1].revents) & (POLLERR | POLLNVAL)) {
            out->stop = AVMM_BLK_STOPPED;
            return -EBADF;
        }
        if (fds[1].revents & POLLIN) {
            out->stop = AVMM_BLK_STOPPED;
            return 0;
        }
        if (fds[0].revents & POLLIN) {
            uint64_t kicks;
            ssize_t got = read(w->kick_fd, &kicks, sizeof kicks);
            if (got == (ssize_t)sizeof kicks) {
                w->kicks += kicks;
            } else if (got < 0 && errno != EAGAIN && errno != EINTR) {
                int error = errno;
                out->stop = AVMM_BLK_STOPPED;
                return -error;
            }
        }
    }
}
""", include_dirs=[_HERE], depends=[os.path.join(_HERE, "_virtq.h")])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
