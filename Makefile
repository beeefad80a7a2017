# avmm — everything a fresh machine needs is set up from here.
#   make up    boot the example VM (creates the venv, builds the test guest)
#   make test  run the whole test suite (also installs the peers the tests need)

PYTHON ?= python3
VENV   := .venv
BUILD  ?= build
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
AVMM   := $(VENV)/bin/avmm

# Debian packages: what building needs, and what the tests talk to.
PACKAGES_build  := gcc make libc6-dev linux-libc-dev libseccomp2
PACKAGES_test   := qemu-system-x86 busybox-static cpio acpica-tools e2fsprogs iproute2
# ... and for the minimal guest kernel (make linux-kernel), only when it is built.
PACKAGES_kernel := linux-source-6.1 bc bison flex libelf-dev libssl-dev patch

.PHONY: all up test test-linux deps deps-build deps-test venv guest debian-kernel linux-debian linux-kernel \
	linux-initramfs example-disk bench bench-readme lint clean distclean

all: venv guest

up: venv guest
	$(AVMM) up examples/hello.toml

test: deps-test venv guest debian-kernel linux-debian linux-kernel linux-initramfs example-disk
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)
	$(VENV)/bin/ruff check .

# Linux booted to userspace under avmm (minimal and Debian kernels; see README: Linux
# guests). Minutes per boot where guest ring 0 is interpreted; not part of `make test`.
test-linux: deps-test venv guest debian-kernel linux-debian linux-kernel linux-initramfs
	$(VENV)/bin/python -m pytest -ra -m linux_boot tests/linux $(PYTEST_ARGS)

# Figures side by side with QEMU (not part of `make test`, which runs a smoke version).
bench: deps-test venv guest
	$(VENV)/bin/python -m compileall -q avmm   # as installed: start-up figures without compiling
	$(VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

# `make bench`, then its tables (with commit, machine and date) into README.md.
bench-readme: bench
	$(VENV)/bin/python -m benchmarks.report --write-readme

lint: venv
	$(VENV)/bin/ruff check .

# -- system packages (installed only when missing) -------------------------------------

deps: deps-build deps-test

deps-build: $(BUILD)/.stamps/deps-build
deps-test: $(BUILD)/.stamps/deps-test

$(BUILD)/.stamps/deps-%: Makefile
	@mkdir -p $(@D)
	@pkgs="$(PACKAGES_$*)"; \
	missing=$$(for p in $$pkgs; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

# -- the virtual environment (the cffi KVM binding compiles here) ----------------------

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py avmm/kvm/_ffi_build.py avmm/vhost/_log_build.py avmm/virtio/_net_build.py avmm/virtio/_virtq.h avmm/virtio/_virtq.cdef avmm/virtio/_blk_build.py | $(BUILD)/.stamps/deps-build
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

# -- guests ----------------------------------------------------------------------------

include mk/guest.mk

$(BUILD)/guest/testguest.elf: | $(BUILD)/.stamps/deps-build

debian-kernel: $(BUILD)/debian-kernel/vmlinuz

$(BUILD)/debian-kernel/vmlinuz: | scripts/fetch-debian-kernel.sh
	scripts/fetch-debian-kernel.sh $(BUILD)/debian-kernel

# Debian's kernel plus an uncompressed busybox initramfs that loads the package's virtio
# modules and runs one of tests/linux/run/* (avmm.run=NAME; contract in tests/linux/init).
linux-debian: $(BUILD)/debian-kernel/initramfs.cpio

$(BUILD)/debian-kernel/initramfs.cpio: $(BUILD)/debian-kernel/vmlinuz \
		scripts/build-debian-initramfs.sh tests/linux/init $(wildcard tests/linux/run/*) \
		tests/linux/syscall-fault.c scripts/initramfs-lib.sh | $(BUILD)/.stamps/deps-test
	scripts/build-debian-initramfs.sh $(BUILD)/debian-kernel

# avmm's minimal guest kernel: tinyconfig + examples/linux/microvm.config (+ patches/), built from
# Debian's linux-source-6.1 into $(BUILD)/linux/{bzImage,vmlinux}. The script keeps its own
# cache (the hash of the fragment and of the patches, and the source version): only a changed
# fragment or patch, or a new source package, rebuilds (a full build: ~5 min on 2 cores here, plus ~13 s to unpack).
linux-kernel: $(BUILD)/linux/bzImage

$(BUILD)/linux/bzImage: examples/linux/microvm.config $(wildcard examples/linux/patches/*.patch) \
		scripts/build-linux-kernel.sh \
		| $(BUILD)/.stamps/deps-build $(BUILD)/.stamps/deps-kernel
	scripts/build-linux-kernel.sh $(BUILD)/linux
	@touch $@

# Its uncompressed busybox initramfs: the same /init and tests/linux/run/* as linux-debian,
# no modules (contract in tests/linux/init).
linux-initramfs: $(BUILD)/linux/initramfs.cpio

$(BUILD)/linux/initramfs.cpio: scripts/build-linux-initramfs.sh tests/linux/init \
		$(wildcard tests/linux/run/*) tests/linux/syscall-fault.c scripts/initramfs-lib.sh \
		| $(BUILD)/.stamps/deps-test
	scripts/build-linux-initramfs.sh $(BUILD)/linux

example-disk: $(BUILD)/examples/disk.img

$(BUILD)/examples/disk.img:
	@mkdir -p $(@D)
	head -c 16M /dev/urandom > $@

clean:
	rm -rf $(BUILD)/guest

distclean:
	rm -rf $(BUILD) $(VENV) avmm/kvm/_kvm_ffi*.so avmm/kvm/_kvm_ffi.c *.egg-info
