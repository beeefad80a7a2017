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

for tool in cpio find; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install cpio)"
done
busybox=""
for candidate in /bin/busybox /usr/bin/busybox; do
    if [[ -x "$candidate" ]] && ! ldd "$candidate" >/dev/null 2>&1; then
        busybox="$candidate"
        break
    fi
done
[[ -n "$busybox" ]] || die "no statically linked busybox (apt-get install busybox-static)"

work="$(mktemp -d "${TMPDIR:-/tmp}/avmm-initramfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tree="$work/tree"
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,tests,lib/modules/avmm}
: > "$tree/lib/modules/avmm/load-order"

cp "$busybox" "$tree/bin/busybox"
ln -s busybox "$tree/bin/sh"
install -m 0755 "$source_dir/init" "$tree/init"
for script in "$source_dir"/run/*; do
    install -m 0755 "$script" "$tree/tests/${script##*/}"
done

mkdir -p "$out"
(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio --quiet -o -H newc -R 0:0 --reproducible) > "$work/initramfs.cpio"
mv "$work/initramfs.cpio" "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
echo "build-linux-initramfs: $out/initramfs.cpio ($(stat -c %s "$out/initramfs.cpio") bytes)"
