#!/usr/bin/env bash
# Build avmm's minimal Linux guest kernel from Debian's linux-source-6.1 package.
#
# Usage: scripts/build-linux-kernel.sh [OUT_DIR]        (OUT_DIR defaults to build/linux)
#
# Needs (Debian): linux-source-6.1 bc bison flex libelf-dev libssl-dev gcc make
# (`make deps-build` installs them). Steps:
#   1. unpack /usr/src/linux-source-6.1.tar.xz into OUT_DIR/src and apply
#      examples/linux/patches/*.patch in order (once per package version). When only the
#      patch set changed, the patches applied last time (copies in OUT_DIR/src/.avmm-patches)
#      are reverted and the new ones applied in place, keeping OUT_DIR/obj, so that make
#      rebuilds only what they touch; if that fails the source is unpacked afresh;
#   2. in OUT_DIR/obj (O=): `make tinyconfig`, merge examples/linux/microvm.config,
#      `make olddefconfig`, then check that every line of the fragment survived (a
#      dependency Kconfig did not satisfy fails the build here, loudly);
#   3. `make bzImage vmlinux`, copy both to OUT_DIR (vmlinux carries the PVH ELF note).
# Cached: OUT_DIR/config.sha256 records the fragment's hash, the patches' hash and the
# source version; with all unchanged and the images present nothing is rebuilt. Environment:
#   LINUX_SOURCE_TARBALL  another source tarball (default /usr/src/linux-source-6.1.tar.xz)
#   JOBS                  parallel jobs (default: nproc)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/build/linux}"
fragment="$repo_root/examples/linux/microvm.config"
patches_dir="$repo_root/examples/linux/patches"
tarball="${LINUX_SOURCE_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"
jobs="${JOBS:-$(nproc)}"

die() { echo "build-linux-kernel: $*" >&2; exit 1; }
log() { echo "build-linux-kernel: $*"; }

[[ -f "$fragment" ]] || die "$fragment missing"
[[ -f "$tarball" ]] || die "$tarball missing (apt-get install linux-source-6.1)"
for tool in make gcc bc bison flex tar xz patch; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "$tool not found (apt-get install linux-source-6.1 bc bison flex libelf-dev libssl-dev)"
done

mkdir -p "$out"
out="$(cd "$out" && pwd)"
src="$out/src"
obj="$out/obj"

# The source's identity: the package version when the tarball is the package's, else the
# tarball's size and modification time.
if [[ -z "${LINUX_SOURCE_TARBALL:-}" ]] \
        && version="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null)" \
        && [[ -n "$version" ]]; then
    source_id="linux-source-6.1 $version"
else
    source_id="$tarball $(stat -c '%s %Y' "$tarball")"
fi
patches=("$patches_dir"/*.patch)
[[ -e "${patches[0]}" ]] || patches=()
patch_id="patches:$(cat /dev/null "${patches[@]}" | sha256sum | cut -d' ' -f1)"
want="$(sha256sum < "$fragment" | cut -d' ' -f1) $source_id $patch_id"

if [[ -f "$out/config.sha256" && "$(cat "$out/config.sha256")" == "$want" \
        && -f "$out/bzImage" && -f "$out/vmlinux" ]]; then
    log "$out/bzImage is up to date ($source_id)"
    exit 0
fi

# -- 1. the source, unpacked once per version; patched once per patch set ----------------
applied="$src/.avmm-patches"

# Apply the patch set to DIR, keeping a copy of each patch in DIR/.avmm-patches (what
# swap_patches reverts the next time the set changes).
apply_patches() {
    local dir="$1" patch_file
    mkdir -p "$dir/.avmm-patches"
    for patch_file in "${patches[@]}"; do
        log "applying ${patch_file#"$repo_root"/}"
        if ! patch -d "$dir" -p1 --batch --forward --quiet --no-backup-if-mismatch \
                < "$patch_file"; then
            echo "build-linux-kernel: $patch_file does not apply to $source_id" >&2
            return 1
        fi
        cp "$patch_file" "$dir/.avmm-patches/"
    done
}

# Same source, other patches: revert the recorded ones (last first), apply the new set.
# The record goes first, so an interrupted or failed swap leaves a tree the next run
# unpacks afresh rather than trusts.
swap_patches() {
    local old=() i
    [[ -d "$applied" && "$(cat "$src/.avmm-source" 2>/dev/null)" == "$source_id patches:"* ]] \
        || return 1
    rm -f "$src/.avmm-source"
    old=("$applied"/*.patch)
    [[ -e "${old[0]}" ]] || old=()
    for ((i = ${#old[@]} - 1; i >= 0; i--)); do
        log "reverting ${old[i]##*/} (the patch set changed)"
        patch -d "$src" -p1 -R --batch --quiet --no-backup-if-mismatch < "${old[i]}" \
            || { log "could not revert ${old[i]##*/}; unpacking afresh"; return 1; }
        rm -f "${old[i]}"
    done
    apply_patches "$src" || { log "unpacking afresh"; return 1; }
    echo "$source_id $patch_id" > "$src/.avmm-source"
}

if [[ ! -f "$src/.avmm-source" || "$(cat "$src/.avmm-source")" != "$source_id $patch_id" ]] \
        && ! swap_patches; then
    log "unpacking $tarball"
    rm -rf "$src" "$obj" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xf "$tarball" -C "$src.tmp" --strip-components=1
    apply_patches "$src.tmp" || die "the patches do not apply to $source_id (see above)"
    echo "$source_id $patch_id" > "$src.tmp/.avmm-source"
    mv "$src.tmp" "$src"
fi

# -- 2. the configuration ------------------------------------------------------------------
mkdir -p "$obj"
start=$(date +%s)
make -s -C "$src" O="$obj" tinyconfig >/dev/null
(cd "$src" && scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" "$fragment") >/dev/null
make -s -C "$src" O="$obj" olddefconfig >/dev/null

bad=0
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        name="${BASH_REMATCH[1]}"
        if ! grep -qxF "$line" "$obj/.config"; then
            got="$(grep -E "^(# )?$name[= ]" "$obj/.config" || echo "absent")"
            echo "build-linux-kernel: wanted $line, got: $got" >&2
            bad=1
        fi
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        name="${BASH_REMATCH[1]}"
        if grep -qE "^$name=" "$obj/.config"; then
            echo "build-linux-kernel: wanted $name off, got: $(grep -E "^$name=" "$obj/.config")" >&2
            bad=1
        fi
    fi
done < "$fragment"
[[ $bad == 0 ]] || die "the fragment did not survive olddefconfig (see above); fix $fragment"

# -- 3. the images -------------------------------------------------------------------------
log "building bzImage and vmlinux with $jobs jobs"
make -s -C "$src" O="$obj" -j"$jobs" bzImage vmlinux
cp "$obj/arch/x86/boot/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
cp "$obj/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$obj/.config" "$out/config"
echo "$want" > "$out/config.sha256"
log "$out/bzImage ($(stat -c %s "$out/bzImage") bytes), vmlinux ($(stat -c %s "$out/vmlinux") bytes) in $(( $(date +%s) - start )) s"
