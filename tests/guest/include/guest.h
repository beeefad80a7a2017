/* What every scenario and driver needs. */
#ifndef AVMM_GUEST_GUEST_H
#define AVMM_GUEST_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cmdline.h"
#include "io.h"
#include "layout.h"
#include "lib.h"
#include "mailbox.h"
#include "print.h"
#include "ring0.h"
#include "scenario.h"
#include "serial.h"

/* End the VM. 0: power off through the i8042 reset line, falling back to the
 * debug-exit port; anything else: write the code to the debug-exit port.
 * If the VM is still running after that, spin forever. */
__attribute__((noreturn)) void guest_exit(int code);

#endif
