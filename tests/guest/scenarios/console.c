/* console: drive virtio-console port 0 (spec 5.3; no MULTIPORT, so receiveq 0
 * and transmitq 1 are the port's queues). Everything said on the console is a
 * line that starts with the usual prefix:
 *
 *     avmm-testguest: console hello
 *     avmm-testguest: console echo <line>      for every input line
 *     avmm-testguest: console bye              after the input line "quit"
 *
 * Input lines end at '\n' or '\r' ("\r\n" is one end) and are cut after
 * CONSOLE_LINE_MAX bytes, like the serial `echo` scenario. There is no
 * timeout waiting for input. On the serial port: "console0 ready" once the
 * driver is up, "console0 echoed=<n>" at the end. Mailbox counter: lines
 * echoed. Failures (no device, a timeout on transmit, DEVICE_NEEDS_RESET, a
 * used length longer than the buffer) are one line and exit 1. */
#include "guest.h"
#include "virtio.h"

#define RECEIVEQ 0
#define TRANSMITQ 1
#define CONSOLE_LINE_MAX 200
#define RX_BUFFERS 8
#define RX_BUFFER_SIZE 64

static uint8_t rx_buffers[RX_BUFFERS][RX_BUFFER_SIZE] __attribute__((aligned(64)));
static int8_t rx_of_head[VIRTQ_MAX_SIZE];
static char tx_buffer[CONSOLE_LINE_MAX + 64] __attribute__((aligned(64)));

static bool post_rx(struct virtq *rxq, unsigned i)
{
    struct virtq_buf buf = {(uintptr_t)rx_buffers[i], RX_BUFFER_SIZE, true};
    int head = virtq_add(rxq, &buf, 1, false);
    if (head < 0) {
        guest_printf(GUEST_PREFIX "console0 FAIL receive queue full\n");
        return false;
    }
    rx_of_head[head] = (int8_t)i;
    return true;
}

/* Transmit "<prefix>console <what><text>\n" and wait until the device took it. */
static bool say(struct virtq *txq, const char *what, const char *text, size_t len)
{
    size_t n = guest_snprintf(tx_buffer, sizeof(tx_buffer), GUEST_PREFIX "console %s", what);
    memcpy(tx_buffer + n, text, len);
    n += len;
    tx_buffer[n++] = '\n';
    struct virtq_buf buf = {(uintptr_t)tx_buffer, (uint32_t)n, false};
    if (virtq_add(txq, &buf, 1, false) < 0) {
        guest_printf(GUEST_PREFIX "console0 FAIL transmit queue full\n");
        return false;
    }
    virtq_kick(txq);
    uint16_t head;
    uint32_t used_len;
    virtq_wait_used_or_die(txq, VIRTIO_TIMEOUT_MS, &head, &used_len);
    return true;
}

static int console_run(void)
{
    struct virtio_dev *dev = virtio_find(VIRTIO_ID_CONSOLE, 0);
    if (!dev) {
        guest_printf(GUEST_PREFIX "no virtio-console device\n");
        return EXIT_FAILURE;
    }
    if (!virtio_begin_init(dev, 0) || !virtio_setup_queue(dev, RECEIVEQ) ||
        !virtio_setup_queue(dev, TRANSMITQ))
        return EXIT_FAILURE;
    struct virtq *rxq = &dev->queues[RECEIVEQ], *txq = &dev->queues[TRANSMITQ];
    for (unsigned i = 0; i < VIRTQ_MAX_SIZE; i++)
        rx_of_head[i] = -1;
    for (unsigned i = 0; i < RX_BUFFERS && i < rxq->num; i++) {
        if (!post_rx(rxq, i))
            return EXIT_FAILURE;
    }
    if (!virtio_driver_ok(dev))
        return EXIT_FAILURE;
    virtq_kick(rxq);
    guest_printf(GUEST_PREFIX "console0 ready\n");
    if (!say(txq, "hello", "", 0))
        return EXIT_FAILURE;

    char line[CONSOLE_LINE_MAX];
    size_t len = 0;
    bool after_cr = false, quit = false;
    while (!quit) {
        uint16_t head;
        uint32_t used_len;
        switch (virtq_wait_used(rxq, 1000, &head, &used_len)) {
        case VIRTIO_WAIT_TIMEOUT:
            continue;
        case VIRTIO_WAIT_NEEDS_RESET:
            guest_printf(GUEST_PREFIX "console0 needs reset (status 0x%x)\n",
                         virtio_status(dev));
            return EXIT_FAILURE;
        case VIRTIO_WAIT_OK:
            break;
        }
        int i = rx_of_head[head];
        rx_of_head[head] = -1;
        if (i < 0 || used_len > RX_BUFFER_SIZE) {
            guest_printf(GUEST_PREFIX "console0 FAIL used head %u length %u\n", head, used_len);
            return EXIT_FAILURE;
        }
        for (uint32_t b = 0; b < used_len && !quit; b++) {
            char c = (char)rx_buffers[i][b];
            if (c == '\n' && after_cr) {
                after_cr = false;
                continue;
            }
            after_cr = c == '\r';
            if (c != '\n' && c != '\r') {
                if (len < CONSOLE_LINE_MAX)
                    line[len++] = c;
                continue;
            }
            if (len == 4 && memcmp(line, "quit", 4) == 0) {
                quit = true;
                break;
            }
            if (!say(txq, "echo ", line, len))
                return EXIT_FAILURE;
            mailbox.counter++;
            len = 0;
        }
        if (!post_rx(rxq, (unsigned)i))
            return EXIT_FAILURE;
        virtq_kick(rxq);
    }
    if (!say(txq, "bye", "", 0))
        return EXIT_FAILURE;
    guest_printf(GUEST_PREFIX "console0 echoed=%lu\n", mailbox.counter);
    if (!virtio_reset(dev))
        return EXIT_FAILURE;
    return EXIT_OK;
}

SCENARIO("console", console_run);
