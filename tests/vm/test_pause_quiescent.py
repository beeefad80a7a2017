"""Pause means quiescent: once ``VirtualMachine.pause()`` returns, no device of the VM
(in-process or a vhost-user back-end in another process) writes guest memory or raises
an interrupt, and ``resume()`` lets every device go on exactly where it stopped.

The vhost-user case makes the race visible: the back-end is stopped (SIGSTOP) with the
guest's request pending in the ring and let go again half a second into the pause. A
pause that does not stop the back-end's rings returns at once and the back-end then
completes the request behind the paused guest's back (guest memory changes); a pause
that stops them (GET_VRING_BASE) returns only once the back-end answered, and nothing
changes after that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import threading
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine
from avmm.config import DiskConfig, NetConfig, VmConfig
from tests.vhost.test_frontend import avmm_backend
from tests.virtio_guest_support import expected_pattern

from .helpers import MAILBOX_ADDRESS, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

COUNTER = MAILBOX_ADDRESS + 8
#: 32 MiB written and read back in 512-byte requests: 65,536 requests, so the guest is
#: still busy with its disk when the test pauses it, three times. (16 MiB in 4 KiB
#: requests took the in-process disk about 20 ms once its I/O thread ran in C: done
#: before a check every 10 ms saw it start.)
SECTORS = 65536
REQUEST_SECTORS = 1
VM_TIMEOUT_S = 240


def memory_digest(vm: VirtualMachine) -> str:
    """SHA-256 of all of guest RAM (a worker thread runs it)."""
    memory = vm.memory
    assert memory is not None
    digest = hashlib.sha256()
    for region in memory.regions:
        digest.update(memory.view(region.guest_address, region.size))
    return digest.hexdigest()


async def wait_busy(vm: VirtualMachine) -> int:
    """Wait until the blk-write guest has written a few requests' worth."""
    assert vm.memory is not None
    with trio.fail_after(60):
        while (value := vm.memory.read_u64(COUNTER)) < 4 * REQUEST_SECTORS:
            await trio.sleep(0.002)
    assert value < SECTORS, "the guest finished its disk work before the pause"
    return value


def blk_write_config(seed: int, disk: DiskConfig) -> VmConfig:
    cmdline = f"avmm.test=blk-write avmm.seed={seed} avmm.req={REQUEST_SECTORS}"
    return dataclasses.replace(guest_config(cmdline, memory_mib=64), disks=(disk,))


async def finish(vm: VirtualMachine, output: bytearray) -> None:
    with trio.fail_after(VM_TIMEOUT_S):
        async for chunk in vm.serial:
            output += chunk
        result = await vm.wait()
    text = output.decode(errors="replace")
    assert f"blk0 written={SECTORS} verify=ok" in text, text
    assert result.reason is StopReason.RESET, text


async def test_a_busy_vhost_user_disk_writes_nothing_while_the_vm_is_paused(
        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    sock = tmp_path / "blk.sock"
    seed = int.from_bytes(os.urandom(4), "little")
    output = bytearray()
    with avmm_backend("blk", sock, "--image", str(image)) as backend:
        async with VirtualMachine(blk_write_config(seed, DiskConfig(vhost_user=sock))) as vm:
            await wait_busy(vm)
            # The back-end freezes with the guest's next request pending in the ring.
            os.kill(backend.pid, signal.SIGSTOP)
            let_go = threading.Timer(0.5, os.kill, (backend.pid, signal.SIGCONT))
            try:
                await trio.sleep(0.1)
                let_go.start()
                with trio.fail_after(30):
                    await vm.pause()
                before = await trio.to_thread.run_sync(memory_digest, vm)
                await trio.sleep(1.0)
                after = await trio.to_thread.run_sync(memory_digest, vm)
            finally:
                let_go.cancel()
                os.kill(backend.pid, signal.SIGCONT)
            assert before == after, "guest memory changed while the VM was paused"
            await vm.resume()
            await finish(vm, output)
    assert image.read_bytes() == expected_pattern(seed, SECTORS)


async def test_a_busy_in_process_disk_writes_nothing_while_the_vm_is_paused(
        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    seed = int.from_bytes(os.urandom(4), "little")
    output = bytearray()
    async with VirtualMachine(blk_write_config(seed, DiskConfig(path=image))) as vm:
        for _ in range(3):
            await wait_busy(vm)
            await vm.pause()
            assert all(slot.paused for slot in vm.virtio_slots)
            before = await trio.to_thread.run_sync(memory_digest, vm)
            await trio.sleep(1.0)
            after = await trio.to_thread.run_sync(memory_digest, vm)
            assert before == after, "guest memory changed while the VM was paused"
            await vm.resume()
        await finish(vm, output)
    assert image.read_bytes() == expected_pattern(seed, SECTORS)


async def test_a_nic_echoing_frames_writes_nothing_while_the_vm_is_paused(
        echoing_tap: tuple[str, str]) -> None:
    """Echoes keep arriving on the tap while the VM is paused (the guest sent a frame
    just before): the device holds receive buffers, which must not be filled then; the
    echo reaches the guest after the resume and no frame is lost (the guest waits for
    each echo)."""
    tap, netns = echoing_tap
    frames = 400
    config = dataclasses.replace(
        guest_config(f"avmm.test=net-echo avmm.n={frames}", memory_mib=64),
        nets=(NetConfig(tap=tap, mac=bytes.fromhex("525400abcdef"), netns=netns),))
    output = bytearray()
    async with VirtualMachine(config) as vm:
        assert vm.memory is not None
        for round_ in range(3):
            with trio.fail_after(60):
                while vm.memory.read_u64(COUNTER) < 20 * (round_ + 1):
                    await trio.sleep(0.005)
            await vm.pause()
            before = await trio.to_thread.run_sync(memory_digest, vm)
            await trio.sleep(0.5)
            after = await trio.to_thread.run_sync(memory_digest, vm)
            assert before == after, "guest memory changed while the VM was paused"
            await vm.resume()
        with trio.fail_after(VM_TIMEOUT_S):
            async for chunk in vm.serial:
                output += chunk
            result = await vm.wait()
    text = output.decode(errors="replace")
    assert f"net0 echoed={frames}" in text, text
    assert result.reason is StopReason.RESET, text
