#include "guest.h"
static int exp_run(void)
{
    const char *kind = "x"; size_t len = 1;
    cmdline_get("avmm.fault", &kind, &len);
    if (kind[0] == 'a') __asm__ volatile("int $0x81");
    if (kind[0] == 'b') __asm__ volatile("int3");
    if (kind[0] == 'c') __asm__ volatile("int $0x20");
    if (kind[0] == 'd') __asm__ volatile("syscall" ::: "rcx", "r11");
    if (kind[0] == 'f') __asm__ volatile(".byte 0xf1");
    return 0;
}
SCENARIO("zz_exp", exp_run);
