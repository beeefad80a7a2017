/* The blk test pattern (README.md, "blk test pattern"); the host side is
 * tests/virtio_guest_support.py: blk_pattern(). Sector s (512 bytes) of a
 * device is 64 little-endian u64 words; word j is
 * splitmix64(seed * 0x9E3779B97F4A7C15 + s * 64 + j), all mod 2^64. */
#ifndef AVMM_GUEST_PATTERN_H
#define AVMM_GUEST_PATTERN_H

#include <stdint.h>

#define PATTERN_GOLDEN 0x9E3779B97F4A7C15ULL
#define SECTOR_SIZE    512
#define SECTOR_WORDS   (SECTOR_SIZE / 8)

static inline uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + PATTERN_GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Word `j` (0..63) of sector `sector`. */
static inline uint64_t pattern_word(uint64_t seed, uint64_t sector, unsigned j)
{
    return splitmix64(seed * PATTERN_GOLDEN + sector * SECTOR_WORDS + j);
}

/* Fill `count` sectors starting at `sector` into buf (8-byte aligned). */
void pattern_fill(uint64_t seed, uint64_t sector, uint64_t count, void *buf);

/* Compare `count` sectors at buf with the pattern: the index (relative to
 * `sector`) of the first sector that differs, or `count` when all match. */
uint64_t pattern_check(uint64_t seed, uint64_t sector, uint64_t count, const void *buf);

#endif
