#!/usr/bin/env bash
# Fetch Debian's cloud kernel (a stock bzImage) for the boot-protocol tests.
#
# Usage: scripts/fetch-debian-kernel.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to build/debian-kernel under the repository root.
#
# Leaves OUTPUT_DIR/vmlinuz (the bzImage), OUTPUT_DIR/VERSION (the kernel release, e.g.
# 6.1.0-56-cloud-amd64) and the unpacked package under OUTPUT_DIR/root (modules live in
# root/lib/modules/<release>/). Idempotent: if vmlinuz already exists nothing is done.
#
# The metapackage linux-image-cloud-amd64 only depends on the versioned image package, and
# that version moves with Debian point releases, so it is resolved with apt-cache each time.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$repo_root/build/debian-kernel}"
meta_package="linux-image-cloud-amd64"

if [[ -e "$out_dir/vmlinuz" ]]; then
    echo "fetch-debian-kernel: $out_dir/vmlinuz already present, nothing to do"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "fetch-debian-kernel: $tool not found (this script needs a Debian-like host)" >&2
        exit 1
    fi
done

resolve_package() {
    apt-cache depends "$meta_package" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

package="$(resolve_package || true)"
if [[ -z "$package" ]]; then
    # A fresh container often has empty package lists; refresh them once and retry.
    echo "fetch-debian-kernel: apt-cache knows nothing about $meta_package, running apt-get update"
    if [[ "$(id -u)" -eq 0 ]]; then
        apt-get update -qq
    else
        sudo apt-get update -qq
    fi
    package="$(resolve_package || true)"
fi
if [[ -z "$package" ]]; then
    echo "fetch-debian-kernel: cannot resolve the kernel package behind $meta_package" >&2
    exit 1
fi
release="${package#linux-image-}"

mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
# Work in a scratch directory inside out_dir so that a failed run leaves no vmlinuz behind
# and the next run starts over.
work="$(mktemp -d "$out_dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch-debian-kernel: downloading $package"
# apt-get download writes into the current directory. As root, apt drops to its _apt
# sandbox user, which cannot write into a private scratch directory; download as root
# instead of printing a warning about it.
apt_options=()
if [[ "$(id -u)" -eq 0 ]]; then
    apt_options=(-o APT::Sandbox::User=root)
fi
(cd "$work" && apt-get download -q "${apt_options[@]}" "$package")
deb="$(find "$work" -maxdepth 1 -name "${package}_*.deb" | head -n 1)"
if [[ -z "$deb" ]]; then
    echo "fetch-debian-kernel: apt-get download produced no .deb for $package" >&2
    exit 1
fi

dpkg-deb -x "$deb" "$work/root"
image="$work/root/boot/vmlinuz-$release"
if [[ ! -f "$image" ]]; then
    echo "fetch-debian-kernel: $deb has no boot/vmlinuz-$release" >&2
    exit 1
fi

rm -rf "$out_dir/root"
mv "$work/root" "$out_dir/root"
echo "$release" > "$out_dir/VERSION"
# vmlinuz last: its presence means the whole fetch succeeded.
cp "$out_dir/root/boot/vmlinuz-$release" "$out_dir/vmlinuz.tmp"
mv "$out_dir/vmlinuz.tmp" "$out_dir/vmlinuz"
echo "fetch-debian-kernel: $out_dir/vmlinuz ($release)"
