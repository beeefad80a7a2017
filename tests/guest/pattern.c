#include "pattern.h"

void pattern_fill(uint64_t seed, uint64_t sector, uint64_t count, void *buf)
{
    uint64_t *words = buf;
    for (uint64_t s = 0; s < count; s++) {
        for (unsigned j = 0; j < SECTOR_WORDS; j++)
            *words++ = pattern_word(seed, sector + s, j);
    }
}

uint64_t pattern_check(uint64_t seed, uint64_t sector, uint64_t count, const void *buf)
{
    const uint64_t *words = buf;
    for (uint64_t s = 0; s < count; s++) {
        for (unsigned j = 0; j < SECTOR_WORDS; j++) {
            if (*words++ != pattern_word(seed, sector + s, j))
                return s;
        }
    }
    return count;
}
