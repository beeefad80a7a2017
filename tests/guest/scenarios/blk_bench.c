/* blk-bench: avmm.n (default 1000) random 4 KiB requests on blk0 for
 * benchmarks (benchmarks/run.py). avmm.rw=read (default) or write, avmm.qd=1..32
 * (default 1) requests kept outstanding, polling, no interrupts. Offsets are
 * 4 KiB-aligned, chosen by an LCG (avmm.seed, default 1) over the whole device.
 * Each request is three descriptors (header, data, status), so qd > 21 needs
 * avmm.qsize=128 or more. Completions are drained in batches, refilled, and
 * the queue is notified once per batch. The host measures wall time; the
 * guest also reports the TSC ticks of the loop (cycles=...), for people.
 * avmm.lat=1: each request's latency too (TSC ticks from making it available
 * to finding it used, the first BENCH_LAT_MAX requests), as one line
 * "blk-bench latency n=<k> p50=<t> p99=<t> max=<t>" before the done line; the
 * host converts ticks with the TSC rate KVM gave the vCPU.
 * Mailbox counter: requests completed. */
#include "guest.h"
#include "timer.h"
#include "virtio_blk.h"

#define BENCH_BLOCK    4096u
#define BENCH_MAX_QD   32u
#define BENCH_DESCS    3u

struct bench_slot {
    struct virtio_blk_req_header header;
    uint8_t status;
} __attribute__((aligned(32)));

static uint8_t bench_data[BENCH_MAX_QD][BENCH_BLOCK] __attribute__((aligned(4096)));
static volatile struct bench_slot bench_slots[BENCH_MAX_QD];
static int8_t bench_slot_of_head[VIRTQ_MAX_SIZE];

#define BENCH_LAT_MAX  65536u
static uint64_t bench_sent_at[BENCH_MAX_QD];
static uint32_t bench_lat[BENCH_LAT_MAX];

/* Heapsort: no allocation, no recursion, and n log n for any input. */
static void sift_down(uint32_t *v, size_t root, size_t n)
{
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n)
            return;
        if (child + 1 < n && v[child + 1] > v[child])
            child++;
        if (v[root] >= v[child])
            return;
        uint32_t swap = v[root];
        v[root] = v[child];
        v[child] = swap;
        root = child;
    }
}

static void sort_u32(uint32_t *v, size_t n)
{
    for (size_t i = n / 2; i-- > 0;)
        sift_down(v, i, n);
    for (size_t end = n; end-- > 1;) {
        uint32_t swap = v[0];
        v[0] = v[end];
        v[end] = swap;
        sift_down(v, 0, end);
    }
}

/* The value at or below which `percent` % of the sorted samples lie (nearest rank). */
static uint32_t percentile(const uint32_t *sorted, size_t n, unsigned percent)
{
    size_t rank = (n * percent + 99) / 100;
    return sorted[rank == 0 ? 0 : rank - 1];
}

static uint64_t lcg_next(uint64_t *state)
{
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return *state >> 17;
}

static bool bench_submit(struct virtq *vq, unsigned slot, uint32_t type, uint64_t sector)
{
    volatile struct bench_slot *s = &bench_slots[slot];
    s->header.type = type;
    s->header.reserved = 0;
    s->header.sector = sector;
    s->status = 0xff;
    struct virtq_buf bufs[BENCH_DESCS] = {
        {(uintptr_t)&s->header, sizeof(s->header), false},
        {(uintptr_t)bench_data[slot], BENCH_BLOCK, type == VIRTIO_BLK_T_IN},
        {(uintptr_t)&s->status, 1, true},
    };
    bench_sent_at[slot] = rdtsc();
    int head = virtq_add(vq, bufs, BENCH_DESCS, false);
    if (head < 0)
        return false;
    bench_slot_of_head[head] = (int8_t)slot;
    return true;
}

static int blk_bench_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", 1000);
    uint64_t qd = cmdline_get_u64("avmm.qd", 1);
    uint64_t seed = cmdline_get_u64("avmm.seed", 1);
    bool latency = cmdline_get_u64("avmm.lat", 0) != 0;
    size_t measured = 0;
    const char *rw = "read";
    size_t rw_len = 4;
    uint32_t type;

    cmdline_get("avmm.rw", &rw, &rw_len);
    if (rw_len == 4 && memcmp(rw, "read", 4) == 0) {
        type = VIRTIO_BLK_T_IN;
    } else if (rw_len == 5 && memcmp(rw, "write", 5) == 0) {
        type = VIRTIO_BLK_T_OUT;
    } else {
        guest_printf(GUEST_PREFIX "avmm.rw: must be read or write, not %.*s\n", (int)rw_len, rw);
        return EXIT_FAILURE;
    }
    if (qd == 0 || qd > BENCH_MAX_QD) {
        guest_printf(GUEST_PREFIX "avmm.qd: must be 1..%u\n", BENCH_MAX_QD);
        return EXIT_FAILURE;
    }
    if (!blk_any())
        return EXIT_FAILURE;
    struct blk blk;
    if (!blk_open(&blk, 0))
        return EXIT_FAILURE;
    struct virtq *vq = &blk.dev->queues[0];
    if (qd * BENCH_DESCS > vq->num) {
        guest_printf(GUEST_PREFIX "blk0 queue of %u entries cannot hold qd=%lu "
                     "(3 descriptors each; raise avmm.qsize)\n", vq->num, qd);
        return EXIT_FAILURE;
    }
    if (blk.size_max < BENCH_BLOCK || blk.max_sectors < BENCH_BLOCK / 512) {
        guest_printf(GUEST_PREFIX "blk0 cannot take 4 KiB in one segment\n");
        return EXIT_FAILURE;
    }
    if (type == VIRTIO_BLK_T_OUT && blk.readonly) {
        guest_printf(GUEST_PREFIX "blk0 is read-only\n");
        return EXIT_FAILURE;
    }
    uint64_t blocks = blk.capacity / (BENCH_BLOCK / 512);
    if (blocks == 0) {
        guest_printf(GUEST_PREFIX "blk0 is smaller than 4 KiB\n");
        return EXIT_FAILURE;
    }
    memset(bench_slot_of_head, -1, sizeof(bench_slot_of_head));
    for (unsigned i = 0; i < BENCH_MAX_QD; i++)
        memset(bench_data[i], (int)(0xa5 ^ i), BENCH_BLOCK);

    uint64_t lcg = seed;
    uint64_t submitted = 0, completed = 0;
    uint64_t start = rdtsc();
    for (unsigned slot = 0; slot < qd && submitted < n; slot++, submitted++) {
        if (!bench_submit(vq, slot, type, (lcg_next(&lcg) % blocks) * (BENCH_BLOCK / 512)))
            guest_panic("blk0: queue full");
    }
    if (submitted > 0)
        virtq_kick(vq);
    uint64_t deadline = timer_deadline(VIRTIO_TIMEOUT_MS);
    while (completed < n) {
        bool refilled = false;
        uint16_t head;
        uint32_t len;
        while (virtq_get_used(vq, &head, &len)) {
            int slot = head < VIRTQ_MAX_SIZE ? bench_slot_of_head[head] : -1;
            if (slot < 0)
                guest_panic("blk0: used id %u was not submitted", head);
            bench_slot_of_head[head] = -1;
            uint8_t status = bench_slots[slot].status;
            if (status != VIRTIO_BLK_S_OK) {
                guest_printf(GUEST_PREFIX "blk-bench FAIL sector=%lu status=%s\n",
                             bench_slots[slot].header.sector, blk_status_name(status));
                return EXIT_FAILURE;
            }
            completed++;
            if (latency && measured < BENCH_LAT_MAX) {
                uint64_t ticks = rdtsc() - bench_sent_at[slot];
                bench_lat[measured++] = ticks > UINT32_MAX ? UINT32_MAX : (uint32_t)ticks;
            }
            if (submitted < n) {
                if (!bench_submit(vq, (unsigned)slot, type,
                                  (lcg_next(&lcg) % blocks) * (BENCH_BLOCK / 512)))
                    guest_panic("blk0: queue full");
                submitted++;
                refilled = true;
            }
        }
        if (refilled) {
            virtq_kick(vq);
            deadline = timer_deadline(VIRTIO_TIMEOUT_MS);
        } else if (timer_expired(deadline)) {
            guest_printf(GUEST_PREFIX "blk0 timeout (%lu of %lu requests completed)\n",
                         completed, n);
            return EXIT_FAILURE;
        }
        mailbox.counter = completed;
    }
    uint64_t cycles = rdtsc() - start;
    blk_close(&blk);
    if (latency && measured > 0) {
        sort_u32(bench_lat, measured);
        guest_printf(GUEST_PREFIX "blk-bench latency n=%lu p50=%u p99=%u max=%u\n",
                     (uint64_t)measured, percentile(bench_lat, measured, 50),
                     percentile(bench_lat, measured, 99), bench_lat[measured - 1]);
    }
    guest_printf(GUEST_PREFIX "blk-bench rw=%s qd=%lu n=%lu done cycles=%lu\n",
                 type == VIRTIO_BLK_T_IN ? "read" : "write", qd, n, cycles);
    return EXIT_OK;
}

SCENARIO("blk-bench", blk_bench_run);
