/* Scenario registry. Each scenario is one file in scenarios/ that says
 *
 *     SCENARIO("name", run_function);
 *
 * and returns an exit code from run_function (0 = success). The linker
 * collects the entries; nothing else needs editing to add one. */
#ifndef AVMM_GUEST_SCENARIO_H
#define AVMM_GUEST_SCENARIO_H

struct scenario {
    const char *name;
    int (*run)(void);
};

#define SCENARIO(name_, run_)                                                  \
    static const struct scenario scenario_entry_##run_                         \
        __attribute__((used, section("scenarios"), aligned(8))) = {            \
            .name = name_,                                                    \
            .run = run_,                                                       \
        }

extern const struct scenario __start_scenarios[];
extern const struct scenario __stop_scenarios[];

#endif
