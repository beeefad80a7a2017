"""A VM writing its disk (the test guest's ``blk-write``) snapshotted mid-write and
restored by ``avmm up --restore`` in a new process: the guest goes on from the saved
request and the pattern on the disk is complete and correct. The disk is a file served
in-process, or a vhost-user back-end (``avmm backend blk``, qemu-storage-daemon) that is
restarted on a new socket for the restore."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.config import DiskConfig
from tests.traffic_support import (
    BLK_SECTORS,
    PROGRESS,
    blank_image,
    blk_disk,
    blk_served,
    wait_for_sectors,
)
from tests.virtio_guest_support import expected_pattern

from .support import console_config, drain, restore_in_new_process

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

COUNTER = PROGRESS
SECTORS = BLK_SECTORS
SEED = 5
#: One sector per request (default: up to 128): the tests pause the guest inside a
#: window of its progress, which whole-speed writes (128 requests for the whole disk)
#: cross between two polls of a loaded host.
BLK_WRITE = f"avmm.test=blk-write avmm.seed={SEED} avmm.req=1"


@pytest.mark.parametrize("kind", ["file", "avmm", pytest.param("qsd", marks=pytest.mark.qemu)])
async def test_blk_write_goes_on_after_a_restore_in_a_new_process(tmp_path: Path,
                                                                  kind: str) -> None:
    image = blank_image(tmp_path / "disk.img")
    disk = blk_disk(kind, image, tmp_path / "blk.sock")
    config = dataclasses.replace(console_config(BLK_WRITE,
                                                memory_mib=64), disks=(disk,))
    with blk_served(kind, image, tmp_path / "blk.sock"):
        async with VirtualMachine(config) as vm:
            assert vm.memory is not None
            output = bytearray()
            with trio.fail_after(120):
                # Inside the write half: some sectors written, not all.
                await wait_for_sectors(vm, 1, SECTORS // 2)
            await vm.pause()
            done_at_snapshot = vm.memory.read_u64(COUNTER)
            await drain(vm, output)
            await vm.snapshot(tmp_path / "snap")
            vm.stop()
    assert 0 < done_at_snapshot < SECTORS, done_at_snapshot
    before = output.decode()
    assert "verify=" not in before
    # What the guest had not written yet is still zero on the disk.
    with image.open("rb") as f:
        f.seek((SECTORS - 1) * 512)
        assert f.read(512) == bytes(512)

    # A new back-end process (on a new socket for the vhost-user kinds) and a new avmm.
    new_sock = tmp_path / "new.sock"
    with blk_served(kind, image, new_sock):
        extra = [] if kind == "file" else ["--vhost-user", f"blk0={new_sock}"]
        restored = await restore_in_new_process(tmp_path / "snap", *extra)
    after = restored.stdout.decode()
    assert restored.returncode == 0, (restored.stderr.decode(), after)
    assert f"blk0 written={SECTORS} verify=ok" in after, after
    assert image.read_bytes() == expected_pattern(SEED, SECTORS)


async def _pause_between(vm: VirtualMachine, low: int, high: int) -> int:
    """Pause the VM once the guest's sector counter is in [low, high); the counter."""
    assert vm.memory is not None
    with trio.fail_after(120):
        await wait_for_sectors(vm, low, high)
    await vm.pause()
    return vm.memory.read_u64(COUNTER)


@pytest.mark.parametrize("kind", ["file", "avmm"])
async def test_blk_write_survives_two_rounds_of_snapshot_and_restore(tmp_path: Path,
                                                                     kind: str) -> None:
    """Snapshot, restore, snapshot the restored VM, restore that (Cloud Hypervisor's
    #8918 class: device state lost on the second round): the disk still ends complete."""
    image = blank_image(tmp_path / "disk.img")
    sock = tmp_path / "blk.sock"
    disk = blk_disk(kind, image, sock)
    config = dataclasses.replace(console_config(BLK_WRITE,
                                                memory_mib=64), disks=(disk,))
    with blk_served(kind, image, sock):
        async with VirtualMachine(config) as vm:
            first = await _pause_between(vm, 1, SECTORS // 4)
            await vm.snapshot(tmp_path / "one")
            vm.stop()
    with blk_served(kind, image, tmp_path / "two.sock"):
        sockets = {} if kind == "file" else {"blk0": str(tmp_path / "two.sock")}
        async with VirtualMachine.restore(tmp_path / "one", vhost_user=sockets) as vm:
            second = await _pause_between(vm, first + 1, SECTORS // 2)
            output = bytearray()
            await drain(vm, output)
            await vm.snapshot(tmp_path / "two")
            vm.stop()
    assert first < second, (first, second)
    assert "verify=" not in output.decode()
    with blk_served(kind, image, tmp_path / "three.sock"):
        extra = [] if kind == "file" else ["--vhost-user", f"blk0={tmp_path / 'three.sock'}"]
        restored = await restore_in_new_process(tmp_path / "two", *extra)
    after = restored.stdout.decode()
    assert restored.returncode == 0, (restored.stderr.decode(), after)
    assert f"blk0 written={SECTORS} verify=ok" in after, after
    assert image.read_bytes() == expected_pattern(SEED, SECTORS)


async def test_a_snapshot_flushes_the_writable_disks_before_it_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest never sends FLUSH (avmm.flush=0): what it wrote is made stable by the
    snapshot (the disks are not in it), the read-only disk is left alone."""
    from tests.test_host import record_flushes

    image, readonly = blank_image(tmp_path / "disk.img"), tmp_path / "ro.img"
    readonly.write_bytes(bytes(4096))
    config = dataclasses.replace(
        console_config(f"{BLK_WRITE} avmm.flush=0", memory_mib=64),
        disks=(DiskConfig(path=image), DiskConfig(path=readonly, readonly=True)))
    async with VirtualMachine(config) as vm:
        await _pause_between(vm, 1, SECTORS // 2)
        synced = record_flushes(monkeypatch)
        await vm.snapshot(tmp_path / "snap")
        disk_flushes = [path for path in synced if path.endswith(".img")]
        vm.stop()
    assert disk_flushes == [str(image)]
