#include "virtio_net.h"

#include "guest.h"
#include "timer.h"

#define RXQ NET_RXQ
#define TXQ NET_TXQ

static uint8_t rx_buffers[NET_RX_POOL][NET_RX_BUFFER_SIZE] __attribute__((aligned(4096)));
static uint8_t tx_buffer[NET_HDR_SIZE + NET_MAX_FRAME] __attribute__((aligned(64)));
/* Descriptor head -> receive buffer. */
static int16_t rx_of_head[VIRTQ_MAX_SIZE];

static bool post_rx(struct net *net, unsigned buffer)
{
    struct virtq *vq = &net->dev->queues[RXQ];
    struct virtq_buf buf = {(uintptr_t)rx_buffers[buffer], net->rx_buffer_size, true};
    int head = virtq_add(vq, &buf, 1, false);
    if (head < 0)
        return false;
    rx_of_head[head] = (int16_t)buffer;
    return true;
}

bool net_open(struct net *net, unsigned index, bool mrg)
{
    return net_open_rx(net, index, mrg, NET_RX_BUFFERS);
}

static bool net_open_with(struct net *net, unsigned index, bool mrg, unsigned rx_buffers,
                          uint64_t offloads);

bool net_open_rx(struct net *net, unsigned index, bool mrg, unsigned rx_buffers)
{
    return net_open_with(net, index, mrg, rx_buffers, 0);
}

bool net_open_offload(struct net *net, unsigned index, unsigned rx_buffers, uint64_t offloads)
{
    return net_open_with(net, index, false, rx_buffers, offloads);
}

static bool net_open_with(struct net *net, unsigned index, bool mrg, unsigned rx_buffers,
                          uint64_t offloads)
{
    if (rx_buffers == 0 || rx_buffers > NET_RX_POOL)
        guest_panic("net_open_rx: %u receive buffers (1..%u)", rx_buffers, NET_RX_POOL);
    memset(net, 0, sizeof(*net));
    net->dev = virtio_find(VIRTIO_ID_NET, index);
    if (!net->dev) {
        guest_printf(GUEST_PREFIX "no virtio-net device\n");
        return false;
    }
    struct virtio_dev *dev = net->dev;
    uint64_t wanted = VIRTIO_BIT(VIRTIO_NET_F_MAC) | offloads;
    if (mrg)
        wanted |= VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
    if (!virtio_begin_init(dev, wanted))
        return false;
    for (unsigned bit = 0; bit < 64; bit++) {
        if ((offloads & VIRTIO_BIT(bit)) && !virtio_has(dev, bit)) {
            guest_printf(GUEST_PREFIX "%s does not offer feature bit %u\n", dev->name, bit);
            return false;
        }
    }
    if (mrg && !virtio_has(dev, VIRTIO_NET_F_MRG_RXBUF)) {
        guest_printf(GUEST_PREFIX "%s does not offer VIRTIO_NET_F_MRG_RXBUF\n", dev->name);
        return false;
    }
    net->mrg = mrg;
    net->lax_num_buffers = cmdline_get_u64("avmm.lax_num_buffers", 0) != 0;
    uint64_t rxbuf = cmdline_get_u64("avmm.rxbuf", NET_RX_BUFFER_SIZE);
    uint64_t min = mrg ? NET_MIN_RX_BUFFER_MRG : NET_MIN_RX_BUFFER;
    if (rxbuf < min || rxbuf > NET_RX_BUFFER_SIZE)
        guest_panic("avmm.rxbuf: must be %lu..%u%s", min, NET_RX_BUFFER_SIZE,
                    mrg ? "" : " without avmm.mrg=1");
    net->rx_buffer_size = (uint32_t)rxbuf;
    if (virtio_has(dev, VIRTIO_NET_F_MAC)) {
        for (unsigned i = 0; i < 6; i++)
            net->mac[i] = virtio_config_read8(dev, i);
    } else {
        static const uint8_t fallback[6] = NET_FALLBACK_MAC;
        memcpy(net->mac, fallback, 6);
    }
    if (!virtio_setup_queue(dev, RXQ) || !virtio_setup_queue(dev, TXQ))
        return false;
    for (unsigned i = 0; i < VIRTQ_MAX_SIZE; i++)
        rx_of_head[i] = -1;
    /* Receive buffers go on the ring before DRIVER_OK (spec 5.1.5), the
     * notification only after it (spec 3.1.1). */
    for (unsigned i = 0; i < rx_buffers; i++) {
        if (!post_rx(net, i))
            break; /* a small queue: fewer buffers */
        net->rx_posted++;
    }
    if (net->rx_posted == 0) {
        guest_printf(GUEST_PREFIX "%s receive queue takes no buffer\n", dev->name);
        return false;
    }
    if (!virtio_driver_ok(dev))
        return false;
    virtq_kick(&dev->queues[RXQ]);
    return true;
}

void net_send(struct net *net, const void *frame, uint32_t len)
{
    struct virtq *vq = &net->dev->queues[TXQ];
    if (len > NET_MAX_FRAME)
        guest_panic("%s: frame of %u bytes", net->dev->name, len);
    /* All header fields zero: no checksum offload, no GSO, num_buffers 0. */
    memset(tx_buffer, 0, NET_HDR_SIZE);
    memcpy(tx_buffer + NET_HDR_SIZE, frame, len);
    struct virtq_buf buf = {(uintptr_t)tx_buffer, NET_HDR_SIZE + len, false};
    int head = virtq_add(vq, &buf, 1, false);
    if (head < 0)
        guest_panic("%s: transmit queue full", net->dev->name);
    virtq_kick(vq);
    uint16_t used_head;
    uint32_t used_len;
    virtq_wait_used_or_die(vq, VIRTIO_TIMEOUT_MS, &used_head, &used_len);
    if (used_head != head)
        guest_panic("%s: transmit used id %u, expected %d", net->dev->name, used_head, head);
}

/* Take the next used receive buffer: its index and the used length. */
static enum virtio_wait next_rx(struct net *net, uint64_t timeout_ms, unsigned *buffer,
                                uint32_t *len)
{
    struct virtq *vq = &net->dev->queues[RXQ];
    uint16_t head;
    enum virtio_wait w = virtq_wait_used(vq, timeout_ms, &head, len);
    if (w != VIRTIO_WAIT_OK)
        return w;
    if (rx_of_head[head] < 0)
        guest_panic("%s: used id %u is no receive buffer", net->dev->name, head);
    *buffer = (unsigned)rx_of_head[head];
    rx_of_head[head] = -1;
    return VIRTIO_WAIT_OK;
}

static enum net_rx wait_failed(struct net *net, enum virtio_wait w)
{
    if (w == VIRTIO_WAIT_TIMEOUT)
        return NET_RX_TIMEOUT;
    guest_printf(GUEST_PREFIX "%s needs reset (status 0x%x)\n", net->dev->name,
                 virtio_status(net->dev));
    return NET_RX_ERROR;
}

enum net_rx net_receive(struct net *net, void *frame, uint32_t *frame_len, uint64_t timeout_ms)
{
    struct virtq *rxq = &net->dev->queues[RXQ];
    const char *name = net->dev->name;
    unsigned buffer;
    uint32_t len;

    enum virtio_wait w = next_rx(net, timeout_ms, &buffer, &len);
    if (w != VIRTIO_WAIT_OK)
        return wait_failed(net, w);

    struct virtio_net_hdr hdr;
    memcpy(&hdr, rx_buffers[buffer], sizeof(hdr));
    if (len < NET_HDR_SIZE || len > net->rx_buffer_size) {
        guest_printf(GUEST_PREFIX "%s bad receive length %u\n", name, len);
        return NET_RX_ERROR;
    }
    /* No GUEST_CSUM and no GUEST_* GSO negotiated: flags and gso_type 0. */
    if (hdr.flags != 0 || hdr.gso_type != 0) {
        guest_printf(GUEST_PREFIX "%s bad receive header flags=0x%x gso_type=0x%x\n", name,
                     hdr.flags, hdr.gso_type);
        return NET_RX_ERROR;
    }
    /* Without MRG_RXBUF the device MUST set num_buffers to 1 (spec 5.1.6.4.2).
     * QEMU 7.2 leaves it 0; avmm.lax_num_buffers=1 lets that pass. */
    unsigned buffers = hdr.num_buffers;
    if (!net->mrg && buffers == 0 && net->lax_num_buffers)
        buffers = 1;
    if (!net->mrg && buffers != 1) {
        guest_printf(GUEST_PREFIX "%s bad receive header num_buffers=%u (expected 1)\n", name,
                     buffers);
        return NET_RX_ERROR;
    }
    if (buffers == 0) {
        guest_printf(GUEST_PREFIX "%s bad receive header num_buffers=0\n", name);
        return NET_RX_ERROR;
    }

    uint8_t *out = frame;
    uint32_t total = len - NET_HDR_SIZE;
    bool too_long = total > NET_MAX_FRAME;
    if (!too_long)
        memcpy(out, rx_buffers[buffer] + NET_HDR_SIZE, total);
    post_rx(net, buffer);
    /* The rest of a merged frame: whole buffers without a header (spec
     * 5.1.6.4: all but the last are used completely). */
    for (unsigned b = 1; b < buffers; b++) {
        w = next_rx(net, VIRTIO_TIMEOUT_MS, &buffer, &len);
        if (w != VIRTIO_WAIT_OK) {
            guest_printf(GUEST_PREFIX "%s merged frame: buffer %u of %u missing\n", name, b + 1,
                         buffers);
            return NET_RX_ERROR;
        }
        if (len > net->rx_buffer_size) {
            guest_printf(GUEST_PREFIX "%s bad receive length %u\n", name, len);
            return NET_RX_ERROR;
        }
        if (!too_long && total + len <= NET_MAX_FRAME)
            memcpy(out + total, rx_buffers[buffer], len);
        else
            too_long = true;
        total += len;
        post_rx(net, buffer);
    }
    virtq_kick(rxq);
    net->rx_frames++;
    if (too_long) {
        guest_printf(GUEST_PREFIX "%s received a frame of %u bytes (more than %u)\n", name,
                     total, NET_MAX_FRAME);
        return NET_RX_ERROR;
    }
    *frame_len = total;
    return NET_RX_FRAME;
}

int net_rx_poll(struct net *net, const uint8_t **data, uint32_t *len)
{
    struct virtq *vq = &net->dev->queues[RXQ];
    uint16_t head;
    if (!virtq_get_used(vq, &head, len))
        return -1;
    if (rx_of_head[head] < 0)
        guest_panic("%s: used id %u is no receive buffer", net->dev->name, head);
    int buffer = rx_of_head[head];
    rx_of_head[head] = -1;
    *data = rx_buffers[buffer];
    net->rx_frames++;
    return buffer;
}

void net_rx_repost(struct net *net, unsigned buffer)
{
    if (!post_rx(net, buffer))
        guest_panic("%s: receive queue full", net->dev->name);
}

void net_rx_kick(struct net *net)
{
    virtq_kick(&net->dev->queues[RXQ]);
}

void net_close(struct net *net)
{
    if (!virtio_reset(net->dev))
        guest_exit(EXIT_FAILURE);
}
