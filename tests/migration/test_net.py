"""Migration of a VM exchanging frames with a host echoer (the test guest's
``net-echo``): the destination has its own tap (with its own echoer) and gets the NIC's
MAC from the stream; the guest goes on with the next frame and every frame comes back,
none lost, none duplicated.

Frames in flight on the host side (in the source's tap queue, in its echoer) are not
part of a migration, as on any network, and this guest never resends: so the test
migrates the VM paused at a moment when no echo is on its way (as the snapshot test
does). That the pages the NIC writes while the guest runs are sent is pinned by
tests/migration/test_dirty_vm.py and by the blk tests here."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine
from avmm.config import NetConfig
from tests.prerequisites import net_problem, require
from tests.traffic_support import ECHO_FRAMES, net_echo, pause_with_no_echo_on_its_way
from tests.virtio_guest_support import EthernetEchoer, TapNamespace

from .support import TIMEOUT_S, collect, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

FRAMES = ECHO_FRAMES


async def test_net_echo_goes_on_on_the_destination(tmp_path: Path) -> None:
    require(net_problem())
    with TapNamespace() as namespace:
        subprocess.run(["ip", "-n", namespace.netns, "tuntap", "add", "dev", "avmmtap1",
                        "mode", "tap"], check=True, capture_output=True, timeout=30)
        subprocess.run(["ip", "-n", namespace.netns, "link", "set", "avmmtap1", "up"],
                       check=True, capture_output=True, timeout=30)
        with namespace.echoer(lifetime=300) as echoer, \
                EthernetEchoer("avmmtap1", netns=namespace.netns, lifetime=300) as second:
            config = net_echo(guest_config(f"avmm.test=net-echo avmm.n={FRAMES}",
                                           memory_mib=64), namespace)
            # The destination's own tap; its MAC comes with the stream.
            given = dataclasses.replace(config, nets=(NetConfig(
                tap="avmmtap1", netns=namespace.netns),))
            before, after = bytearray(), bytearray()
            with trio.fail_after(TIMEOUT_S):
                async with trio.open_nursery() as nursery, VirtualMachine.receive(
                        f"unix:{tmp_path / 'in.sock'}", config=given) as destination:
                    async with VirtualMachine(config) as source:
                        nursery.start_soon(collect, source, before)
                        received = await pause_with_no_echo_on_its_way(source, echoer)
                        assert received < FRAMES - 5, "the guest was almost done"
                        await source.migrate(f"unix:{tmp_path / 'in.sock'}")
                        assert (await source.wait()).reason is StopReason.MIGRATED
                    nursery.start_soon(collect, destination, after)
                    end = await destination.wait()
    assert not end.failed, end
    assert "echoed=" not in before.decode()
    assert f"net0 echoed={FRAMES}" in after.decode(), after.decode()
    assert echoer.echoed + second.echoed == FRAMES
    assert second.echoed == FRAMES - received
