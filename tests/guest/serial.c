#include "serial.h"

#include <stdbool.h>
#include <stdint.h>

#include "io.h"
#include "layout.h"

#define UART_DATA 0 /* THR / RBR; DLL when DLAB = 1 */
#define UART_IER  1 /* DLM when DLAB = 1 */
#define UART_FCR  2 /* deliberately not written, see serial_init */
#define UART_LCR  3
#define UART_MCR  4
#define UART_LSR  5

#define LCR_8N1   0x03
#define LCR_DLAB  0x80
#define LSR_DR    0x01
#define LSR_THRE  0x20

/* A UART model that never reports THRE must not hang the guest: after this
 * many polls the byte is written anyway. */
#define THRE_POLL_LIMIT 100000

/* FCR is left alone: the guest polls, so it needs no FIFO, and enabling or
 * clearing the FIFOs would throw away input a host queued before the guest
 * got here (QEMU and avmm both clear the receive side when the FIFO-enable
 * bit changes). A UART fresh from reset has FIFOs off: QEMU then holds one
 * received byte at a time and back-pressures its input, avmm keeps 64. */
void serial_init(void)
{
    outb(PORT_COM1 + UART_IER, 0x00);           /* no interrupts */
    outb(PORT_COM1 + UART_LCR, LCR_DLAB);
    outb(PORT_COM1 + UART_DATA, 0x01);          /* divisor 1: 115200 baud */
    outb(PORT_COM1 + UART_IER, 0x00);
    outb(PORT_COM1 + UART_LCR, LCR_8N1);
    outb(PORT_COM1 + UART_MCR, 0x03);           /* DTR, RTS */
}

void serial_putc(char c)
{
    for (unsigned i = 0; i < THRE_POLL_LIMIT; i++) {
        if (inb(PORT_COM1 + UART_LSR) & LSR_THRE)
            break;
        cpu_relax();
    }
    outb(PORT_COM1 + UART_DATA, (uint8_t)c);
}

void serial_write(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        serial_putc(s[i]);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

bool serial_rx_ready(void)
{
    return inb(PORT_COM1 + UART_LSR) & LSR_DR;
}

uint8_t serial_getc(void)
{
    while (!serial_rx_ready())
        cpu_relax();
    return inb(PORT_COM1 + UART_DATA);
}
