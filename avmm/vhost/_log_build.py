"""cffi build script (API mode) for the vhost-user dirty log's atomic bit operations.

vhost-user.rst: "Use atomic operations, as the log may be concurrently manipulated".
Python has no atomic read-modify-write on shared memory: ``log[i] |= bit`` on an mmap is
a load and a store, and a bit another writer (a second back-end sharing QEMU's log, the
front-end clearing it) sets in between is lost. These two functions do the marking (a
locked ``OR`` per byte) and the read-and-clear (an atomic exchange per 64-bit word) in C
with GCC's ``__atomic`` builtins, outside the GIL.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef("""
int avmm_log_mark(uint8_t *log, uint64_t size, uint64_t first, uint64_t last);
uint64_t avmm_log_take(uint64_t *log, uint64_t *out, uint64_t words);
""")

ffibuilder.set_source("avmm.vhost._log_ffi", r"""
#include <stdint.h>

/* Set the bits of pages first..last (inclusive) in a log of size bytes, each with an
   atomic OR. Release order: the guest-memory writes the bits stand for are visible to
   whoever sees a bit. Nothing is set (-1) if the range does not fit the log. */
static int avmm_log_mark(uint8_t *log, uint64_t size, uint64_t first, uint64_t last)
{
    if (last < first || last / 8 >= size)
        return -1;
    for (uint64_t page = first; page <= last; page++)
        __atomic_fetch_or(&log[page / 8], (uint8_t)(1u << (page % 8)), __ATOMIC_RELEASE);
    return 0;
}

/* Move every bit of log[0..words) into out (OR), clearing it with an atomic exchange
   per non-zero word: a bit a back-end sets at any moment is either taken now or stays
   for the next call, never lost. Returns how many words had bits. */
static uint64_t avmm_log_take(uint64_t *log, uint64_t *out, uint64_t words)
{
    uint64_t found = 0;
    for (uint64_t i = 0; i < words; i++) {
        if (__atomic_load_n(&log[i], __ATOMIC_RELAXED)) {
            out[i] |= __atomic_exchange_n(&log[i], 0, __ATOMIC_ACQ_REL);
            found++;
        }
    }
    return found;
}
""")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
