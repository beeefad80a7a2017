/* COM1 (port 0x3f8), 8N1, polled, no interrupts. */
#ifndef AVMM_GUEST_SERIAL_H
#define AVMM_GUEST_SERIAL_H

#include <stddef.h>

void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t len);
void serial_puts(const char *s); /* no newline added */

#endif
