/* The kernel command line: whitespace-separated words, mostly key=value. */
#ifndef AVMM_GUEST_CMDLINE_H
#define AVMM_GUEST_CMDLINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Longest command line kept (longer ones are cut, see README.md). */
#define CMDLINE_MAX 4096

/* Copy the NUL-terminated command line at guest physical address `paddr`
 * (0: none) into the guest's own buffer. */
void cmdline_load(uint64_t paddr);

/* The command line exactly as received (NUL-terminated). */
const char *cmdline(void);

/* Find the last word "key=value"; sets *value and *len to the value (not
 * NUL-terminated) and returns true, or returns false when the key is absent. */
bool cmdline_get(const char *key, const char **value, size_t *len);

/* The value of `key` as a number (decimal or 0x-hex), `fallback` when absent.
 * A malformed value is a guest_panic: tests must not run with a silent default. */
uint64_t cmdline_get_u64(const char *key, uint64_t fallback);

/* True when `key` occurs as a bare word or as key=<anything>. */
bool cmdline_has(const char *key);

#endif
