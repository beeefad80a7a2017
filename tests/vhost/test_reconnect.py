"""vhost-user reconnect: the back-end is killed (SIGKILL) in the middle of the test
guest's ``blk-write`` and started again on the same socket; avmm stalls the device,
reconnects, replays the bring-up (with INFLIGHT_SHMFD where the back-end offers it) and
the guest finishes with every sector correct. A back-end that never comes back leaves
the device in DEVICE_NEEDS_RESET after the give-up time, and the VMM keeps running."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine, VmExit
from avmm.memory import ByteArrayMemory
from avmm.vhost.backend import _InflightQueue, _TrackedQueue, inflight_queue_region_size
from avmm.vhost.frontend import VhostUserDevice
from avmm.virtio.mmio import DeviceStatus
from tests.prerequisites import require
from tests.vhost.test_frontend import avmm_backend, blk_config, storage_daemon
from tests.virtio.queue_helpers import DriverQueue
from tests.virtio_guest_support import expected_pattern

VM_TIMEOUT_S = 40
SECTORS = 32 * 2048  # 32 MiB
#: The backend is down this long before a new one is started.
DOWN_S = 0.3
#: blk-write's requests are this many sectors (default 128): the tests must act while
#: the guest writes, which at 64 KiB per request lasted 50 to 100 ms through qsd, a window
#: a loaded host's 5 ms polling of the image can step over; 4 KiB requests widen it.
REQUEST = "avmm.req=8"


def _backend(kind: str, image: Path, sock: Path) -> contextlib.AbstractContextManager[
        subprocess.Popen[bytes]]:
    if kind == "qsd":
        return storage_daemon(image, sock)  # type: ignore[return-value]
    return avmm_backend("blk", sock, "--image", str(image))  # type: ignore[return-value]


def _need(kind: str) -> None:
    if kind == "qsd" and shutil.which("qemu-storage-daemon") is None:
        require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")


def _writing_started(image: Path, first: bytes) -> bool:
    with image.open("rb") as f:
        return f.read(len(first)) == first


async def _run_with(config: object, during: Callable[[VirtualMachine], object]
                    ) -> tuple[VmExit, str, VirtualMachine]:
    output = bytearray()
    with trio.fail_after(VM_TIMEOUT_S):
        async with VirtualMachine(config) as vm, trio.open_nursery() as nursery:  # type: ignore[arg-type]
            nursery.start_soon(during, vm)
            async for chunk in vm.serial:
                output += chunk
            result = await vm.wait()
    return result, output.decode(errors="replace"), vm


def _vhost_device(vm: VirtualMachine) -> VhostUserDevice:
    device = vm.virtio_slots[0].device
    assert isinstance(device, VhostUserDevice)
    return device


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.parametrize("kind", [pytest.param("qsd", marks=pytest.mark.qemu), "avmm"])
async def test_killing_the_blk_backend_mid_write_loses_nothing(
    tmp_path: Path, kind: str, figure: Callable[[str, str], None],
) -> None:
    _need(kind)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    sock = tmp_path / "blk.sock"
    seed = int.from_bytes(os.urandom(4), "little")
    first = expected_pattern(seed, 1)
    stack = contextlib.ExitStack()
    process = stack.enter_context(_backend(kind, image, sock))
    killed_at: list[float] = []
    unwritten_at_kill: list[bool] = []
    inflight_at_kill: list[bool] = []

    async def kill_and_restart(vm: VirtualMachine) -> None:
        while not _writing_started(image, first):
            await trio.sleep(0.005)
        inflight_at_kill.append(_vhost_device(vm).inflight is not None)
        process.kill()
        killed_at.append(time.monotonic())
        with image.open("rb") as f:
            f.seek((SECTORS - 1) * 512)
            unwritten_at_kill.append(f.read(512) == bytes(512))
        await trio.to_thread.run_sync(process.wait)
        await trio.sleep(DOWN_S)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # the dead back-end's socket file
        await trio.to_thread.run_sync(
            lambda: stack.enter_context(_backend(kind, image, sock)))

    with stack:
        result, output, vm = await _run_with(
            blk_config(f"avmm.test=blk-write avmm.seed={seed} {REQUEST}", sock), kill_and_restart)
    device = _vhost_device(vm)
    assert killed_at, output
    assert f"blk0 written={SECTORS} verify=ok" in output, output
    assert result.reason is StopReason.RESET, (result, output)
    assert device.reconnects >= 1
    assert image.read_bytes() == expected_pattern(seed, SECTORS)
    assert unwritten_at_kill == [True], "the guest had finished writing before the kill"
    if kind == "avmm":
        # avmm's back-end offers INFLIGHT_SHMFD (the record outlives the killed process).
        assert inflight_at_kill == [True]
    figure(f"vhost-user reconnect via {kind}: back-end down {DOWN_S} s, reconnect took (s)",
           f"{device.last_reconnect_s:.3f}")


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_backend_that_never_comes_back_puts_the_device_in_needs_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("avmm.vhost.frontend.RECONNECT_TIMEOUT_S", 1.0)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    sock = tmp_path / "blk.sock"
    seed = 7
    first = expected_pattern(seed, 1)
    process_holder: list[subprocess.Popen[bytes]] = []
    gave_up: list[float] = []

    async def kill(vm: VirtualMachine) -> None:
        while not _writing_started(image, first):
            await trio.sleep(0.005)
        process_holder[0].kill()
        killed = time.monotonic()
        transport = vm.virtio_slots[0].transport
        # The guest reacts to DEVICE_NEEDS_RESET within microseconds (debug exit).
        while not transport.status & DeviceStatus.DEVICE_NEEDS_RESET and vm.exit is None:
            await trio.sleep(0.002)
        gave_up.append(time.monotonic() - killed)

    with _backend("avmm", image, sock) as process:
        process_holder.append(process)
        result, output, vm = await _run_with(
            blk_config(f"avmm.test=blk-write avmm.seed={seed} {REQUEST}", sock), kill)
    assert gave_up and 1.0 <= gave_up[0] < 5.0, gave_up
    assert vm.virtio_slots[0].transport.status & DeviceStatus.DEVICE_NEEDS_RESET
    # The guest, still running, saw DEVICE_NEEDS_RESET and gave up on its own: the VMM
    # stayed up through the give-up and stopped only on the guest's debug exit.
    assert "blk0 needs reset" in output, output
    assert result.reason is StopReason.DEBUG_EXIT, (result, output)


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_backend_that_comes_back_with_another_disk_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(SECTORS * 512 * 2))  # another capacity: config space differs
    sock = tmp_path / "blk.sock"
    first = expected_pattern(3, 1)
    stack = contextlib.ExitStack()
    process = stack.enter_context(_backend("avmm", image, sock))
    refused_after: list[float] = []

    async def swap(vm: VirtualMachine) -> None:
        while not _writing_started(image, first):
            await trio.sleep(0.005)
        process.kill()
        killed = time.monotonic()
        await trio.to_thread.run_sync(process.wait)
        await trio.to_thread.run_sync(lambda: stack.enter_context(_backend("avmm", other, sock)))
        transport = vm.virtio_slots[0].transport
        while not transport.status & DeviceStatus.DEVICE_NEEDS_RESET and vm.exit is None:
            await trio.sleep(0.002)
        refused_after.append(time.monotonic() - killed)

    with stack:
        result, output, vm = await _run_with(
            blk_config(f"avmm.test=blk-write avmm.seed=3 {REQUEST}", sock), swap)
    assert vm.virtio_slots[0].transport.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert "blk0 needs reset" in output, output
    assert result.reason is StopReason.DEBUG_EXIT, (result, output)
    assert refused_after and refused_after[0] < 10  # at once, not after the give-up time
    assert other.read_bytes() == bytes(SECTORS * 512 * 2)  # nothing written to it

# -- avmm's back-end: the inflight record, without a guest ------------------------------


def _tracked(driver: DriverQueue, area: memoryview) -> tuple[_TrackedQueue, list[int]]:
    """A back-end queue started on ``driver``'s ring with the inflight ``area``, as
    after a (re)connect: recovery, then the position it continues from."""
    queue = _TrackedQueue(driver.size)
    driver.configure(queue)
    tracker = _InflightQueue(area, driver.size)
    heads = tracker.recover(driver.used_idx, driver.size)
    queue.inflight = tracker
    queue.resubmit = list(heads)
    queue.state.next_available = (driver.used_idx + len(heads)) & 0xFFFF
    return queue, heads


def test_inflight_record_resubmits_what_a_dead_backend_had_taken() -> None:
    size = 16
    assert inflight_queue_region_size(size) == 320  # 16 + 16 * 16 = 272, 64-aligned
    driver = DriverQueue(ByteArrayMemory(1 << 20), size)
    area = memoryview(bytearray(inflight_queue_region_size(size)))
    queue, heads = _tracked(driver, area)
    assert heads == []
    a, b, c = (driver.add_chain([bytes([n])], [1]) for n in range(3))
    popped = [queue.pop(driver.memory) for _ in range(3)]
    assert [chain.head for chain in popped if chain] == [a, b, c]
    queue.push(driver.memory, c, 1)  # completed out of order; a and b still in flight
    # The back-end dies; a new one starts on the same ring with the same record.
    queue, heads = _tracked(driver, area)
    assert heads == [a, b]  # oldest first
    d = driver.add_chain([b"d"], [1])
    again = [queue.pop(driver.memory) for _ in range(4)]
    assert [chain.head if chain else None for chain in again] == [a, b, d, None]
    for head in (b, a, d):
        queue.push(driver.memory, head, 1)
    assert sorted(head for head, _ in driver.used()) == sorted([a, b, c, d])


def test_inflight_record_forgets_a_chain_published_just_before_the_crash() -> None:
    size = 8
    driver = DriverQueue(ByteArrayMemory(1 << 20), size)
    area = memoryview(bytearray(inflight_queue_region_size(size)))
    queue, _ = _tracked(driver, area)
    a, b = driver.add_chain([b"a"], [1]), driver.add_chain([b"b"], [1])
    assert queue.pop(driver.memory) is not None and queue.pop(driver.memory) is not None
    # Die between publishing a's used entry and clearing its in-flight flag.
    assert queue.inflight is not None
    queue.inflight.returning(a)
    super(_TrackedQueue, queue).push(driver.memory, a, 1)
    queue, heads = _tracked(driver, area)
    assert heads == [b]  # a reached the driver: not redone, not returned twice
    assert queue.state.next_available == 2
