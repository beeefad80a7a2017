#include "mailbox.h"

void mailbox_init(void)
{
    mailbox.counter = 0;
    mailbox.done = 0;
    mailbox.result = 0;
    for (unsigned i = 0; i < sizeof(mailbox.reserved) / sizeof(mailbox.reserved[0]); i++)
        mailbox.reserved[i] = 0;
    /* Last: a host that sees the magic sees cleared fields (x86 keeps stores in order). */
    mailbox.magic = MAILBOX_MAGIC;
}
