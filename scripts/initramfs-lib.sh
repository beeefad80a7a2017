# Shared by build-debian-initramfs.sh and build-linux-initramfs.sh (sourced, not run).
# Expects: die(), $source_dir (tests/linux). Provides: initramfs_begin (sets $work, $tree,
# $busybox), initramfs_install_userspace, initramfs_pack OUT_FILE.

initramfs_begin() {
    for tool in cpio find; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install cpio)"
    done
    command -v gcc >/dev/null 2>&1 || die "gcc not found (apt-get install gcc)"
    busybox=""
    for candidate in /bin/busybox /usr/bin/busybox; do
        # A static busybox: the initramfs has no shared libraries.
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
}

# busybox, /init, the test scripts (tests/linux/init documents the contract) and
# /bin/avmm-syscall-fault (tests/linux/syscall-fault.c): static and without libc, so it
# needs nothing from the initramfs; no red zone, because its inline assembly pushes.
initramfs_install_userspace() {
    cp "$busybox" "$tree/bin/busybox"
    gcc -O2 -Wall -Wextra -static -nostdlib -ffreestanding -fno-stack-protector \
        -fno-pie -no-pie -mno-red-zone -fno-asynchronous-unwind-tables \
        -o "$tree/bin/avmm-syscall-fault" "$source_dir/syscall-fault.c" \
        || die "building $source_dir/syscall-fault.c failed"
    ln -s busybox "$tree/bin/sh"
    install -m 0755 "$source_dir/init" "$tree/init"
    for script in "$source_dir"/run/*; do
        install -m 0755 "$script" "$tree/tests/${script##*/}"
    done
}

# The archive: newc, uncompressed, deterministic order, root-owned; replaced atomically.
initramfs_pack() {
    local out_file="$1"
    mkdir -p "$(dirname "$out_file")"
    (cd "$tree" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible) > "$work/initramfs.cpio"
    mv "$work/initramfs.cpio" "$out_file.tmp"
    mv "$out_file.tmp" "$out_file"
}
