/* net-bench: move avmm.n frames (default 1000) of avmm.size bytes (default 64,
 * 22..1514) through net0 as fast as the device takes them, for benchmarks
 * (benchmarks/run.py). Polling, no interrupts; the host measures wall time,
 * the guest also reports the TSC ticks of its loop (cycles=...), for people.
 *
 * Frames: dst ff:ff:ff:ff:ff:ff, src (ours on transmit), ethertype 0x88B6,
 * "AVMMBNCH", then anything.
 *
 * avmm.dir=tx (default): send n frames, keeping avmm.qd (default 32, at most
 * the transmit queue's size) outstanding; completions are drained in batches,
 * refilled, and the queue is notified once per batch. Every outstanding
 * descriptor points at the same read-only frame. Something on the host has
 * to take them (the kernel drops this ethertype on a tap of its own).
 *
 * avmm.tso=1 (transmit only): negotiate VIRTIO_NET_F_CSUM and _HOST_TSO4 and
 * send TCP/IPv4 frames of avmm.size bytes (1502..65549: up to a 64 KiB packet,
 * 10.0.2.15 -> 10.0.2.99, port 9) with a header asking the host to checksum
 * and segment them (MSS 1448): what a Linux guest's TCP sends with TSO.
 *
 * avmm.dir=rx: count n received frames of that ethertype and magic (each must
 * be exactly avmm.size bytes long: a frame of another length is an error);
 * anything else is ignored. A host sender keeps the tap busy. avmm.rxcount
 * receive buffers (default 64, at most the receive queue's size) are kept
 * posted; used ones are taken in batches, reposted, and the queue is notified
 * once per batch. Headers are not looked at.
 *
 * Mailbox counter: frames sent (used) or counted so far. */
#include "guest.h"
#include "timer.h"
#include "virtio_net.h"

#define BENCH_ETHERTYPE 0x88B6
#define BENCH_MAGIC     "AVMMBNCH"
#define BENCH_HEADER    (14 + 8)

static uint8_t bench_tx[NET_HDR_SIZE + NET_TSO_MAX_FRAME] __attribute__((aligned(64)));
/* avmm.tso=1: Ethernet + IPv4 + TCP headers, and the MSS asked for. */
#define TSO_HEADERS     (14 + 20 + 20)
#define TSO_MSS         1448

static bool is_bench_frame(const uint8_t *frame, uint32_t len)
{
    return len >= BENCH_HEADER && frame[12] == (BENCH_ETHERTYPE >> 8) &&
           frame[13] == (BENCH_ETHERTYPE & 0xff) && memcmp(frame + 14, BENCH_MAGIC, 8) == 0;
}

static uint16_t ip_checksum(const uint8_t *data, unsigned len)
{
    uint32_t sum = 0;
    for (unsigned i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)data[i] << 8 | data[i + 1];
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* The TCP/IPv4 frame of avmm.tso=1 behind its header (see the top). */
static void build_tso_frame(struct net *net, uint32_t size)
{
    struct virtio_net_hdr *hdr = (struct virtio_net_hdr *)bench_tx;
    uint8_t *frame = bench_tx + NET_HDR_SIZE;
    hdr->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr->gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
    hdr->hdr_len = TSO_HEADERS;
    hdr->gso_size = TSO_MSS;
    hdr->csum_start = 14 + 20;
    hdr->csum_offset = 16;
    hdr->num_buffers = 0;
    memset(frame, 0xff, 6);
    memcpy(frame + 6, net->mac, 6);
    frame[12] = 0x08;
    frame[13] = 0x00;
    uint8_t *ip = frame + 14;
    uint16_t total = (uint16_t)(size - 14);
    static const uint8_t ip_header[20] = {0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0,
                                          10, 0, 2, 15, 10, 0, 2, 99};
    memcpy(ip, ip_header, 20);
    ip[2] = (uint8_t)(total >> 8);
    ip[3] = (uint8_t)total;
    uint16_t csum = ip_checksum(ip, 20);
    ip[10] = (uint8_t)(csum >> 8);
    ip[11] = (uint8_t)csum;
    uint8_t *tcp = ip + 20;
    static const uint8_t tcp_header[20] = {0x9c, 0x40, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0,
                                           5 << 4, 0x18, 0xff, 0xff, 0, 0, 0, 0};
    memcpy(tcp, tcp_header, 20);
    for (uint32_t i = TSO_HEADERS; i < size; i++)
        frame[i] = (uint8_t)i;
}

static int bench_tx_run(struct net *net, uint64_t n, uint32_t size, bool tso)
{
    struct virtq *vq = &net->dev->queues[NET_TXQ];
    uint64_t qd = cmdline_get_u64("avmm.qd", 32);
    if (qd == 0 || qd > vq->num) {
        guest_printf(GUEST_PREFIX "avmm.qd: must be 1..%u (the transmit queue's size)\n",
                     vq->num);
        return EXIT_FAILURE;
    }
    if (tso) {
        build_tso_frame(net, size);
    } else {
        /* All header fields zero: no offloads, num_buffers 0 (spec 5.1.6.2). */
        memset(bench_tx, 0, NET_HDR_SIZE);
        uint8_t *frame = bench_tx + NET_HDR_SIZE;
        for (uint32_t i = 0; i < size; i++)
            frame[i] = (uint8_t)i;
        memset(frame, 0xff, 6);
        memcpy(frame + 6, net->mac, 6);
        frame[12] = BENCH_ETHERTYPE >> 8;
        frame[13] = BENCH_ETHERTYPE & 0xff;
        memcpy(frame + 14, BENCH_MAGIC, 8);
    }
    struct virtq_buf buf = {(uintptr_t)bench_tx, NET_HDR_SIZE + size, false};

    uint64_t submitted = 0, completed = 0;
    uint64_t start = rdtsc();
    for (; submitted < qd && submitted < n; submitted++) {
        if (virtq_add(vq, &buf, 1, false) < 0)
            guest_panic("net0: transmit queue full");
    }
    if (submitted > 0)
        virtq_kick(vq);
    uint64_t deadline = timer_deadline(VIRTIO_TIMEOUT_MS);
    while (completed < n) {
        bool refilled = false;
        uint16_t head;
        uint32_t len;
        while (virtq_get_used(vq, &head, &len)) {
            completed++;
            if (submitted < n) {
                if (virtq_add(vq, &buf, 1, false) < 0)
                    guest_panic("net0: transmit queue full");
                submitted++;
                refilled = true;
            }
        }
        if (refilled) {
            virtq_kick(vq);
            deadline = timer_deadline(VIRTIO_TIMEOUT_MS);
        } else if (completed < n && timer_expired(deadline)) {
            guest_printf(GUEST_PREFIX "net0 timeout (%lu of %lu frames sent)\n", completed, n);
            return EXIT_FAILURE;
        }
        mailbox.counter = completed;
    }
    guest_printf(GUEST_PREFIX "net-bench dir=tx size=%u n=%lu%s done cycles=%lu\n", size, n,
                 tso ? " tso=1" : "", rdtsc() - start);
    return EXIT_OK;
}

static int bench_rx_run(struct net *net, uint64_t n, uint32_t size)
{
    uint64_t counted = 0;
    uint64_t start = rdtsc();
    uint64_t deadline = timer_deadline(VIRTIO_TIMEOUT_MS);
    while (counted < n) {
        bool reposted = false;
        const uint8_t *data;
        uint32_t len;
        int buffer;
        while ((buffer = net_rx_poll(net, &data, &len)) >= 0) {
            if (len >= NET_HDR_SIZE && len <= net->rx_buffer_size &&
                is_bench_frame(data + NET_HDR_SIZE, len - NET_HDR_SIZE)) {
                if (len - NET_HDR_SIZE != size) {
                    guest_printf(GUEST_PREFIX "net0 bench frame of %u bytes (expected %u)\n",
                                 len - NET_HDR_SIZE, size);
                    return EXIT_FAILURE;
                }
                counted++;
            }
            net_rx_repost(net, (unsigned)buffer);
            reposted = true;
        }
        if (reposted) {
            net_rx_kick(net);
            deadline = timer_deadline(VIRTIO_TIMEOUT_MS);
            mailbox.counter = counted;
        } else if (timer_expired(deadline)) {
            guest_printf(GUEST_PREFIX "net0 timeout (%lu of %lu frames received, %lu seen)\n",
                         counted, n, net->rx_frames);
            return EXIT_FAILURE;
        }
    }
    guest_printf(GUEST_PREFIX "net-bench dir=rx size=%u n=%lu done cycles=%lu\n", size, n,
                 rdtsc() - start);
    return EXIT_OK;
}

static int net_bench_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", 1000);
    uint64_t size = cmdline_get_u64("avmm.size", 64);
    uint64_t rxcount = cmdline_get_u64("avmm.rxcount", NET_RX_POOL);
    const char *dir = "tx";
    size_t dir_len = 2;
    bool rx;

    cmdline_get("avmm.dir", &dir, &dir_len);
    if (dir_len == 2 && memcmp(dir, "tx", 2) == 0) {
        rx = false;
    } else if (dir_len == 2 && memcmp(dir, "rx", 2) == 0) {
        rx = true;
    } else {
        guest_printf(GUEST_PREFIX "avmm.dir: must be tx or rx, not %.*s\n", (int)dir_len, dir);
        return EXIT_FAILURE;
    }
    bool tso = cmdline_get_u64("avmm.tso", 0) != 0;
    if (tso && rx) {
        guest_printf(GUEST_PREFIX "avmm.tso=1 is for avmm.dir=tx\n");
        return EXIT_FAILURE;
    }
    uint32_t smallest = tso ? TSO_HEADERS + TSO_MSS : BENCH_HEADER;
    uint32_t largest = tso ? NET_TSO_MAX_FRAME : NET_MAX_FRAME;
    if (size < smallest || size > largest) {
        guest_printf(GUEST_PREFIX "avmm.size: must be %u..%u\n", smallest, largest);
        return EXIT_FAILURE;
    }
    if (rxcount == 0 || rxcount > NET_RX_POOL) {
        guest_printf(GUEST_PREFIX "avmm.rxcount: must be 1..%u\n", NET_RX_POOL);
        return EXIT_FAILURE;
    }
    if (virtio_count(VIRTIO_ID_NET) == 0) {
        guest_printf(GUEST_PREFIX "no virtio-net device\n");
        return EXIT_FAILURE;
    }
    struct net net;
    uint64_t offloads = tso ? VIRTIO_BIT(VIRTIO_NET_F_CSUM) | VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO4)
                            : 0;
    if (!net_open_offload(&net, 0, (unsigned)rxcount, offloads))
        return EXIT_FAILURE;
    int result = rx ? bench_rx_run(&net, n, (uint32_t)size)
                    : bench_tx_run(&net, n, (uint32_t)size, tso);
    if (result == EXIT_OK)
        net_close(&net);
    return result;
}

SCENARIO("net-bench", net_bench_run);
