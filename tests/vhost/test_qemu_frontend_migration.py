"""avmm's vhost-user back-end (``avmm backend blk``) under a migrating front-end that is
not avmm's: QEMU (microvm, KVM) live-migrates the test guest's ``blk-write`` to a second
QEMU (``-incoming``), each QEMU with its own back-end on the same image (shared storage),
in the middle of the write half or of the read-back. QEMU migrates a vhost-user device
only if the back-end offers dirty logging (VHOST_F_LOG_ALL with LOG_SHMFD; without it
``migrate`` answers "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature"), then
sets the log, stops the device on the source (GET_VRING_BASE) and starts it on the
destination from the ring state it carried over. The guest finishing on the destination
with its read-back verified and the pattern complete on the disk shows that this
sequence, as QEMU drives it, loses no request.

What this guest cannot show: a back-end that negotiates logging but never marks a page.
QEMU marks the used ring dirty itself when it stops the device, and the guest zeroes its
one buffer before each read, so only a read completing between that page's last send
and the stop would reach the destination stale (a sabotaged SDK log passed three runs
here). The SDK's marks themselves are pinned by tests/vhost/test_dirty_log.py."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import QEMU_KVM_CPU
from benchmarks.qmp import Qmp
from tests.traffic_support import BLK_SECTORS, blank_image, blk_served
from tests.virtio_guest_support import expected_pattern

pytestmark = [pytest.mark.qemu, pytest.mark.kvm, pytest.mark.guest]

QEMU = "qemu-system-x86_64"
TIMEOUT_S = 120
STATUS_POWER_OFF = 0
# 16 MiB in small requests: the write half lasts long enough that the migration lands in
# its middle (as in tests/migration/test_disks.py).
SECTORS = 2 * BLK_SECTORS
SEED = 7
REQUEST_SECTORS = 8
#: 4,096 requests of 4 KiB per half: about 2 s each at this rate, where QEMU migrates the
#: 64 MiB guest in well under a second. (Unlimited, the back-end's queue thread can
#: finish the read-back before the migration does, and the guest then ends on the
#: source.)
SOURCE_IOPS = 2000
SECTOR = 512


def qemu_argv(guest: Path, backend_sock: Path, monitor: Path, *extra: str) -> list[str]:
    """QEMU microvm with KVM, RAM in a sealed shared memfd (a vhost-user back-end maps
    it), the test guest's blk-write on a vhost-user-blk device at ``backend_sock``, QMP
    at ``monitor``."""
    return [
        QEMU, "-M", "microvm,accel=kvm,acpi=off,memory-backend=mem", "-cpu", QEMU_KVM_CPU,
        "-m", "64", "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
        "-smp", "1", "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0x501,iosize=2", "-device", "i8042",
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(guest),
        "-append", f"avmm.test=blk-write avmm.seed={SEED} avmm.req={REQUEST_SECTORS}",
        "-chardev", f"socket,id=vu,path={backend_sock}", "-device", "vhost-user-blk,chardev=vu",
        "-qmp", f"unix:{monitor},server=on,wait=off", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def qemu(argv: list[str], output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """QEMU running ``argv`` with its serial output going to ``output``; killed on exit
    if it is still running."""
    with output.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def wait_for(ready: Any, what: str, *processes: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        for process in processes:
            assert process.poll() is None, f"{what}: QEMU exited {process.returncode}"
        assert time.monotonic() < deadline, f"{what}: timed out"
        time.sleep(0.005)


def sector_written(image: Path, sector: int) -> bool:
    """Whether ``sector`` of the (zeroed) image holds something now."""
    with image.open("rb") as f:
        f.seek(sector * SECTOR)
        return any(f.read(SECTOR))


@pytest.mark.parametrize("half", ["write", "read"])
def test_qemu_migrates_blk_write_on_avmm_backends(test_guest: Path, tmp_path: Path,
                                                  half: str) -> None:
    image = blank_image(tmp_path / "disk.img", SECTORS)
    source_sock, destination_sock = tmp_path / "src-blk.sock", tmp_path / "dst-blk.sock"
    source_qmp, destination_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    incoming = tmp_path / "mig.sock"
    before, after = tmp_path / "src.out", tmp_path / "dst.out"
    # The source's back-end is limited (SOURCE_IOPS), so that each half of blk-write
    # lasts longer than QEMU's migration however fast the back-end serves: the
    # migration then lands in the half the test chose, not after the guest is done.
    with blk_served("avmm", image, source_sock, options=("--iops", str(SOURCE_IOPS))), \
            blk_served("avmm", image, destination_sock), \
            qemu(qemu_argv(test_guest, source_sock, source_qmp), before) as source, \
            qemu(qemu_argv(test_guest, destination_sock, destination_qmp,
                           "-incoming", f"unix:{incoming}"), after) as destination:
        wait_for(lambda: source_qmp.exists() and destination_qmp.exists()
                 and incoming.exists(), "QEMU listening", source, destination)
        if half == "write":
            # The first request is on the disk, the middle is not yet.
            wait_for(lambda: sector_written(image, 0), "blk-write started", source)
            assert not sector_written(image, SECTORS // 2), "the write half was almost done"
        else:
            # The last sector is written: the guest is reading back, requests whose
            # data the back-end writes into guest RAM are in flight at the stop.
            wait_for(lambda: sector_written(image, SECTORS - 1), "blk-write read-back",
                     source)
        with Qmp(source_qmp, timeout_s=TIMEOUT_S) as monitor:
            monitor.command("migrate", uri=f"unix:{incoming}")
            deadline = time.monotonic() + TIMEOUT_S
            while (info := monitor.command("query-migrate"))["status"] not in (
                    "completed", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"migration did not end: {info}"
                time.sleep(0.01)
            assert info["status"] == "completed", info
            assert monitor.command("query-status")["status"] == "postmigrate"
            monitor.command("quit")
        status = destination.wait(timeout=TIMEOUT_S)
        source.wait(timeout=30)
    source_text, destination_text = before.read_text(), after.read_text()
    # The guest prints only at the end, after its read-back: nothing on the source.
    assert "blk0" not in source_text, source_text
    assert f"avmm-testguest: blk0 written={SECTORS} verify=ok" in destination_text, (
        destination_text)
    assert status == STATUS_POWER_OFF, destination_text
    assert image.read_bytes() == expected_pattern(SEED, SECTORS)
