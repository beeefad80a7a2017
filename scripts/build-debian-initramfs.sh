#!/usr/bin/env bash
# Build an uncompressed busybox initramfs for Debian's cloud kernel.
#
# Usage: scripts/build-debian-initramfs.sh [KERNEL_DIR]
#   KERNEL_DIR defaults to build/debian-kernel (what scripts/fetch-debian-kernel.sh leaves:
#   VERSION and the unpacked package under root/).
#
# Leaves KERNEL_DIR/initramfs.cpio (newc, uncompressed: gunzip under an emulated guest
# costs seconds to minutes). Contents:
#   /bin/busybox                  from busybox-static (applet links are made by /init)
#   /init                         tests/linux/init (its header documents the contract)
#   /tests/NAME                   tests/linux/run/* (run with avmm.run=NAME)
#   /bin/avmm-syscall-fault       tests/linux/syscall-fault.c, built here (static, no libc)
#   /lib/modules/avmm/NAME.ko     the virtio modules and everything they depend on,
#                                 decompressed (busybox insmod cannot load .ko.xz/.ko.zst)
#   /lib/modules/avmm/load-order  module names, dependencies first
# The package ships no modules.dep (depmod runs at install time), so dependencies are read
# from each module's own .modinfo "depends=" entry. Modules built into the kernel
# (modules.builtin, e.g. rng-core) are skipped.
#
# Idempotent: the archive is rebuilt from scratch and replaced atomically each run.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kernel_dir="${1:-$repo_root/build/debian-kernel}"
source_dir="$repo_root/tests/linux"
# The drivers the tests want; their dependencies are added automatically.
wanted_modules=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_rng virtio_console)

die() { echo "build-debian-initramfs: $*" >&2; exit 1; }

[[ -f "$kernel_dir/VERSION" ]] || die "$kernel_dir/VERSION missing (run scripts/fetch-debian-kernel.sh)"
release="$(cat "$kernel_dir/VERSION")"
module_root="$kernel_dir/root/lib/modules/$release"
[[ -d "$module_root/kernel" ]] || die "$module_root/kernel missing"
# shellcheck source=scripts/initramfs-lib.sh
source "$repo_root/scripts/initramfs-lib.sh"
initramfs_begin

# -- modules: index by name, resolve dependencies, decompress ---------------------------
declare -A module_file=()
while IFS= read -r -d '' file; do
    base="${file##*/}"
    name="${base%%.ko*}"
    module_file["${name//-/_}"]="$file"
done < <(find "$module_root/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' \
    -o -name '*.ko.gz' \) -print0)

declare -A builtin=()
if [[ -f "$module_root/modules.builtin" ]]; then
    while IFS= read -r line; do
        base="${line##*/}"
        name="${base%%.ko*}"
        builtin["${name//-/_}"]=1
    done < "$module_root/modules.builtin"
fi

decompress() {  # decompress FILE -> stdout
    case "$1" in
        *.ko) cat "$1" ;;
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -qdc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
    esac
}

module_depends() {  # the module's .modinfo "depends=" list, space-separated
    decompress "$1" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
}

declare -A state=()  # "visiting" / "done"
load_order=()
visit() {
    local name="$1" dep
    [[ -n "${builtin[$name]:-}" ]] && return 0
    case "${state[$name]:-}" in
        done) return 0 ;;
        visiting) die "dependency cycle at $name" ;;
    esac
    [[ -n "${module_file[$name]:-}" ]] || die "module $name is neither in the package nor built in"
    state[$name]=visiting
    for dep in $(module_depends "${module_file[$name]}"); do
        visit "${dep//-/_}"
    done
    state[$name]=done
    load_order+=("$name")
    decompress "${module_file[$name]}" > "$tree/lib/modules/avmm/$name.ko"
}
for name in "${wanted_modules[@]}"; do
    visit "$name"
done
printf '%s\n' "${load_order[@]}" > "$tree/lib/modules/avmm/load-order"

# -- busybox, /init, test scripts -----------------------------------------------------
initramfs_install_userspace

# -- the archive (deterministic order, root-owned) ------------------------------------
initramfs_pack "$kernel_dir/initramfs.cpio"
echo "build-debian-initramfs: $kernel_dir/initramfs.cpio ($release; modules: ${load_order[*]})"
