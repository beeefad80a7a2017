"""virtio-net against a real tap (frames checked through an AF_PACKET socket bound to
it) and, for what needs no kernel, against a datagram socket pair standing in for one.

Tests that need a tap need root and /dev/net/tun: without them they skip with the
reason, or fail when AVMM_REQUIRE_KVM=1. Hostile drivers: test_fuzz_net.py.

The device-test plumbing here (FakeContext, Guest, FakeTap) is shared with test_rng.py,
test_console.py and test_net_batch.py.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from avmm.memory import ByteArrayMemory
from avmm.tap import Tap
from avmm.virtio.device import DeviceId, DeviceNeedsReset, VirtioDevice
from avmm.virtio.net import (
    MAX_FRAME_SIZE,
    NET_HEADER_SIZE,
    OFFLOAD_FEATURES,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    NetDevice,
)
from avmm.virtio.queue import VirtQueue

from .queue_helpers import DriverQueue

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
#: An IEEE "local experimental" EtherType, so test frames are told from anything else.
TEST_ETHERTYPE = b"\x88\xb5"
MAC = bytes.fromhex("02aa00000001")
HEADER = struct.Struct("<BBHHHHH")
_names = itertools.count()
#: Every test on both inner loops (C and Python; tests/virtio/inner_loops.py).
pytestmark = pytest.mark.usefixtures("net_path")


# -- plumbing ------------------------------------------------------------------------------


class FakeContext:
    """A DeviceContext for tests: ``kick(i)`` plays the driver's notification (a kick
    that arrives while nobody waits is remembered, as an eventfd would), and
    ``signals`` records ``signal_used`` calls."""

    def __init__(self, memory: ByteArrayMemory, queues: Sequence[VirtQueue | None],
                 features: int = 0) -> None:
        self.memory = memory
        self.queues = list(queues)
        self.features = features
        self.signals: list[int] = []
        # Primed, as the real transport is: the driver may have queued buffers before.
        self._kicked = [True] * len(self.queues)
        self._events = [trio.Event() for _ in self.queues]

    def kick(self, queue_index: int) -> None:
        self._kicked[queue_index] = True
        self._events[queue_index].set()

    async def wait_kick(self, queue_index: int) -> None:
        if self._kicked[queue_index]:
            await trio.lowlevel.checkpoint()
        else:
            self._events[queue_index] = trio.Event()
            await self._events[queue_index].wait()
        self._kicked[queue_index] = False

    def signal_used(self, queue_index: int) -> None:
        self.signals.append(queue_index)

    def signal_config_change(self) -> None:
        pass


class Guest:
    """Guest memory with ``queue_count`` queues, each driven by a DriverQueue
    (``drivers[i]`` feeds ``queues[i]``), and a FakeContext over them."""

    def __init__(self, queue_count: int = 2, size: int = 16, *, memory_size: int = 1 << 21,
                 features: int = 0, event_idx: bool = False) -> None:
        self.memory = ByteArrayMemory(memory_size)
        self.size = size
        self.event_idx = event_idx
        self.queues = [VirtQueue(size) for _ in range(queue_count)]
        self.drivers: list[DriverQueue] = []
        self.reset()
        self.context = FakeContext(self.memory, self.queues, features)

    def reset(self) -> None:
        """Set the queues up afresh, as a driver does after resetting the device."""
        data_start = 0x10000
        share = (self.memory.size - data_start) // len(self.queues)
        self.drivers = []
        for index, queue in enumerate(self.queues):
            driver = DriverQueue(self.memory, self.size, 0x1000 + 0x3000 * index,
                                 event_idx=self.event_idx,
                                 data_address=data_start + share * index, data_size=share)
            queue.reset()
            driver.configure(queue)
            queue.validate(self.memory)
            self.drivers.append(driver)

    # virtio-net's queues by name
    @property
    def rx(self) -> DriverQueue:
        return self.drivers[0]

    @property
    def tx(self) -> DriverQueue:
        return self.drivers[1]

    def kick_if_needed(self, queue_index: int, old_avail_idx: int) -> None:
        """Notify the device only if it asked for it (NO_NOTIFY / avail_event), as a
        real driver does: a device that forgets to re-enable notifications hangs."""
        if self.drivers[queue_index].needs_kick(old_avail_idx):
            self.context.kick(queue_index)

    def send(self, frame: bytes, header: bytes = bytes(NET_HEADER_SIZE),
             split: Sequence[int] = ()) -> int:
        """Add a transmit chain holding header + frame, cut at the offsets in ``split``."""
        data = header + frame
        cuts = [0, *split, len(data)]
        old = self.tx.avail_idx
        head = self.tx.add_chain([data[a:b] for a, b in itertools.pairwise(cuts)])
        self.kick_if_needed(1, old)
        return head

    def give_buffers(self, *sizes: int) -> list[int]:
        old = self.rx.avail_idx
        heads = [self.rx.add_chain(writable=[size]) for size in sizes]
        self.kick_if_needed(0, old)
        return heads


def frame(payload: bytes, size: int | None = None) -> bytes:
    data = bytes.fromhex("ffffffffffff") + MAC + TEST_ETHERTYPE + payload
    return data.ljust(size or 60, b"\0")


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


@asynccontextmanager
async def running(device: VirtioDevice, context: FakeContext) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.run, context)
        yield
        nursery.cancel_scope.cancel()


# -- a real tap --------------------------------------------------------------------------


class Wire:
    """The tap's kernel side, seen through an AF_PACKET socket: ``inject`` sends a frame
    that the device must receive, ``receive`` returns a frame the device sent."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.socket.bind((tap.name, 0))
        self.socket.setblocking(False)

    def inject(self, data: bytes) -> None:
        self.socket.send(data)

    def poll(self) -> bytes | None:
        """The next test frame the device sent, if one is there."""
        while True:
            try:
                data, address = self.socket.recvfrom(1 << 17)
            except BlockingIOError:
                return None
            if address[2] != PACKET_OUTGOING and data[12:14] == TEST_ETHERTYPE:
                return data

    async def receive(self, timeout: float = 5.0) -> bytes:
        with trio.fail_after(timeout):
            while (data := self.poll()) is None:
                await trio.lowlevel.wait_readable(self.socket)
        return data

    def close(self) -> None:
        self.socket.close()


# -- config ------------------------------------------------------------------------------


def test_identity_features_and_config() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        device = NetDevice(FakeTap(a), mac=MAC)
        assert device.device_id == DeviceId.NET
        assert device.queue_max_sizes == (256, 256)
        assert device.device_features() == (
            VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS
            | OFFLOAD_FEATURES)
        assert device.read_config(0, 6) == MAC
        assert device.read_config(6, 2) == b"\x01\x00"  # VIRTIO_NET_S_LINK_UP
        assert device.read_config(8, 2) == b"\x01\x00"  # max_virtqueue_pairs
        assert device.read_config(10, 4) == bytes(4)  # mtu etc.: not offered
        assert device.read_config(4, 4) == MAC[4:] + b"\x01\x00"


@pytest.mark.parametrize("mac", [b"\x01\x00\x00\x00\x00\x01", b"\x02\x00"])
def test_bad_mac_is_refused(mac: bytes) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, pytest.raises(ValueError):
        NetDevice(FakeTap(a), mac=mac)


# -- transmit ----------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
async def test_transmitted_frame_reaches_the_tap(tap: Tap, wire: Wire,
                                                 event_idx: bool) -> None:
    guest = Guest(event_idx=event_idx)
    device = NetDevice(tap, mac=MAC)
    sent = frame(b"hello from the guest", 100)
    # A header the driver should not send without offloads: if it reached the kernel,
    # NEEDS_CSUM would make it write a checksum into bytes 20..21 of the frame.
    bogus = HEADER.pack(1, 0, 0, 0, 14, 6, 0)
    async with running(device, guest.context):
        head = guest.send(sent, bogus, split=[5, 20, 40])
        assert await wire.receive() == sent
        await until(lambda: guest.tx.used_idx == 1)
    assert guest.tx.used() == [(head, 0)]
    assert device.stats.tx_frames == 1
    assert device.stats.tx_bytes == len(sent)
    assert 1 in guest.context.signals


async def test_bad_transmit_sizes_are_dropped_and_returned(tap: Tap, wire: Wire) -> None:
    guest = Guest(memory_size=1 << 20)
    device = NetDevice(tap, mac=MAC)
    good = frame(b"after the bad ones")
    async with running(device, guest.context):
        short_header = guest.tx.add_chain([b"\0" * 5])
        no_ethernet = guest.send(b"\x01" * 10)
        oversized = guest.send(b"\x02" * (MAX_FRAME_SIZE + 1))
        ok = guest.send(good)
        assert await wire.receive() == good
        await until(lambda: guest.tx.used_idx == 4)
    assert sorted(guest.tx.used()) == sorted(
        [(short_header, 0), (no_ethernet, 0), (oversized, 0), (ok, 0)])
    assert device.stats.tx_dropped == 3
    assert device.stats.tx_frames == 1
    assert wire.poll() is None


async def test_largest_frame_is_sent(tap: Tap, wire: Wire) -> None:
    guest = Guest(memory_size=1 << 20)
    device = NetDevice(tap, mac=MAC)
    big = frame(os.urandom(1000), 65535)
    async with running(device, guest.context):
        guest.send(big, split=[12, 30000])
        assert await wire.receive() == big


async def test_transmit_while_the_link_is_down_drops(tap: Tap) -> None:
    subprocess.run(["ip", "link", "set", tap.name, "down"], check=True)
    guest = Guest()
    device = NetDevice(tap, mac=MAC)
    async with running(device, guest.context):
        head = guest.send(frame(b"nobody listens"))
        await until(lambda: guest.tx.used_idx == 1)
    assert guest.tx.used() == [(head, 0)]
    assert device.stats.tx_dropped == 1


async def test_device_writable_transmit_buffer_needs_reset() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        guest.tx.add_chain([bytes(12) + frame(b"x")], [64])
        with trio.fail_after(5), pytest.raises(DeviceNeedsReset, match="device-writable"):
            await NetDevice(FakeTap(a), mac=MAC).run(guest.context)


# -- receive -----------------------------------------------------------------------------


async def test_received_frame_lands_in_one_buffer(tap: Tap, wire: Wire) -> None:
    guest = Guest()
    device = NetDevice(tap, mac=MAC)
    incoming = frame(b"hello guest", 98)
    async with running(device, guest.context):
        (head,) = guest.give_buffers(1526)
        wire.inject(incoming)
        await until(lambda: guest.rx.used_idx == 1)
    assert guest.rx.used() == [(head, 12 + len(incoming))]
    data = guest.rx.writable_data(head, 12 + len(incoming))
    assert HEADER.unpack(data[:12]) == (0, 0, 0, 0, 0, 0, 1)
    assert data[12:] == incoming
    assert device.stats.rx_frames == 1
    assert device.stats.rx_bytes == len(incoming)
    assert 0 in guest.context.signals


async def test_receive_header_is_rewritten_even_split(tap: Tap, wire: Wire) -> None:
    """The kernel writes its own header (possibly DATA_VALID); the guest must see flags
    0 and num_buffers, also when the header straddles two descriptors."""
    guest = Guest()
    device = NetDevice(tap, mac=MAC)
    incoming = frame(b"split header")
    async with running(device, guest.context):
        head = guest.rx.add_chain(writable=[7, 5, 1514])
        guest.rx.memory.write(guest.rx.chains[head].writable[0][0], b"\xff" * 7)
        guest.context.kick(0)
        wire.inject(incoming)
        await until(lambda: guest.rx.used_idx == 1)
    data = guest.rx.writable_data(head, 12 + len(incoming))
    assert HEADER.unpack(data[:12]) == (0, 0, 0, 0, 0, 0, 1)
    assert data[12:] == incoming


async def test_mergeable_frame_spreads_over_three_buffers(tap: Tap, wire: Wire) -> None:
    guest = Guest(features=VIRTIO_NET_F_MRG_RXBUF)
    device = NetDevice(tap, mac=MAC)
    incoming = frame(os.urandom(1500), 1514)
    async with running(device, guest.context):
        heads = guest.give_buffers(600, 600, 600, 600)
        wire.inject(incoming)
        await until(lambda: guest.rx.used_idx == 3)
        await trio.testing.wait_all_tasks_blocked()
    used = guest.rx.used()
    assert used == [(heads[0], 600), (heads[1], 600), (heads[2], 1526 - 1200)]
    data = b"".join(guest.rx.writable_data(head, length) for head, length in used)
    assert HEADER.unpack(data[:12]) == (0, 0, 0, 0, 0, 0, 3)
    assert data[12:] == incoming
    assert guest.context.signals.count(0) == 1  # one interrupt for the three


async def test_mergeable_frame_waits_for_enough_buffers(tap: Tap, wire: Wire) -> None:
    guest = Guest(features=VIRTIO_NET_F_MRG_RXBUF)
    device = NetDevice(tap, mac=MAC)
    incoming = frame(os.urandom(1500), 1514)
    async with running(device, guest.context):
        first = guest.give_buffers(600, 600)
        wire.inject(incoming)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)
        assert guest.rx.used_idx == 0  # two buffers are not enough: nothing used yet
        last = guest.give_buffers(1000)
        await until(lambda: guest.rx.used_idx == 3)
    used = guest.rx.used()
    assert [head for head, _ in used] == [*first, *last]
    assert [length for _, length in used] == [600, 600, 326]
    data = b"".join(guest.rx.writable_data(head, length) for head, length in used)
    assert data[12:] == incoming and data[10:12] == b"\x03\x00"


async def test_frame_too_big_for_the_buffer_is_dropped(tap: Tap, wire: Wire) -> None:
    """Without MRG_RXBUF a frame must fit one chain; one that does not is dropped and
    the buffer is kept for the next frame."""
    guest = Guest()
    device = NetDevice(tap, mac=MAC)
    small = frame(b"small")
    async with running(device, guest.context):
        (head,) = guest.give_buffers(200)
        wire.inject(frame(b"big", 1000))
        wire.inject(small)
        await until(lambda: guest.rx.used_idx == 1)
    assert guest.rx.used() == [(head, 12 + len(small))]
    assert guest.rx.writable_data(head, 12 + len(small))[12:] == small
    assert device.stats.rx_dropped == 1


async def test_mergeable_frame_bigger_than_the_whole_queue_is_dropped(
        tap: Tap, wire: Wire) -> None:
    guest = Guest(2, 4, features=VIRTIO_NET_F_MRG_RXBUF)
    device = NetDevice(tap, mac=MAC)
    small = frame(b"fits")
    async with running(device, guest.context):
        heads = guest.give_buffers(100, 100, 100, 100)
        wire.inject(frame(b"big", 1514))
        wire.inject(small)
        await until(lambda: guest.rx.used_idx == 1)
    assert guest.rx.used() == [(heads[0], 12 + len(small))]
    assert device.stats.rx_dropped == 1


@pytest.mark.parametrize("event_idx", [False, True])
async def test_no_receive_buffers_holds_frames_in_the_tap(tap: Tap, wire: Wire,
                                                          event_idx: bool) -> None:
    guest = Guest(event_idx=event_idx)
    device = NetDevice(tap, mac=MAC)
    frames = [frame(bytes([i]) * 20) for i in range(3)]
    async with running(device, guest.context):
        for data in frames:
            wire.inject(data)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)
        assert device.stats.rx_frames == 0
        # The frames wait in the tap's kernel queue: the device did not read them.
        assert select.select([tap.fd], [], [], 0)[0]
        heads = guest.give_buffers(1526, 1526, 1526)
        await until(lambda: guest.rx.used_idx == 3)
    used = guest.rx.used()
    assert [head for head, _ in used] == heads
    for (head, length), data in zip(used, frames, strict=True):
        assert guest.rx.writable_data(head, length)[12:] == data


async def test_device_readable_receive_buffer_needs_reset() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        guest.rx.add_chain([b"oops"], [1526])
        with trio.fail_after(5), pytest.raises(DeviceNeedsReset, match="device-readable"):
            await NetDevice(FakeTap(a), mac=MAC).run(guest.context)


async def test_mergeable_buffer_smaller_than_the_header_needs_reset() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest(features=VIRTIO_NET_F_MRG_RXBUF)
        guest.rx.add_chain(writable=[8])
        with trio.fail_after(5), pytest.raises(DeviceNeedsReset, match="at least"):
            await NetDevice(FakeTap(a), mac=MAC).run(guest.context)


async def test_received_frames_of_impossible_sizes_are_dropped() -> None:
    """What a tap never delivers, a broken one might: shorter than an Ethernet header,
    or longer than the largest frame. Both are dropped; the buffer serves the next."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        guest = Guest(memory_size=1 << 20)
        device = NetDevice(FakeTap(a), mac=MAC)
        good = frame(b"good")
        async with running(device, guest.context):
            (head,) = guest.give_buffers(NET_HEADER_SIZE + MAX_FRAME_SIZE + 100)
            b.send(bytes(12) + b"\x01" * 13)
            b.send(bytes(12) + b"\x02" * (MAX_FRAME_SIZE + 1))
            b.send(bytes(12) + good)
            await until(lambda: guest.rx.used_idx == 1)
        assert guest.rx.used() == [(head, 12 + len(good))]
        assert guest.rx.writable_data(head, 12 + len(good))[12:] == good
        assert device.stats.rx_dropped == 2


async def test_reset_forgets_held_buffers() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        device = NetDevice(FakeTap(a), mac=MAC)
        queue = guest.context.queues[0]
        assert queue is not None
        async with running(device, guest.context):
            guest.give_buffers(1526)
            await trio.testing.wait_all_tasks_blocked()
            # Either loop takes a buffer before it waits for the tap.
            assert device._rx_chains
        # run() ended: the device keeps none; the queue gives them back (give_back).
        assert not device._rx_chains
        assert queue.held == 1
        device.reset()
        assert not device._rx_chains


# -- throughput ----------------------------------------------------------------------------


async def test_small_frame_rates(tap: Tap, wire: Wire, figure: Callable[[str, str], None],
                                 ) -> None:
    """Frames/s for 64-byte frames through a real tap, device side only (the driver's
    work of adding buffers is outside the timed part). Measured, not asserted."""
    size = 256
    rounds = 8
    guest = Guest(2, size, memory_size=1 << 22)
    device = NetDevice(tap, mac=MAC)
    tx_frame = frame(b"tx", 64)
    tx_time = rx_time = 0.0
    async with running(device, guest.context):
        await trio.testing.wait_all_tasks_blocked()
        for round_ in range(rounds):
            for _ in range(size):
                guest.tx.add_chain([bytes(12) + tx_frame], publish=False)
            start = time.perf_counter()
            guest.tx.publish()
            guest.context.kick(1)
            target = (round_ + 1) * size & 0xFFFF
            while guest.tx.used_idx != target:
                await trio.lowlevel.checkpoint()
            tx_time += time.perf_counter() - start
            guest.tx.used()
        while wire.poll() is not None:
            pass
        for round_ in range(rounds):
            for i in range(size):
                wire.inject(frame(i.to_bytes(2, "big"), 64))
            for _ in range(size):
                guest.rx.add_chain(writable=[1526], publish=False)
            start = time.perf_counter()
            guest.rx.publish()
            guest.context.kick(0)
            target = (round_ + 1) * size & 0xFFFF
            with trio.fail_after(10):
                while guest.rx.used_idx != target:
                    await trio.lowlevel.checkpoint()
            rx_time += time.perf_counter() - start
            guest.rx.used()
    frames = rounds * size
    assert device.stats.tx_frames == frames and device.stats.rx_frames == frames
    figure("virtio-net TX 64-byte frames/s (tap)", f"{frames / tx_time:.0f}")
    figure("virtio-net RX 64-byte frames/s (tap)", f"{frames / rx_time:.0f}")


# -- a socket pair for a tap --------------------------------------------------------------


class FakeTap:
    """A tap stand-in: a datagram socket (one frame per read/write), non-blocking."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.fd = sock.fileno()
        self.name = "fake-tap"
