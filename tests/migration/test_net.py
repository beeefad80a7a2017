"""Migration of a VM exchanging frames with a host echoer (the test guest's
``net-echo``): the destination has its own tap (with its own echoer) and gets the NIC's
MAC from the stream; the guest goes on with the next frame and every frame comes back.

Frames in flight on the host side (in the source's tap queue, in its echoer) are not
part of a migration, as on any network. So two tests:

* in the middle of the traffic: the guest resends a frame whose echo does not come back
  in time (``avmm.resend_ms``), the echoer is slow (a frame or its echo is on its way
  most of the time), and the migration starts after a few echoes without waiting for a
  quiet moment: every frame's echo comes back (to the source or the destination) and
  the guest verifies it;
* at a quiet moment, with a guest that never resends: migrated paused when no echo is
  on its way (as the snapshot test does), not one frame is lost or repeated.

That the pages the NIC writes while the guest runs are sent is pinned by
tests/migration/test_dirty_vm.py and by the blk tests here."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine
from avmm.config import NetConfig
from tests.prerequisites import net_problem, require
from tests.traffic_support import (
    ECHO_FRAMES,
    PAUSED_ECHO_FRAMES,
    PROGRESS,
    SequenceEchoer,
    net_echo,
    pause_with_no_echo_on_its_way,
)
from tests.virtio_guest_support import EthernetEchoer, TapNamespace

from .support import TIMEOUT_S, collect, guest_config

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

FRAMES = ECHO_FRAMES
#: In-flight test: the echoers hold each echo back this long, and the guest resends a
#: frame after this long without its echo (well above an echo's round trip on a loaded
#: host, so that resends are mostly the lost frames'; a spurious one is harmless).
ECHO_DELAY_S = 0.02
RESEND_MS = 1000
#: Frames echoed before the migration starts.
STARTED_AFTER = 5


@contextlib.contextmanager
def two_taps() -> Iterator[TapNamespace]:
    """A namespace with the source's tap and the destination's own, ``avmmtap1``."""
    with TapNamespace() as namespace:
        subprocess.run(["ip", "-n", namespace.netns, "tuntap", "add", "dev", "avmmtap1",
                        "mode", "tap"], check=True, capture_output=True, timeout=30)
        subprocess.run(["ip", "-n", namespace.netns, "link", "set", "avmmtap1", "up"],
                       check=True, capture_output=True, timeout=30)
        yield namespace


async def test_net_echo_migrated_with_frames_in_flight_every_frame_comes_back(
        tmp_path: Path, figure: Callable[[str, str], None]) -> None:
    require(net_problem())
    with two_taps() as namespace, \
            SequenceEchoer(namespace.tap, netns=namespace.netns, lifetime=300,
                           delay_s=ECHO_DELAY_S) as first, \
            SequenceEchoer("avmmtap1", netns=namespace.netns, lifetime=300,
                           delay_s=ECHO_DELAY_S) as second:
        config = net_echo(guest_config(
            f"avmm.test=net-echo avmm.n={FRAMES} avmm.resend_ms={RESEND_MS}",
            memory_mib=64), namespace)
        given = dataclasses.replace(config, nets=(NetConfig(
            tap="avmmtap1", netns=namespace.netns),))
        before, after = bytearray(), bytearray()
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery, VirtualMachine.receive(
                    f"unix:{tmp_path / 'in.sock'}", config=given) as destination:
                async with VirtualMachine(config) as source:
                    nursery.start_soon(collect, source, before)
                    assert source.memory is not None
                    while source.memory.read_u64(PROGRESS) < STARTED_AFTER:
                        await trio.sleep(0.005)
                    # No pause, no quiet moment: the guest waits for an echo nearly
                    # all the time (the echoers are slow), so the hand-over most
                    # likely catches a frame or its echo on the way.
                    await source.migrate(f"unix:{tmp_path / 'in.sock'}")
                    assert (await source.wait()).reason is StopReason.MIGRATED
                nursery.start_soon(collect, destination, after)
                end = await destination.wait()
        seen_first, seen_second = first.sequences(), second.sequences()
    assert not end.failed and end.exit_status == 0, end
    assert "echoed=" not in before.decode(), "the guest was done before the hand-over"
    whole = (before + after).decode()
    # Every frame's echo came back and the guest checked it (sequence, length, bytes).
    assert f"net0 echoed={FRAMES}\n" in after.decode(), whole[-2000:]
    assert "net0 resent=" in after.decode(), after.decode()
    resent = int(after.decode().split("net0 resent=")[1].split()[0])
    # Every frame reached an echoer, the source's or the destination's (not timing:
    # a frame the guest counted as echoed was echoed by one of them).
    assert set(seen_first) | set(seen_second) == set(range(1, FRAMES + 1))
    assert seen_second, "the destination's echoer saw nothing"
    figure("net-echo migrated in flight: frames resent by the guest", str(resent))
    figure("net-echo migrated in flight: sequences both echoers saw",
           str(sorted(set(seen_first) & set(seen_second))))


async def test_net_echo_goes_on_on_the_destination(tmp_path: Path) -> None:
    require(net_problem())
    with two_taps() as namespace, namespace.echoer(lifetime=300) as echoer, \
                EthernetEchoer("avmmtap1", netns=namespace.netns, lifetime=300) as second:
        config = net_echo(guest_config(f"avmm.test=net-echo avmm.n={PAUSED_ECHO_FRAMES}",
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
                    assert received < PAUSED_ECHO_FRAMES - 5, "the guest was almost done"
                    await source.migrate(f"unix:{tmp_path / 'in.sock'}")
                    assert (await source.wait()).reason is StopReason.MIGRATED
                nursery.start_soon(collect, destination, after)
                end = await destination.wait()
    assert not end.failed, end
    assert "echoed=" not in before.decode()
    assert f"net0 echoed={PAUSED_ECHO_FRAMES}" in after.decode(), after.decode()
    assert echoer.echoed + second.echoed == PAUSED_ECHO_FRAMES
    assert second.echoed == PAUSED_ECHO_FRAMES - received
