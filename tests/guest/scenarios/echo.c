/* echo: serial input. Prints "echo ready", then reads COM1 by polling and
 * prints every line it receives as "echo <line>" until the line "quit",
 * answered with "echo bye". A line ends at '\n' or '\r' ("\r\n" counts as
 * one end), is echoed byte for byte without its end, and is cut after
 * ECHO_LINE_MAX bytes (the rest of it is dropped). The mailbox counter holds
 * the number of lines echoed so far ("quit" is not one). */
#include "guest.h"

#define ECHO_LINE_MAX 200

static int echo_run(void)
{
    char line[ECHO_LINE_MAX];
    size_t len = 0;
    bool after_cr = false;

    /* The host may type from here on; input that came earlier is kept too
     * (serial_init does not clear the receive FIFO). */
    guest_printf(GUEST_PREFIX "echo ready\n");
    for (;;) {
        char c = (char)serial_getc();
        if (c == '\n' && after_cr) {
            after_cr = false; /* the second half of "\r\n" */
            continue;
        }
        after_cr = c == '\r';
        if (c != '\n' && c != '\r') {
            if (len < ECHO_LINE_MAX)
                line[len++] = c;
            continue;
        }
        if (len == 4 && memcmp(line, "quit", 4) == 0)
            break;
        guest_printf(GUEST_PREFIX "echo ");
        serial_write(line, len); /* verbatim, NUL bytes included */
        serial_putc('\n');
        mailbox.counter++;
        len = 0;
    }
    guest_printf(GUEST_PREFIX "echo bye\n");
    return EXIT_OK;
}

SCENARIO("echo", echo_run);
