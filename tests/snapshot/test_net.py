"""A VM exchanging frames with a host echoer (the test guest's ``net-echo``) snapshotted
mid-exchange and restored by ``avmm up --restore`` in a new process: the guest goes on
with the next frame and every frame comes back.

Frames in flight on the host side (in the tap's queue, in the echoer) are not part of
a snapshot, as on a real network; the guest does not resend. So the test snapshots at a
moment when no echo is on its way: after the pause, the echoer has answered exactly the
frames the guest has received (the mailbox counter). A frame the guest put in its TX
ring and the device had not taken yet is in the snapshot, and is sent by the restored
device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from avmm import VirtualMachine
from avmm.config import NetConfig
from tests.prerequisites import net_problem, require
from tests.virtio_guest_support import echoing_tap
from tests.vm.helpers import MAILBOX_ADDRESS

from .support import console_config, drain, restore_in_new_process

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

COUNTER = MAILBOX_ADDRESS + 8
FRAMES = 200


async def test_net_echo_goes_on_after_a_restore_in_a_new_process(tmp_path: Path) -> None:
    require(net_problem())
    with echoing_tap(lifetime=300) as (namespace, echoer):
        config = dataclasses.replace(
            console_config(f"avmm.test=net-echo avmm.n={FRAMES}", memory_mib=64),
            nets=(NetConfig(tap=namespace.tap, mac=bytes.fromhex("525400abcdef"),
                            netns=namespace.netns),))
        output = bytearray()
        async with VirtualMachine(config) as vm:
            assert vm.memory is not None
            with trio.fail_after(120):
                while True:
                    while vm.memory.read_u64(COUNTER) < 10:
                        await trio.sleep(0.005)
                    await vm.pause()
                    await trio.sleep(0.1)  # the echoer answers what reached it
                    received = vm.memory.read_u64(COUNTER)
                    if echoer.echoed == received:
                        break
                    await vm.resume()
                    await trio.sleep(0.003)
            assert received < FRAMES - 5, "the guest was almost done: nothing to test"
            await drain(vm, output)
            await vm.snapshot(tmp_path / "snap")
            vm.stop()
        before = output.decode()
        assert "echoed=" not in before
        restored = await restore_in_new_process(tmp_path / "snap")
    after = restored.stdout.decode()
    assert restored.returncode == 0, (restored.stderr.decode(), after)
    assert f"net0 echoed={FRAMES}" in after, after
    assert "mac=" not in after, "the restored guest started over"
    assert echoer.echoed == FRAMES
