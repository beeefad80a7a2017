#include "print.h"

#include <stdbool.h>
#include <stdint.h>

#include "guest.h"

/* Output goes to a sink: the serial port, or a bounded buffer. */
struct sink {
    char *buf;       /* NULL: serial */
    size_t size;
    size_t length;   /* characters produced so far, even if not stored */
};

static void emit(struct sink *sink, char c)
{
    if (!sink->buf)
        serial_putc(c);
    else if (sink->length + 1 < sink->size)
        sink->buf[sink->length] = c;
    sink->length++;
}

static void emit_number(struct sink *sink, uint64_t value, unsigned base, bool upper,
                        bool negative, unsigned width, char pad)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    unsigned n = 0;

    do {
        tmp[n++] = digits[value % base];
        value /= base;
    } while (value);
    unsigned total = n + (negative ? 1 : 0);
    if (negative && pad == '0')
        emit(sink, '-');
    for (; total < width; total++)
        emit(sink, pad);
    if (negative && pad != '0')
        emit(sink, '-');
    while (n)
        emit(sink, tmp[--n]);
}

static void format(struct sink *sink, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            emit(sink, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        unsigned width = 0;
        unsigned longs = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (unsigned)(*fmt++ - '0');
        size_t precision = SIZE_MAX; /* for %s: at most this many characters */
        if (*fmt == '.') {
            fmt++;
            if (*fmt == '*') {
                int p = va_arg(ap, int);
                precision = p < 0 ? SIZE_MAX : (size_t)p;
                fmt++;
            } else {
                precision = 0;
                while (*fmt >= '0' && *fmt <= '9')
                    precision = precision * 10 + (size_t)(*fmt++ - '0');
            }
        }
        while (*fmt == 'l' || *fmt == 'z') {
            longs += *fmt == 'z' ? 2 : 1;
            fmt++;
        }
        switch (*fmt) {
        case 'c':
            emit(sink, (char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            size_t len = 0;
            while (len < precision && s[len])
                len++;
            for (size_t n = len; n < width; n++)
                emit(sink, ' ');
            for (size_t i = 0; i < len; i++)
                emit(sink, s[i]);
            break;
        }
        case 'd':
        case 'i': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            uint64_t magnitude = v < 0 ? -(uint64_t)v : (uint64_t)v;
            emit_number(sink, magnitude, 10, false, v < 0, width, pad);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            emit_number(sink, v, *fmt == 'u' ? 10 : 16, *fmt == 'X', false, width, pad);
            break;
        }
        case 'p':
            emit(sink, '0');
            emit(sink, 'x');
            emit_number(sink, (uintptr_t)va_arg(ap, void *), 16, false, false, width, pad);
            break;
        case '%':
            emit(sink, '%');
            break;
        case '\0':
            return;
        default:
            emit(sink, '%');
            emit(sink, *fmt);
            break;
        }
    }
}

void guest_vprintf(const char *fmt, va_list ap)
{
    struct sink sink = {0};
    format(&sink, fmt, ap);
}

void guest_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    guest_vprintf(fmt, ap);
    va_end(ap);
}

size_t guest_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    struct sink sink = {.buf = buf, .size = size};
    va_list ap;
    va_start(ap, fmt);
    format(&sink, fmt, ap);
    va_end(ap);
    if (size)
        buf[sink.length < size ? sink.length : size - 1] = '\0';
    return sink.length;
}

void guest_panic(const char *fmt, ...)
{
    va_list ap;
    guest_printf(GUEST_PREFIX "panic: ");
    va_start(ap, fmt);
    guest_vprintf(fmt, ap);
    va_end(ap);
    guest_printf("\n");
    guest_exit(EXIT_FAILURE);
}
