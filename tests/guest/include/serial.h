/* COM1 (port 0x3f8), 8N1, polled, no interrupts. */
#ifndef AVMM_GUEST_SERIAL_H
#define AVMM_GUEST_SERIAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t len);
void serial_puts(const char *s); /* no newline added */
/* Input, polled: LSR.DR set (a received byte waits in RBR). */
bool serial_rx_ready(void);
/* Wait (forever) for a received byte and return it. */
uint8_t serial_getc(void);

#endif
