/* printf-style output on COM1.
 * Supports %s %c %d %i %u %x %X %p %% with the l, ll and z length
 * modifiers, an optional '0' flag, a field width and, for %s, a precision
 * (%.5s, %.*s). */
#ifndef AVMM_GUEST_PRINT_H
#define AVMM_GUEST_PRINT_H

#include <stdarg.h>
#include <stddef.h>

/* Every line the guest prints starts with this. */
#define GUEST_PREFIX "avmm-testguest: "

__attribute__((format(printf, 1, 2))) void guest_printf(const char *fmt, ...);
void guest_vprintf(const char *fmt, va_list ap);
/* Format into buf (always NUL-terminated when size > 0); returns the length
 * the full output would have had. */
__attribute__((format(printf, 3, 4))) size_t guest_snprintf(char *buf, size_t size,
                                                            const char *fmt, ...);

/* Print "avmm-testguest: panic: <message>" and exit with EXIT_FAILURE. */
__attribute__((format(printf, 1, 2), noreturn)) void guest_panic(const char *fmt, ...);

#endif
