#!/usr/bin/env bash
# Build an uncompressed busybox initramfs for avmm's minimal kernel (make linux-kernel).
#
# Usage: scripts/build-linux-initramfs.sh [OUT_DIR]     (OUT_DIR defaults to build/linux)
#
# Leaves OUT_DIR/initramfs.cpio (newc, uncompressed: the kernel is built without any
# decompressor for it, and gunzip under an emulated guest costs seconds to minutes):
#   /bin/busybox                  from busybox-static (applet links are made by /init)
#   /init                         tests/linux/init (its header documents the contract)
#   /tests/NAME                   tests/linux/run/* (run with avmm.run=NAME)
#   /bin/avmm-syscall-fault       tests/linux/syscall-fault.c, built here (static, no libc)
#   /lib/modules/avmm/load-order  empty: the minimal kernel has its drivers built in
# The same /init as scripts/build-debian-initramfs.sh, so tests run the same scripts and
# read the same "avmm-linux: " lines on either kernel.
#
# Idempotent: the archive is rebuilt from scratch and replaced atomically each run.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/build/linux}"
source_dir="$repo_root/tests/linux"

die() { echo "build-linux-initramfs: $*" >&2; exit 1; }

# shellcheck source=scripts/initramfs-lib.sh
source "$repo_root/scripts/initramfs-lib.sh"
initramfs_begin
: > "$tree/lib/modules/avmm/load-order"

initramfs_install_userspace

initramfs_pack "$out/initramfs.cpio"
echo "build-linux-initramfs: $out/initramfs.cpio ($(stat -c %s "$out/initramfs.cpio") bytes)"
