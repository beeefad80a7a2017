/* Polling virtio-net driver (virtio 1.2, section 5.1): one receive queue
 * (0) kept full of 2 KiB buffers, one transmit queue (1), the 12-byte
 * struct virtio_net_hdr (VERSION_1) in front of every frame; no offloads
 * unless asked for (net_open_offload: transmit checksum and TSO, net-bench). */
#ifndef AVMM_GUEST_VIRTIO_NET_H
#define AVMM_GUEST_VIRTIO_NET_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio.h"

#define VIRTIO_NET_F_CSUM       0
#define VIRTIO_NET_F_MAC        5
#define VIRTIO_NET_F_HOST_TSO4  11
#define VIRTIO_NET_F_MRG_RXBUF  15

#define NET_HDR_SIZE            12
#define NET_RX_BUFFERS          16
/* Receive buffers there are in all; net_open posts NET_RX_BUFFERS of them,
 * net_open_rx (net-bench) up to this many. */
#define NET_RX_POOL             64
#define NET_RXQ                 0
#define NET_TXQ                 1
#define NET_RX_BUFFER_SIZE      2048
#define NET_MAX_FRAME           1514
/* The largest frame with VIRTIO_NET_F_HOST_TSO4: a 64 KiB IPv4 packet. */
#define NET_TSO_MAX_FRAME       (14 + 65535)
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_TCPV4    1
/* Smallest receive buffers: a header and a frame without MRG_RXBUF (spec
 * 5.1.6.3.1), with it anything from 64 bytes (a frame spans buffers). */
#define NET_MIN_RX_BUFFER       (NET_HDR_SIZE + NET_MAX_FRAME)
#define NET_MIN_RX_BUFFER_MRG   64
/* Used when the device offers no MAC (locally administered). */
#define NET_FALLBACK_MAC        {0x02, 0x00, 0x00, 0x00, 0x00, 0x10}

struct virtio_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

_Static_assert(sizeof(struct virtio_net_hdr) == NET_HDR_SIZE, "virtio_net_hdr is 12 bytes");

struct net {
    struct virtio_dev *dev;
    uint8_t mac[6];
    bool mrg;               /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    bool lax_num_buffers;   /* avmm.lax_num_buffers=1: accept 0 for 1 without mrg */
    uint32_t rx_buffer_size; /* avmm.rxbuf: bytes per receive buffer */
    unsigned rx_posted;     /* receive buffers kept on the ring */
    uint64_t rx_frames;     /* frames received (any) */
};

/* Initialise net<index>; with `mrg` also negotiate MRG_RXBUF (and fail if it
 * is not offered). Posts the receive buffers, avmm.rxbuf bytes each (default
 * NET_RX_BUFFER_SIZE). Prints a line on failure. */
bool net_open(struct net *net, unsigned index, bool mrg);

/* net_open with `rx_buffers` (1..NET_RX_POOL) receive buffers posted instead of
 * NET_RX_BUFFERS (fewer if the queue is smaller). */
bool net_open_rx(struct net *net, unsigned index, bool mrg, unsigned rx_buffers);

/* net_open_rx that also negotiates the features in `offloads` (VIRTIO_BIT()s of
 * VIRTIO_NET_F_CSUM and _HOST_TSO4), failing with a line if one is not offered. */
bool net_open_offload(struct net *net, unsigned index, unsigned rx_buffers,
                      uint64_t offloads);

/* Send one frame (without header, len <= NET_MAX_FRAME) and wait for the
 * device to give the buffer back; exits on timeout or NEEDS_RESET. */
void net_send(struct net *net, const void *frame, uint32_t len);

/* Outcome of net_receive. */
enum net_rx {
    NET_RX_FRAME,
    NET_RX_TIMEOUT,
    NET_RX_ERROR,   /* a line was printed */
};

/* Wait up to `timeout_ms` for the next frame; copy it (without header) to
 * `frame` (NET_MAX_FRAME bytes at least; longer frames are an error) and set
 * *len. The receive buffers are posted again before returning. */
enum net_rx net_receive(struct net *net, void *frame, uint32_t *len, uint64_t timeout_ms);

/* Non-blocking receive without copying, for benchmarks (net-bench): if a used
 * receive buffer is there, return its index (>= 0), point *data at what the
 * device wrote (virtio_net_hdr first) and set *len to the used length; -1 if
 * there is none. The buffer stays the caller's until net_rx_repost(), which
 * puts it back on the ring without notifying: call net_rx_kick() once after a
 * batch. Headers are not checked. */
int net_rx_poll(struct net *net, const uint8_t **data, uint32_t *len);
void net_rx_repost(struct net *net, unsigned buffer);
void net_rx_kick(struct net *net);

void net_close(struct net *net);

#endif
