"""virtio-net's batched data path: many chains per wake-up, in ring order, each frame
exactly once, one interrupt per batch, and a tap that is full or empty mid-batch.

A datagram socket pair stands in for the tap (one frame per read or write, and the
writer blocks while the reader's queue is full), so these tests need neither root nor
/dev/net/tun. The plumbing (Guest, FakeTap, frame) is test_net.py's.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from avmm.virtio.net import NET_HEADER_SIZE, VIRTIO_NET_F_MRG_RXBUF, NetDevice

from .test_net import HEADER, MAC, FakeTap, Guest, frame, running, until

RX, TX = 0, 1
#: Every test on both inner loops (C and Python; tests/virtio/inner_loops.py).
pytestmark = pytest.mark.usefixtures("net_path")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the device's end, the host's end) of a datagram socket pair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.setblocking(False)
        yield a, b


def received(host: socket.socket) -> list[bytes]:
    """Everything the device sent so far."""
    out = []
    while True:
        try:
            out.append(host.recv(1 << 17))
        except BlockingIOError:
            return out


# -- transmit ----------------------------------------------------------------------------


async def test_one_kick_sends_every_layout_in_ring_order(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """One batch mixing the usual one-buffer chains with split ones and frames of bad
    sizes: every chain comes back in ring order, the good frames leave in that order
    behind a zero header, and the driver is signalled once."""
    device_end, host = pair
    guest = Guest(2, 64, memory_size=1 << 21)
    device = NetDevice(FakeTap(device_end), mac=MAC)
    bogus = HEADER.pack(1, 4, 54, 1448, 34, 16, 0)  # NEEDS_CSUM, TSO: not negotiated
    expected = []
    heads = []
    async with running(device, guest.context):
        await trio.testing.wait_all_tasks_blocked()
        signals_before = guest.context.signals.count(TX)
        for i in range(40):
            data = frame(bytes([i]) * 8, 60 + i)
            if i % 10 == 3:
                # Header and frame split across three buffers.
                whole = bogus + data
                parts = [whole[:5], whole[5:30], whole[30:]]
                heads.append(guest.tx.add_chain(parts, publish=False))
                expected.append(data)
            elif i % 10 == 7:
                heads.append(guest.tx.add_chain([bogus + b"\x01" * 10], publish=False))
            else:
                heads.append(guest.tx.add_chain([bogus + data], publish=False))
                expected.append(data)
        guest.tx.publish()
        guest.context.kick(TX)
        await until(lambda: guest.tx.used_idx == 40)
        await trio.testing.wait_all_tasks_blocked()
        assert guest.context.signals.count(TX) == signals_before + 1
    assert guest.tx.used() == [(head, 0) for head in heads]
    sent = received(host)
    assert [data[NET_HEADER_SIZE:] for data in sent] == expected
    assert all(data[:NET_HEADER_SIZE] == bytes(NET_HEADER_SIZE) for data in sent)
    assert device.stats.tx_frames == len(expected)
    assert device.stats.tx_bytes == sum(len(data) for data in expected)
    assert device.stats.tx_dropped == 40 - len(expected)


async def test_full_tap_holds_the_batch_and_loses_nothing(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """When the tap stops taking frames mid-batch, what was sent goes back to the driver
    at once, the device waits, and the rest follows in order once there is room."""
    device_end, host = pair
    device_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    count = 200
    guest = Guest(2, 256, memory_size=1 << 22)
    device = NetDevice(FakeTap(device_end), mac=MAC)
    frames = [frame(i.to_bytes(2, "big"), 1000) for i in range(count)]
    async with running(device, guest.context):
        await trio.testing.wait_all_tasks_blocked()
        heads = [guest.tx.add_chain([bytes(NET_HEADER_SIZE) + data], publish=False)
                 for data in frames]
        guest.tx.publish()
        guest.context.kick(TX)
        await trio.testing.wait_all_tasks_blocked()
        # The host reads nothing yet: the device is stuck part way, and has handed
        # back (and signalled) what it sent.
        stuck_at = guest.tx.used_idx
        assert 0 < stuck_at < count
        assert TX in guest.context.signals
        assert device.stats.tx_frames == stuck_at
        sent: list[bytes] = []
        with trio.fail_after(10):
            while len(sent) < count:
                sent += received(host)
                await trio.sleep(0.001)
        await until(lambda: guest.tx.used_idx == count)
    assert guest.tx.used() == [(head, 0) for head in heads]
    assert [data[NET_HEADER_SIZE:] for data in sent] == frames
    assert device.stats.tx_frames == count and device.stats.tx_dropped == 0


# -- receive -----------------------------------------------------------------------------


async def test_waiting_frames_of_every_kind_arrive_in_one_batch(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Frames that fit one buffer (the short path), one that spreads over three (the
    general one, MRG_RXBUF) and one too short to be a frame, all waiting in the tap:
    the guest gets the good ones in order with the right headers, in one batch."""
    device_end, host = pair
    guest = Guest(2, 64, features=VIRTIO_NET_F_MRG_RXBUF)
    device = NetDevice(FakeTap(device_end), mac=MAC)
    small = [frame(bytes([i]) * 4, 64 + i) for i in range(3)]
    big = frame(b"big" * 400, 1514)
    async with running(device, guest.context):
        await trio.testing.wait_all_tasks_blocked()
        for data in (small[0], big, b"\x05" * 13, small[1], small[2]):
            host.send(bytes(NET_HEADER_SIZE) + data)
        heads = guest.give_buffers(*[600] * 8)
        await until(lambda: guest.rx.used_idx == 6)
        await trio.testing.wait_all_tasks_blocked()
        assert guest.context.signals.count(RX) == 1
    used = guest.rx.used()
    # In ring order: small[0] in the first buffer, big in the next three, then (the
    # runt dropped, its buffer kept) small[1] and small[2].
    assert [head for head, _ in used] == heads[:6]
    assert [length for _, length in used] == [
        NET_HEADER_SIZE + len(small[0]), 600, 600, NET_HEADER_SIZE + len(big) - 1200,
        NET_HEADER_SIZE + len(small[1]), NET_HEADER_SIZE + len(small[2])]
    data = [guest.rx.writable_data(head, length) for head, length in used]
    assert HEADER.unpack(data[0][:NET_HEADER_SIZE]) == (0, 0, 0, 0, 0, 0, 1)
    assert data[0][NET_HEADER_SIZE:] == small[0]
    merged = b"".join(data[1:4])
    assert HEADER.unpack(merged[:NET_HEADER_SIZE]) == (0, 0, 0, 0, 0, 0, 3)
    assert merged[NET_HEADER_SIZE:] == big
    for chunk, expected in zip(data[4:], small[1:], strict=True):
        assert HEADER.unpack(chunk[:NET_HEADER_SIZE]) == (0, 0, 0, 0, 0, 0, 1)
        assert chunk[NET_HEADER_SIZE:] == expected
    assert device.stats.rx_frames == 4 and device.stats.rx_dropped == 1
    assert device.stats.rx_bytes == sum(map(len, small)) + len(big)


async def test_a_long_backlog_is_taken_in_bounded_batches(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """More frames waiting than one batch takes: all arrive in order, and the driver
    hears about them batch by batch (more than one interrupt), not only at the end."""
    device_end, host = pair
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    count = 200
    guest = Guest(2, 256, memory_size=1 << 22)
    device = NetDevice(FakeTap(device_end), mac=MAC)
    frames = [frame(i.to_bytes(2, "big"), 60) for i in range(count)]
    async with running(device, guest.context):
        await trio.testing.wait_all_tasks_blocked()
        for data in frames:
            host.send(bytes(NET_HEADER_SIZE) + data)
        heads = guest.give_buffers(*[200] * count)
        await until(lambda: guest.rx.used_idx == count)
        assert guest.context.signals.count(RX) >= 2
    used = guest.rx.used()
    assert [head for head, _ in used] == heads
    assert [guest.rx.writable_data(head, length)[NET_HEADER_SIZE:]
            for head, length in used] == frames
    assert device.stats.rx_frames == count


async def test_frames_after_an_idle_tap_are_still_received(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A batch that found the tap empty waits for it: a frame that comes later, while
    the device holds buffers, is delivered without a kick."""
    device_end, host = pair
    guest = Guest()
    device = NetDevice(FakeTap(device_end), mac=MAC)
    first, later = frame(b"first"), frame(b"later")
    async with running(device, guest.context):
        heads = guest.give_buffers(1526, 1526)
        host.send(bytes(NET_HEADER_SIZE) + first)
        await until(lambda: guest.rx.used_idx == 1)
        await trio.testing.wait_all_tasks_blocked()
        host.send(bytes(NET_HEADER_SIZE) + later)
        await until(lambda: guest.rx.used_idx == 2)
    used = guest.rx.used()
    assert [head for head, _ in used] == heads
    assert [guest.rx.writable_data(head, length)[NET_HEADER_SIZE:]
            for head, length in used] == [first, later]
