"""Pause and resume a VM: vCPUs park outside KVM_RUN, devices take no new requests, and
the guest goes on exactly where it was."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from avmm import StopReason, VirtualMachine
from avmm.errors import VmStateError
from avmm.lifecycle import DeviceMetrics, VmState
from avmm.vcpu_loop import PauseControl
from avmm.virtio.blk import BlockDevice
from avmm.virtio.device import PauseGate, VirtioDevice
from avmm.virtio.rng import RngDevice
from avmm.vm_virtio import VirtioMmioSlot, _MmioDeviceContext, placements
from tests.virtio.queue_helpers import DriverQueue, make_queue

from .helpers import MAILBOX_ADDRESS, MAILBOX_MAGIC, guest_config

COUNTER = MAILBOX_ADDRESS + 8
DONE = MAILBOX_ADDRESS + 16
#: Long enough (about 1 s here) for several pauses in the middle; short enough to finish.
N = 2_000_000_000


def vcpu_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "vcpu" in t.name and "avmm" in t.name]


async def wait_for_progress(vm: VirtualMachine, above: int = 0) -> int:
    """Wait until the count guest's mailbox counter is above ``above``."""
    assert vm.memory is not None
    with trio.fail_after(60):
        while (value := vm.memory.read_u64(COUNTER)) <= above:
            await trio.sleep(0.005)
    return value


async def read_all(vm: VirtualMachine) -> str:
    output = bytearray()
    async for chunk in vm.serial:
        output += chunk
    return output.decode()


# -- with the test guest ----------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.parametrize("vcpus", [1, 2])
async def test_count_is_right_after_several_pauses(vcpus: int) -> None:
    async with VirtualMachine(guest_config(f"avmm.test=count avmm.n={N}", vcpus=vcpus)) as vm:
        assert vm.memory is not None
        assert vm.state is VmState.RUNNING
        seen = 0
        pauses = 0
        while vm.memory.read_u64(DONE) == 0 and pauses < 4:
            seen = await wait_for_progress(vm, seen)
            if vm.state is not VmState.RUNNING:
                break  # the count finished between two looks
            try:
                await vm.pause()
            except VmStateError:
                assert vm.state in (VmState.STOPPING, VmState.STOPPED)  # it just finished
                break
            pauses += 1
            assert vm.state is VmState.PAUSED
            frozen = vm.memory.read_u64(COUNTER)
            # Nothing runs while paused: give the guest time it would have used.
            await trio.sleep(0.05)
            assert vm.memory.read_u64(COUNTER) == frozen
            await vm.resume()
            assert vm.state is VmState.RUNNING
        output = await read_all(vm)
        result = await vm.wait()
        assert vm.memory.read_u64(COUNTER) == N
        assert vm.memory.read_u64(DONE) == 1
    assert pauses >= 1
    assert f"avmm-testguest: count done n={N}" in output
    assert result.reason is StopReason.RESET
    assert vm.state is VmState.STOPPED
    assert vm.vcpu_exit_counts().get("Interrupted", 0) >= pauses


@pytest.mark.kvm
@pytest.mark.guest
async def test_pause_and_resume_refuse_the_wrong_state() -> None:
    async with VirtualMachine(guest_config(f"avmm.test=count avmm.n={N * 100}")) as vm:
        with pytest.raises(VmStateError, match="only a paused VM can be resumed"):
            await vm.resume()
        await vm.pause()
        with pytest.raises(VmStateError, match="is paused; only a running VM"):
            await vm.pause()
        assert vm.state is VmState.PAUSED  # the refused pause changed nothing
        await vm.resume()
        await vm.pause()
        await vm.resume()
        vm.stop("test is done")
        assert await vm.wait_state(VmState.STOPPED) is VmState.STOPPED
        with pytest.raises(VmStateError, match="is stopped"):
            await vm.pause()
        with pytest.raises(VmStateError, match="is stopped"):
            await vm.resume()


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.parametrize("vcpus", [1, 2])
async def test_stop_while_paused_wakes_the_parked_vcpus(vcpus: int) -> None:
    config = guest_config(f"avmm.test=count avmm.n={N * 100}", vcpus=vcpus)
    async with VirtualMachine(config) as vm:
        await wait_for_progress(vm)
        await vm.pause()
        vm.stop("stopped while paused")
        with trio.fail_after(30):
            result = await vm.wait()
        assert vm.state is VmState.STOPPED
    assert result.reason is StopReason.STOPPED
    assert result.detail == "stopped while paused"
    assert vcpu_threads() == []


@pytest.mark.kvm
@pytest.mark.guest
async def test_a_vm_started_paused_runs_nothing_until_resumed() -> None:
    config = guest_config("avmm.test=count avmm.n=1000")
    async with VirtualMachine(config, start_paused=True) as vm:
        assert vm.memory is not None
        assert vm.state is VmState.PAUSED
        await trio.sleep(0.05)
        assert vm.memory.read_u64(MAILBOX_ADDRESS) != MAILBOX_MAGIC  # not one guest step
        await vm.resume()
        output = await read_all(vm)
        result = await vm.wait()
    assert "count done n=1000" in output
    assert result.reason is StopReason.RESET


@pytest.mark.kvm
@pytest.mark.guest
async def test_wait_state_sees_pause_resume_and_stop() -> None:
    seen: list[VmState] = []
    async with VirtualMachine(guest_config(f"avmm.test=count avmm.n={N * 100}")) as vm:

        async def watch() -> None:
            seen.append(await vm.wait_state(VmState.PAUSED))
            seen.append(await vm.wait_state(VmState.RUNNING))
            seen.append(await vm.wait_state(VmState.PAUSED))  # stopped instead

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            await vm.pause()
            await trio.testing.wait_all_tasks_blocked()
            await vm.resume()
            await trio.testing.wait_all_tasks_blocked()
            vm.stop()
    assert seen == [VmState.PAUSED, VmState.RUNNING, VmState.STOPPED]


@pytest.mark.kvm
@pytest.mark.guest
async def test_metrics_count_a_disks_requests_bytes_and_kicks(tmp_path: Path) -> None:
    import dataclasses
    import zlib

    from avmm.config import DiskConfig

    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(256 * 1024))
    config = dataclasses.replace(guest_config("avmm.test=blk-crc"),
                                 disks=(DiskConfig(path=disk, readonly=True),))
    async with VirtualMachine(config) as vm:
        before = vm.metrics()
        output = await read_all(vm)
        await vm.wait()
        after = vm.metrics()
    assert f"crc32={zlib.crc32(disk.read_bytes()):08x}" in output
    assert before.devices["blk0"] == DeviceMetrics(kind="blk")
    blk = after.devices["blk0"]
    assert blk.kind == "blk"
    # Reads of at most 64 KiB: at least 4 requests, the disk's bytes written into the
    # guest, and kicks (fewer than requests when the device was still draining).
    assert blk.requests >= 4
    assert blk.bytes >= disk.stat().st_size
    assert blk.notifications >= 1
    assert after.state is VmState.STOPPED
    assert after.vcpu_exits["MmioWrite"] > 0


@pytest.mark.kvm
@pytest.mark.guest
async def test_pauses_in_the_middle_of_disk_io_lose_nothing(tmp_path: Path) -> None:
    import dataclasses
    import zlib

    from avmm.config import DiskConfig

    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(8 << 20))
    config = dataclasses.replace(guest_config("avmm.test=blk-crc avmm.req=8"),
                                 disks=(DiskConfig(path=disk, readonly=True),))
    async with VirtualMachine(config) as vm, trio.open_nursery() as nursery:
        output: list[str] = []

        async def collect() -> None:
            output.append(await read_all(vm))

        nursery.start_soon(collect)
        pauses = 0
        while vm.state is VmState.RUNNING and pauses < 20:
            if vm.metrics().devices["blk0"].requests == 0:
                await trio.sleep(0.001)
                continue
            try:
                await vm.pause()
            except VmStateError:
                break  # it finished
            pauses += 1
            taken = vm.metrics().devices["blk0"].requests
            await trio.sleep(0.01)
            # At most the request in flight when the pause began completes meanwhile.
            assert vm.metrics().devices["blk0"].requests <= taken + 1
            await vm.resume()
            await trio.sleep(0.005)
        result = await vm.wait()
    assert pauses >= 1
    assert f"crc32={zlib.crc32(disk.read_bytes()):08x}" in output[0]
    assert result.reason is StopReason.RESET


# -- the device side, without KVM --------------------------------------------------------


class _FakeKvmVm:
    """Enough of avmm.kvm.Vm for a VirtioMmioSlot outside KVM: the ioeventfds are then
    only written by the test."""

    def irqfd(self, fd: int, gsi: int) -> None:
        pass

    def ioeventfd(self, fd: int, address: int, length: int, *, datamatch: int) -> None:
        pass


def _slot(device: VirtioDevice, driver: DriverQueue, gate: PauseGate) -> VirtioMmioSlot:
    slot = VirtioMmioSlot(vm=_FakeKvmVm(), memory=driver.memory,  # type: ignore[arg-type]
                          device=device, placement=placements(1)[0],
                          token=trio.lowlevel.current_trio_token(), gate=gate)
    driver.configure(slot.transport.queues[0])
    return slot


@pytest.mark.parametrize("kind", ["rng", "blk"])
async def test_a_paused_device_takes_no_new_request_until_resumed(
        kind: str, tmp_path: Path) -> None:
    """With the gate closed a kicked request stays in the ring; the resume (gate open and
    the slot's own kick) lets the device take it. Only the driver's kick is counted.
    rng is served by serve_queue on the event loop, blk by its own I/O thread."""
    _queue, driver = make_queue(size=8)
    if kind == "rng":
        device: VirtioDevice = RngDevice(name="rng0")
        readable, writable, expected_bytes = [], [32], 32
    else:
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(range(256)) * 2)
        device = BlockDevice(image, read_only=True, name="blk0")
        header = struct.pack("<IIQ", 0, 0, 0)  # VIRTIO_BLK_T_IN, sector 0
        readable, writable, expected_bytes = [header], [512, 1], 16 + 513
    gate = PauseGate()
    slot = _slot(device, driver, gate)
    try:
        context = _MmioDeviceContext(slot)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await settle()  # the device drained the empty ring and waits for a kick
            gate.close()
            driver.add_chain(readable=readable, writable=writable)
            os.eventfd_write(slot.kick_fds[0], 1)
            await settle()
            assert driver.used() == []  # paused: not taken
            assert slot.metrics().requests == 0
            gate.open()
            slot.resumed()
            with trio.fail_after(30):
                while not (used := driver.used()):
                    await settle()
            assert [written for _head, written in used] == [writable[0] + (kind == "blk")]
            nursery.cancel_scope.cancel()
        assert slot.metrics() == DeviceMetrics(kind=kind, requests=1, bytes=expected_bytes,
                                               notifications=1)
    finally:
        slot.close()


async def settle() -> None:
    """Let the event loop and any device thread get as far as they can."""
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(0.02)  # a device's own thread is invisible to wait_all_tasks_blocked
    await trio.testing.wait_all_tasks_blocked()


def test_pause_control_parks_until_resumed_or_released() -> None:
    parked = threading.Event()
    control = PauseControl(2, on_change=parked.set)
    returned: list[str] = []

    def vcpu(name: str) -> None:
        control.park()
        returned.append(name)

    control.park()  # nothing requested: returns at once
    control.request()
    threads = [threading.Thread(target=vcpu, args=(f"vcpu{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    assert parked.wait(10)
    assert control.all_parked()
    assert returned == []
    control.resume()
    for thread in threads:
        thread.join(10)
    assert sorted(returned) == ["vcpu0", "vcpu1"]
    control.request()
    control.release()  # a stop: nobody parks any more
    assert not control.requested
    control.request()
    assert not control.requested
    control.park()
