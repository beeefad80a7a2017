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
from tests.traffic_support import PAUSED_ECHO_FRAMES, net_echo, pause_with_no_echo_on_its_way
from tests.virtio_guest_support import echoing_tap

from .support import console_config, drain, restore_in_new_process

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

FRAMES = PAUSED_ECHO_FRAMES


async def test_net_echo_goes_on_after_a_restore_in_a_new_process(tmp_path: Path) -> None:
    require(net_problem())
    with echoing_tap(lifetime=300) as (namespace, echoer):
        config = net_echo(console_config(f"avmm.test=net-echo avmm.n={FRAMES}",
                                         memory_mib=64), namespace)
        output = bytearray()
        async with VirtualMachine(config) as vm:
            with trio.fail_after(120):
                received = await pause_with_no_echo_on_its_way(vm, echoer)
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


async def test_a_derived_mac_is_kept_when_restored_under_another_name(tmp_path: Path) -> None:
    """A NIC without a configured MAC gets one derived from the VM's name (see README);
    the restored VM has another name, and its NIC must still be the one the guest's
    driver knew: the snapshot records the MAC in effect."""
    require(net_problem())
    with echoing_tap(lifetime=120) as (namespace, _echoer):
        config = dataclasses.replace(
            console_config("avmm.test=net-echo avmm.n=1000", memory_mib=64),
            nets=(NetConfig(tap=namespace.tap, netns=namespace.netns),))
        async with VirtualMachine(config, name="original", start_paused=True) as vm:
            mac = vm.virtio_slots[0].device.read_config(0, 6)
            await vm.snapshot(tmp_path / "snap")
            vm.stop()
        async with VirtualMachine.restore(tmp_path / "snap", name="another",
                                          start_paused=True) as restored:
            assert restored.config.nets[0].mac == mac
            assert restored.virtio_slots[0].device.read_config(0, 6) == mac
            restored.stop()
