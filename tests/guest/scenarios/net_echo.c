/* net-echo: send avmm.n frames (default 10) on net0 and wait for each to come
 * back from an echoer on the host side (tests/virtio_guest_support.py).
 *
 * Frame k (1..n), avmm.size bytes long (default 64, 26..1514):
 *   dst ff:ff:ff:ff:ff:ff, src = our MAC, ethertype 0x88B5,
 *   "AVMMECHO", k as u32 little-endian, then byte i of the frame = (k * 7 + i) & 0xff.
 * The echo is accepted when it has ethertype 0x88B5, the magic and sequence
 * k; then its length and bytes 14.. must equal what was sent. Anything else
 * (IPv6 neighbour discovery from the host, late duplicates) is ignored.
 * avmm.mrg=1 negotiates VIRTIO_NET_F_MRG_RXBUF. Mailbox counter: frames
 * echoed so far.
 *
 * avmm.resend_ms=M (default 0: never) resends frame k, unchanged, whenever M ms
 * (on the TSC) pass without its echo, until the 5 s timeout: a frame or echo
 * lost on the way (e.g. in the source's tap at a live migration's hand-over)
 * then costs a resend instead of the run. The echo of an earlier copy and of
 * the resent one are the same frame: the first accepted, the others ignored
 * as late duplicates. With M set, `net0 resent=<R>` follows the echoed line. */
#include "guest.h"
#include "timer.h"
#include "virtio_net.h"

#define ECHO_ETHERTYPE   0x88B5
#define ECHO_MAGIC       "AVMMECHO"
#define ECHO_HEADER      (14 + 8 + 4)
#define ECHO_TIMEOUT_MS  5000

static uint8_t tx_frame[NET_MAX_FRAME];
static uint8_t rx_frame[NET_MAX_FRAME];

static void build_frame(const uint8_t mac[6], uint32_t k, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        tx_frame[i] = (uint8_t)(k * 7 + i);
    memset(tx_frame, 0xff, 6);
    memcpy(tx_frame + 6, mac, 6);
    tx_frame[12] = ECHO_ETHERTYPE >> 8;
    tx_frame[13] = ECHO_ETHERTYPE & 0xff;
    memcpy(tx_frame + 14, ECHO_MAGIC, 8);
    for (unsigned b = 0; b < 4; b++)
        tx_frame[22 + b] = (uint8_t)(k >> (8 * b));
}

static bool is_echo_of(const uint8_t *frame, uint32_t len, uint32_t k)
{
    if (len < ECHO_HEADER || frame[12] != (ECHO_ETHERTYPE >> 8) ||
        frame[13] != (ECHO_ETHERTYPE & 0xff) || memcmp(frame + 14, ECHO_MAGIC, 8) != 0)
        return false;
    uint32_t seq = 0;
    for (unsigned b = 0; b < 4; b++)
        seq |= (uint32_t)frame[22 + b] << (8 * b);
    return seq == k;
}

static int net_echo_run(void)
{
    uint64_t n = cmdline_get_u64("avmm.n", 10);
    uint64_t size = cmdline_get_u64("avmm.size", 64);
    bool mrg = cmdline_get_u64("avmm.mrg", 0) != 0;
    uint64_t resend_ms = cmdline_get_u64("avmm.resend_ms", 0);
    if (size < ECHO_HEADER || size > NET_MAX_FRAME)
        guest_panic("avmm.size: must be %u..%u", ECHO_HEADER, NET_MAX_FRAME);
    if (n > 0xffffffffu)
        guest_panic("avmm.n: too large");
    if (resend_ms >= ECHO_TIMEOUT_MS)
        guest_panic("avmm.resend_ms: must be below the %u ms timeout", ECHO_TIMEOUT_MS);

    if (virtio_count(VIRTIO_ID_NET) == 0) {
        guest_printf(GUEST_PREFIX "no virtio-net device\n");
        return EXIT_FAILURE;
    }
    struct net net;
    if (!net_open(&net, 0, mrg))
        return EXIT_FAILURE;
    if ((uint64_t)net.rx_buffer_size * net.rx_posted < NET_HDR_SIZE + size)
        guest_panic("net0: %u receive buffers of %u bytes cannot hold a %lu-byte frame",
                    net.rx_posted, net.rx_buffer_size, size);
    guest_printf(GUEST_PREFIX "net0 mac=%02x:%02x:%02x:%02x:%02x:%02x\n", net.mac[0],
                 net.mac[1], net.mac[2], net.mac[3], net.mac[4], net.mac[5]);

    uint32_t len = (uint32_t)size;
    uint64_t resent = 0;
    for (uint32_t k = 1; k <= n; k++) {
        build_frame(net.mac, k, len);
        net_send(&net, tx_frame, len);
        uint64_t deadline = timer_deadline(ECHO_TIMEOUT_MS);
        uint64_t resend_at = resend_ms ? timer_deadline(resend_ms) : 0;
        for (;;) {
            /* Wait until the echo, the next resend or the timeout, whichever is first. */
            bool resend_first = resend_ms && (int64_t)(resend_at - deadline) < 0;
            uint64_t until = resend_first ? resend_at : deadline;
            uint64_t now = rdtsc();
            uint64_t left_ms = timer_expired(until) ? 0 : (until - now) / timer_tsc_khz();
            if (left_ms == 0 && resend_first) {
                net_send(&net, tx_frame, len);
                resent++;
                resend_at = timer_deadline(resend_ms);
                continue;
            }
            uint32_t got;
            enum net_rx r = left_ms ? net_receive(&net, rx_frame, &got, left_ms) : NET_RX_TIMEOUT;
            if (r == NET_RX_ERROR)
                return EXIT_FAILURE;
            if (r == NET_RX_TIMEOUT && resend_first)
                continue; /* time to resend */
            if (r == NET_RX_TIMEOUT) {
                guest_printf(GUEST_PREFIX "net0 timeout (no echo of seq=%u, %lu frames seen)\n",
                             k, net.rx_frames);
                return EXIT_FAILURE;
            }
            if (!is_echo_of(rx_frame, got, k))
                continue;
            if (got != len || memcmp(rx_frame + 14, tx_frame + 14, len - 14) != 0) {
                guest_printf(GUEST_PREFIX "net0 echo corrupt seq=%u len=%u expected=%u\n", k,
                             got, len);
                return EXIT_FAILURE;
            }
            break;
        }
        mailbox.counter = k;
    }
    net_close(&net);
    guest_printf(GUEST_PREFIX "net0 echoed=%lu\n", n);
    if (resend_ms)
        guest_printf(GUEST_PREFIX "net0 resent=%lu\n", resent);
    return EXIT_OK;
}

SCENARIO("net-echo", net_echo_run);
