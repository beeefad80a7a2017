/* Ring-3 main: pick the scenario named on the command line and run it. */
#include "guest.h"

/* Recorded by boot.S (see layout.h BOOT_KIND_*). */
extern uint64_t boot_kind;
extern uint64_t boot_info;

__attribute__((noreturn)) void guest_main(void);

static uint32_t phys_read32(uint64_t paddr)
{
    return *(const volatile uint32_t *)(uintptr_t)paddr;
}

static uint64_t phys_read64(uint64_t paddr)
{
    return *(const volatile uint64_t *)(uintptr_t)paddr;
}

/* Guest physical address of the command line, 0 if there is none. */
static uint64_t boot_cmdline_paddr(void)
{
    if (boot_info == 0)
        return 0;
    if (boot_kind == BOOT_KIND_PVH) {
        if (phys_read32(boot_info) != HVM_START_MAGIC)
            return 0;
        return phys_read64(boot_info + HVM_START_CMDLINE_PADDR);
    }
    /* Linux boot protocol: cmd_line_ptr; ext_cmd_line_ptr (the upper half) is
     * ignored, VMMs put the command line below 4 GiB. */
    return phys_read32(boot_info + BOOT_PARAMS_CMD_LINE_PTR);
}

static const struct scenario *find_scenario(const char *name, size_t len)
{
    for (const struct scenario *s = __start_scenarios; s < __stop_scenarios; s++) {
        if (strlen(s->name) == len && memcmp(s->name, name, len) == 0)
            return s;
    }
    return NULL;
}

void guest_main(void)
{
    mailbox_init();
    serial_init();
    cmdline_load(boot_cmdline_paddr());

    const char *name = "hello";
    size_t name_len = 5;
    cmdline_get("avmm.test", &name, &name_len);

    const struct scenario *scenario = find_scenario(name, name_len);
    if (!scenario) {
        guest_printf(GUEST_PREFIX "unknown scenario %.*s\n", (int)name_len, name);
        guest_exit(EXIT_UNKNOWN_SCENARIO);
    }

    int result = scenario->run();
    mailbox.result = (uint64_t)(int64_t)result;
    mailbox.done = 1;
    guest_exit(result);
}
