/* The few libc pieces the guest needs. gcc may also emit calls to
 * memcpy/memset/memmove/memcmp on its own. */
#ifndef AVMM_GUEST_LIB_H
#define AVMM_GUEST_LIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* Parse a whole string of `len` bytes as an unsigned number: decimal, or hex
 * with a 0x prefix. False on an empty string, a stray character or overflow. */
bool parse_u64(const char *s, size_t len, uint64_t *out);

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif
