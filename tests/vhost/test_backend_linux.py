"""avmm's vhost-user back-end serving a real Linux guest: QEMU (TCG, ``-M pc``) runs Debian's
stock cloud kernel with the busybox initramfs from ``make linux-debian``, whose ``/init``
loads the virtio modules and runs one of its built-in tests (``avmm.run=NAME``; see
``tests/linux/init`` for the contract). The devices are ``vhost-user-blk-pci`` and
``vhost-user-rng-pci`` pointed at ``avmm backend blk|rng`` in a subprocess; guest RAM is a
shared memfd so that the back-end can map it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.linux.support import linux_lines
from tests.prerequisites import require

from .test_backend_qemu import backend

pytestmark = [pytest.mark.qemu, pytest.mark.debian_kernel]

REPO = Path(__file__).resolve().parents[2]
INITRAMFS = REPO / "build" / "debian-kernel" / "initramfs.cpio"
QEMU = "qemu-system-x86_64"
# Userspace is reached in ~2-3 s under TCG here; leave room for slow, loaded hosts.
TIMEOUT_S = 120
READY = "avmm-linux: ready"


def blk_write_pattern(seed: int, sectors: int) -> bytes:
    """What ``/tests/blk-write`` writes from sector 0 (see tests/linux/run/blk-write)."""
    return b"".join(f"avmm-seed{seed:06d}-sector{i:08d}.\n".encode() * 16 for i in range(sectors))


@pytest.fixture
def initramfs() -> Path:
    require(None if INITRAMFS.exists() else
            f"{INITRAMFS} is missing (make linux-debian builds it)")  # fmt: skip
    return INITRAMFS


class Boot:
    """One QEMU run: exit status, the guest's ``avmm-linux:`` lines, seconds to ready."""

    def __init__(self, status: int, output: str, ready_s: float | None, total_s: float):
        self.status = status
        self.output = output
        # SeaBIOS leaves terminal escapes in front of the first line /init prints.
        self.lines = linux_lines(output)
        self.ready_s = ready_s
        self.total_s = total_s


def run_linux(kernel: Path, initrd: Path, run: str, devices: Sequence[str],
              extra_cmdline: str = "") -> Boot:  # fmt: skip
    cmdline = f"console=ttyS0 panic=-1 quiet avmm.run={run} {extra_cmdline}".strip()
    argv = [
        QEMU,
        "-M", "pc,accel=tcg", "-cpu", "max", "-m", "256", "-smp", "1",
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        "-numa", "node,memdev=mem",
        *devices,
    ]  # fmt: skip
    start = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    assert process.stdout is not None
    chunks: list[str] = []
    ready_at: list[float] = []

    def pump() -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            if not ready_at and READY in line:
                ready_at.append(time.monotonic() - start)
            chunks.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status = process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        reader.join(timeout=5)
        pytest.fail(f"QEMU ran past {TIMEOUT_S} s; output:\n{''.join(chunks)[-4000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=5)
    process.stdout.close()
    output = "".join(chunks)
    assert ready_at, f"the guest never reached /init's ready marker; output:\n{output[-4000:]}"
    return Boot(status, output, ready_at[0], time.monotonic() - start)


def vhost_device(name: str, sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=vu,path={sock}", "-device", f"{name},chardev=vu"]


def record(figure: Callable[[str, str], None], name: str, boot: Boot) -> None:
    figure(f"Debian 6.1 + vhost-user ({name}, QEMU TCG) to /init ready",
           f"{boot.ready_s:.1f} s (whole run {boot.total_s:.1f} s)")  # fmt: skip


def test_linux_reads_an_image_over_vhost_user_blk(
    debian_kernel: Path, initramfs: Path, tmp_path: Path, figure: Callable[[str, str], None]
) -> None:
    image = tmp_path / "disk.img"
    data = os.urandom(8 << 20)
    image.write_bytes(data)
    sock = tmp_path / "blk.sock"
    with backend("blk", sock, "--image", str(image), "--readonly") as process:
        boot = run_linux(debian_kernel, initramfs, "blk-read",
                         vhost_device("vhost-user-blk-pci", sock))  # fmt: skip
    expected = f"avmm-linux: vda sha256={hashlib.sha256(data).hexdigest()} bytes={len(data)}"
    assert boot.lines == [READY, expected, "avmm-linux: exit=0"], boot.output[-4000:]
    assert boot.status == 0, boot.output[-4000:]
    assert process.returncode == 0, process.stderr_text  # type: ignore[attr-defined]
    assert not sock.exists()
    record(figure, "blk-read 8 MiB", boot)


def test_linux_writes_a_pattern_over_vhost_user_blk(
    debian_kernel: Path, initramfs: Path, tmp_path: Path, figure: Callable[[str, str], None]
) -> None:
    seed, sectors, image_sectors = 4242, 2048, 4096
    image = tmp_path / "disk.img"
    tail = os.urandom((image_sectors - sectors) * 512)
    image.write_bytes(bytes(sectors * 512) + tail)
    sock = tmp_path / "blk.sock"
    with backend("blk", sock, "--image", str(image)) as process:
        boot = run_linux(debian_kernel, initramfs, "blk-write",
                         vhost_device("vhost-user-blk-pci", sock),
                         f"avmm.seed={seed} avmm.sectors={sectors}")  # fmt: skip
    assert boot.lines == [READY, f"avmm-linux: vda written={sectors * 512}",
                          "avmm-linux: exit=0"], boot.output[-4000:]  # fmt: skip
    assert boot.status == 0, boot.output[-4000:]
    assert process.returncode == 0, process.stderr_text  # type: ignore[attr-defined]
    written = image.read_bytes()
    assert written[: sectors * 512] == blk_write_pattern(seed, sectors)
    assert written[sectors * 512 :] == tail, "the guest wrote past the pattern"
    record(figure, "blk-write 1 MiB", boot)


def test_linux_reads_hwrng_over_vhost_user_rng(
    debian_kernel: Path, initramfs: Path, tmp_path: Path, figure: Callable[[str, str], None]
) -> None:
    sock = tmp_path / "rng.sock"
    with backend("rng", sock) as process:
        boot = run_linux(debian_kernel, initramfs, "rng",
                         vhost_device("vhost-user-rng-pci", sock))  # fmt: skip
    assert len(boot.lines) == 3, boot.output[-4000:]
    assert boot.lines[0] == READY and boot.lines[2] == "avmm-linux: exit=0", boot.lines
    match = re.fullmatch(r"avmm-linux: hwrng=(\S+) ([0-9a-f]{64})", boot.lines[1])
    assert match, boot.lines
    assert match.group(1).startswith("virtio_rng"), boot.lines
    assert match.group(2) != "0" * 64
    assert boot.status == 0, boot.output[-4000:]
    assert process.returncode == 0, process.stderr_text  # type: ignore[attr-defined]
    record(figure, "rng 32 bytes", boot)
