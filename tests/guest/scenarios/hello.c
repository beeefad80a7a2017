/* hello: prove that boot, serial, the command line and exit work. */
#include "guest.h"

static int hello_run(void)
{
    guest_printf(GUEST_PREFIX "hello\n");
    guest_printf(GUEST_PREFIX "cmdline: %s\n", cmdline());
    return 0;
}

SCENARIO("hello", hello_run);
