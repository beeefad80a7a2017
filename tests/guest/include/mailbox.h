/* The host-readable mailbox page at guest physical MAILBOX_ADDR (0x200000).
 * Layout (little-endian u64s); this is a contract with the host, see README.md. */
#ifndef AVMM_GUEST_MAILBOX_H
#define AVMM_GUEST_MAILBOX_H

#include <stdint.h>

#include "layout.h"

struct mailbox {
    uint64_t magic;   /*  0: MAILBOX_MAGIC once the guest reached ring 3 */
    uint64_t counter; /*  8: scenario-specific progress counter */
    uint64_t done;    /* 16: 1 once the scenario returned */
    uint64_t result;  /* 24: the scenario's exit code, valid once done == 1 */
    uint64_t reserved[4];          /* 32: zero */
    uint8_t scratch[4096 - 64];    /* 64: scenario-specific */
};

_Static_assert(sizeof(struct mailbox) == 4096, "mailbox is one page");

extern volatile struct mailbox mailbox;

/* Write the magic and clear the shared fields. */
void mailbox_init(void);

#endif
