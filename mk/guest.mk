# The freestanding test guest (tests/guest/ -> $(BUILD)/guest/testguest.elf).
#
# Include this from the top-level Makefile, or run it alone:
#     make -f mk/guest.mk guest
# Paths are relative to the repository root. Targets: guest, guest-clean.
# Adding a .c or .S file anywhere under tests/guest/ needs no change here.

BUILD ?= build

# Keep whatever default goal the including Makefile has (restored at the end).
_guest_default_goal := $(.DEFAULT_GOAL)

GUEST_CC      ?= gcc
GUEST_SRC     := tests/guest
GUEST_OUT     := $(BUILD)/guest
GUEST_ELF     := $(GUEST_OUT)/testguest.elf
GUEST_MAP     := $(GUEST_OUT)/testguest.map
GUEST_LDS     := $(GUEST_SRC)/linker.ld
GUEST_MK      := $(lastword $(MAKEFILE_LIST))
# Rewritten only when the set of objects changes, so deleting a source relinks.
GUEST_OBJLIST := $(GUEST_OUT)/objects.list

GUEST_SOURCES := $(sort $(shell find $(GUEST_SRC) -name '*.c' -o -name '*.S'))
GUEST_OBJS    := $(patsubst $(GUEST_SRC)/%,$(GUEST_OUT)/obj/%.o,$(GUEST_SOURCES))
GUEST_DEPS    := $(GUEST_OBJS:.o=.d)

# No SSE/x87 anywhere (-mgeneral-regs-only), no red zone (ring-0 exceptions
# push onto the current stack), no CET endbr64 (some hypervisors emulate ring
# 0 and reject it), no PIC: the image runs where it is linked.
GUEST_ARCHFLAGS := -m64 -march=x86-64 -mgeneral-regs-only -mno-red-zone \
                   -mcmodel=small -fno-pic -fno-pie -fcf-protection=none
GUEST_CFLAGS  ?= -O2 -g -Wall -Wextra -Werror
GUEST_CFLAGS_ALL := $(GUEST_ARCHFLAGS) $(GUEST_CFLAGS) -std=gnu11 -ffreestanding \
                   -fno-stack-protector -fno-asynchronous-unwind-tables \
                   -fno-unwind-tables -fno-delete-null-pointer-checks \
                   -fno-tree-loop-distribute-patterns -fno-common \
                   -I$(GUEST_SRC)/include -MMD -MP
GUEST_LDFLAGS ?=
GUEST_LDFLAGS_ALL := -nostdlib -static -no-pie -Wl,-T,$(GUEST_LDS) \
                   -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 \
                   -Wl,-z,noexecstack -Wl,-Map,$(GUEST_MAP) $(GUEST_LDFLAGS)

.PHONY: guest guest-clean _guest_always
guest: $(GUEST_ELF)

$(GUEST_ELF): $(GUEST_OBJS) $(GUEST_LDS) $(GUEST_MK) $(GUEST_OBJLIST)
	@mkdir -p $(@D)
	$(GUEST_CC) $(GUEST_ARCHFLAGS) $(GUEST_LDFLAGS_ALL) -o $@ $(GUEST_OBJS)

$(GUEST_OBJLIST): _guest_always
	@mkdir -p $(@D)
	@echo '$(GUEST_OBJS)' | cmp -s - $@ || echo '$(GUEST_OBJS)' > $@

$(GUEST_OUT)/obj/%.c.o: $(GUEST_SRC)/%.c $(GUEST_MK)
	@mkdir -p $(@D)
	$(GUEST_CC) $(GUEST_CFLAGS_ALL) -c -o $@ $<

$(GUEST_OUT)/obj/%.S.o: $(GUEST_SRC)/%.S $(GUEST_MK)
	@mkdir -p $(@D)
	$(GUEST_CC) $(GUEST_CFLAGS_ALL) -c -o $@ $<

guest-clean:
	rm -rf $(GUEST_OUT)

-include $(GUEST_DEPS)

.DEFAULT_GOAL := $(_guest_default_goal)
ifeq ($(.DEFAULT_GOAL),)
ifeq ($(firstword $(MAKEFILE_LIST)),$(GUEST_MK))
.DEFAULT_GOAL := guest
endif
endif
