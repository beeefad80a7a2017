/* CRC-32 as in zlib and Python's binascii.crc32 / zlib.crc32 (IEEE 802.3,
 * reflected polynomial 0xEDB88320, initial value and final xor 0xFFFFFFFF). */
#ifndef AVMM_GUEST_CRC32_H
#define AVMM_GUEST_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC: crc32_update(0, data, n) is the CRC of data; feeding the
 * result back in with the next piece gives the CRC of the concatenation. */
uint32_t crc32_update(uint32_t crc, const void *data, size_t len);

#endif
