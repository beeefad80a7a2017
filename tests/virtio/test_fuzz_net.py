"""virtio-net against a hostile driver (see fuzz_support for what every episode checks),
with frames arriving from the wire while it runs. A datagram socket pair stands in for
the tap (one frame per read or write, behind the 12-byte virtio-net header), so this
runs without root.

The device's own checks: the wire gets exactly the frames of the transmit chains the
device took, with a zero header, in order (frames of a size the device must not send are
dropped); the receive buffers get whole frames from the wire, in order, behind a header
that counts the buffers; after a reset one frame goes out and one comes in correctly,
spread over several buffers when MRG_RXBUF was negotiated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence

import pytest

from avmm.virtio import net_fast
from avmm.virtio.device import DeviceNeedsReset
from avmm.virtio.net import (
    MAX_FRAME_SIZE,
    NET_HEADER,
    NET_HEADER_SIZE,
    OFFLOAD_FEATURES,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
    NetDevice,
)

from .fuzz_chains import (
    READABLE,
    WRITABLE,
    Planned,
    Request,
    split,
    split_length,
)
from .fuzz_support import (
    HOSTILE_TARGET,
    FuzzGuest,
    FuzzTarget,
    Round,
    fuzz,
    new_round,
    quiet_logs,
    run_until_idle,
    well_formed_round,
)

EPISODES = 2100
RECEIVE, TRANSMIT = 0, 1
MAC = bytes.fromhex("02aa00000001")
MIN_FRAME = 14
#: virtio_net_hdr values (virtio 1.2 §5.1.6), written out here as the reference has them.
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
#: Where num_buffers starts in the header.
NUM_BUFFERS = 10
#: Without MRG_RXBUF (and no offloads) receive buffers should hold this (§5.1.6.3.1).
FULL_BUFFER = NET_HEADER_SIZE + 1514

SHORT_FRAME = "frame shorter than an Ethernet header"
LONG_FRAME = "frame over the largest size"
OFFLOAD_HEADER = "header asks for offloads never negotiated"
SMALL_BUFFER = "receive buffer under 1526 bytes"
TINY_BUFFER = "receive buffer under the header size"


class SocketTap:
    """The tap's place: one end of a datagram socket pair, non-blocking."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.fd = sock.fileno()
        self.name = "fuzz-tap"


def frame(rng: random.Random, size: int | None = None) -> bytes:
    return rng.randbytes(rng.randint(MIN_FRAME, 1514) if size is None else size)


def drain(sock: socket.socket) -> list[bytes]:
    messages = []
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(sock.recv(1 << 17))
    return messages


def offload_header(rng: random.Random, features: int) -> bytes:
    """A transmit header a driver with ``features`` may send: zeros, or a checksum
    request and a segmentation it negotiated."""
    csum = features & VIRTIO_NET_F_CSUM
    if not csum or rng.random() < 0.3:
        return bytes(NET_HEADER_SIZE)
    gso = [GSO_NONE]
    if features & VIRTIO_NET_F_HOST_TSO4:
        gso.append(GSO_TCPV4)
    if features & VIRTIO_NET_F_HOST_TSO6:
        gso.append(GSO_TCPV6)
    return NET_HEADER.pack(NEEDS_CSUM, rng.choice(gso), *(rng.getrandbits(16)
                                                           for _ in range(4)), 0)


def expected_header(guest: bytes, features: int) -> bytes | None:
    """What the wire must get in front of a frame whose driver wrote ``guest`` (the
    reference for avmm.virtio.net.transmit_header, written by field): zeros without
    CSUM; with it, the checksum fields if NEEDS_CSUM is set, the segmentation fields
    for a GSO type negotiated (HOST_TSO4/6, counted only with CSUM); None (dropped)
    for any other GSO type."""
    if not features & VIRTIO_NET_F_CSUM:
        return bytes(NET_HEADER_SIZE)
    flags, gso, hdr_len, gso_size, csum_start, csum_offset, _ = NET_HEADER.unpack(guest)
    allowed = {GSO_NONE}
    if features & VIRTIO_NET_F_HOST_TSO4:
        allowed.add(GSO_TCPV4)
    if features & VIRTIO_NET_F_HOST_TSO6:
        allowed.add(GSO_TCPV6)
    if gso not in allowed:
        return None
    wants_csum = flags & NEEDS_CSUM
    return NET_HEADER.pack(
        NEEDS_CSUM if wants_csum else 0, gso,
        hdr_len if gso != GSO_NONE else 0, gso_size if gso != GSO_NONE else 0,
        csum_start if wants_csum else 0, csum_offset if wants_csum else 0, 0)


class NetTarget(FuzzTarget):
    name = "net"
    roles = (WRITABLE, READABLE)
    drained = frozenset({TRANSMIT})
    queue_max_sizes = NetDevice.queue_max_sizes

    def __init__(self, device_end: socket.socket, wire: socket.socket) -> None:
        self.device_end = device_end
        self.wire = wire
        wire.setblocking(False)
        self.device = NetDevice(SocketTap(device_end), mac=MAC)
        self.injected: list[tuple[bytes, bytes]] = []

    def features(self, rng: random.Random) -> int:
        # Offloads: none, all, or any subset (one without the feature it depends on
        # must count for nothing).
        offloads = rng.choice((0, OFFLOAD_FEATURES, OFFLOAD_FEATURES & rng.getrandbits(16)))
        return rng.choice((0, VIRTIO_NET_F_MRG_RXBUF)) | offloads

    def well_formed(self, rng: random.Random, queue: int, features: int) -> Request:
        if queue == RECEIVE:
            low = NET_HEADER_SIZE if features & VIRTIO_NET_F_MRG_RXBUF else FULL_BUFFER
            return Request([], split_length(rng, rng.randint(low, low + 2048)))
        return Request(split(rng, offload_header(rng, features) + frame(rng)), [])

    def content_hostile(self, rng: random.Random, queue: int, features: int,
                        final: bool) -> Request | None:
        mergeable = features & VIRTIO_NET_F_MRG_RXBUF
        if queue == RECEIVE:
            if final and mergeable:
                return Request([], split_length(rng, rng.randint(1, NET_HEADER_SIZE - 1)),
                               TINY_BUFFER)
            if not mergeable:
                return Request([], split_length(rng, rng.randint(1, FULL_BUFFER - 1)),
                               SMALL_BUFFER)
            return None
        roll = rng.random()
        if roll < 0.45:
            data = rng.randbytes(rng.randint(1, NET_HEADER_SIZE + MIN_FRAME - 1))
            return Request(split(rng, data), [], SHORT_FRAME)
        if roll < 0.55:
            data = bytes(NET_HEADER_SIZE) + frame(rng, rng.randint(MAX_FRAME_SIZE + 1,
                                                                   MAX_FRAME_SIZE + 600))
            return Request(split(rng, data), [], LONG_FRAME)
        header = NET_HEADER.pack(rng.choice((1, 2, 3)), rng.choice((1, 3, 4, 5, 0x80)),
                                 *(rng.getrandbits(16) for _ in range(5)))
        return Request(split(rng, header + frame(rng)), [], OFFLOAD_HEADER)

    def stops(self, queue: int, plan: Planned, features: int) -> bool:
        if queue == TRANSMIT:
            return bool(plan.writable)
        return bool(plan.readable) or bool(
            features & VIRTIO_NET_F_MRG_RXBUF and plan.writable_length < NET_HEADER_SIZE)

    def begin(self, round_: Round) -> list[Callable[[], Awaitable[object]]]:
        rng = round_.rng
        self.injected = []
        self._inject(rng, max(0, min(8, len(round_.writers[RECEIVE].plans) +
                                     rng.randint(-1, 1))))
        return []

    def _inject(self, rng: random.Random, count: int) -> None:
        """``count`` frames from the wire, of any size (some too short or too long)."""
        for _ in range(count):
            roll = rng.random()
            size = (rng.randint(0, MIN_FRAME - 1) if roll < 0.05
                    else rng.randint(1515, 9000) if roll < 0.15 else None)
            data = frame(rng, size)
            # What the tap's kernel side puts in front: the guest sees its offload
            # fields only if it negotiated GUEST_CSUM (received_frames checks which).
            header = rng.randbytes(NET_HEADER_SIZE)
            self.wire.send(header + data)
            self.injected.append((header[:NUM_BUFFERS], data))

    def more(self, round_: Round) -> list[Callable[[], Awaitable[object]]] | None:
        # The driver rewrites the descriptors of the receive buffers the device holds;
        # frames arriving then must still go where the device found them first.
        rng = round_.rng
        if rng.random() < 0.5 or not round_.rewrite_in_flight(RECEIVE):
            return None
        self._inject(rng, rng.randint(1, 3))
        return []

    async def serve(self, round_: Round, tasks: Sequence[Callable[[], Awaitable[object]]]
                    ) -> DeviceNeedsReset | None:
        return await run_until_idle(self.device, round_.context, tasks)

    def check(self, round_: Round, error: DeviceNeedsReset | None) -> None:
        sent = []
        for p in round_.reached(TRANSMIT):
            if p.stops or not MIN_FRAME <= p.readable_length - NET_HEADER_SIZE <= MAX_FRAME_SIZE:
                continue
            data = p.readable_bytes(round_.snapshot)
            header = expected_header(data[:NET_HEADER_SIZE], round_.features)
            if header is not None:
                sent.append(header + data[NET_HEADER_SIZE:])
        assert drain(self.wire) == sent, "the wire did not get the frames sent"
        received = round_.reached(RECEIVE)
        if any(p.unreliable for p in received):
            return
        kept = round_.features & VIRTIO_NET_F_GUEST_CSUM
        frames = iter((header if kept else bytes(NUM_BUFFERS)) + data
                      for header, data in self.injected)
        for got in received_frames(round_, received, round_.features):
            # Frames too big for the buffers are dropped; the rest arrive in order.
            assert any(got == data for data in frames), "a received frame is not the next sent"

    def reset(self) -> None:
        self.device.reset()

    async def check_after_reset(self, guest: FuzzGuest, rng: random.Random) -> None:
        drain(self.device_end)
        drain(self.wire)
        round_ = new_round(self, guest, rng, sizes=(16, 32))
        mergeable = round_.features & VIRTIO_NET_F_MRG_RXBUF
        incoming, outgoing = frame(rng), frame(rng)
        if mergeable:
            # Several small buffers, so the frame is spread over them.
            buffers, total = [], 0
            while total < NET_HEADER_SIZE + len(incoming):
                buffers.append([rng.randint(200, 600)])
                total += buffers[-1][0]
        else:
            buffers = [split_length(rng, FULL_BUFFER)]
        requests = [(RECEIVE, Request([], sizes)) for sizes in buffers]
        requests.append((TRANSMIT, Request(split(rng, bytes(NET_HEADER_SIZE) + outgoing), [])))
        header = rng.randbytes(NET_HEADER_SIZE)
        self.wire.send(header + incoming)
        plans = await well_formed_round(self, round_, requests)
        assert drain(self.wire) == [bytes(NET_HEADER_SIZE) + outgoing]
        kept = round_.features & VIRTIO_NET_F_GUEST_CSUM
        assert received_frames(round_, plans[:-1], round_.features) == [
            (header[:NUM_BUFFERS] if kept else bytes(NUM_BUFFERS)) + incoming]


def received_frames(round_: Round, plans: Sequence[Planned], features: int) -> list[bytes]:
    """The frames the device returned on the receive queue, each checked for its header
    (``num_buffers`` the used entries it took; the rest zeros, unless the driver took
    offloads) and returned behind the header's first 10 bytes (the kernel's, which the
    device passes on with GUEST_CSUM; zeros without)."""
    by_head = {p.head: p for p in plans}
    pushes = round_.guest.queues[RECEIVE].pushes
    memory = round_.memory.data
    frames = []
    index = 0
    while index < len(pushes):
        head, written = pushes[index]
        first = by_head[head].writable_bytes(memory, written)
        count = NET_HEADER.unpack_from(first)[-1]
        assert count == 1 or (features & VIRTIO_NET_F_MRG_RXBUF and
                              index + count <= len(pushes)), f"num_buffers {count}"
        data = first + b"".join(by_head[h].writable_bytes(memory, n)
                                for h, n in pushes[index + 1:index + count])
        assert data[NUM_BUFFERS:NET_HEADER_SIZE] == struct.pack("<H", count)
        if not features & VIRTIO_NET_F_GUEST_CSUM:
            assert data[:NUM_BUFFERS] == bytes(NUM_BUFFERS)
        frames.append(data[:NUM_BUFFERS] + data[NET_HEADER_SIZE:])
        index += count
    return frames


@pytest.fixture
def socket_pair() -> object:
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pair[0], pair[1]:
        yield pair


def test_hostile_driver(socket_pair: tuple[socket.socket, socket.socket],
                        fuzz_report: Callable[[str], None]) -> None:
    """At least 10,000 ring- and descriptor-level hostile chains on the receive and
    transmit queues while frames arrive: the device only ever stops with
    DeviceNeedsReset where it must, sends and receives exactly the frames it should,
    never writes outside the writable buffers it was given, and works after each reset."""
    quiet_logs()
    tally = fuzz(NetTarget(*socket_pair), EPISODES)
    fuzz_report(tally.line())
    assert tally.hostile >= HOSTILE_TARGET, tally.line()


class OutcomeNetTarget(NetTarget):
    """A NetTarget that records what each round gave the guest: the used entries of both
    queues, the frames received (headers checked by received_frames), the chains refused,
    the error and the device's counters (what went to the wire, NetTarget.check compares
    with the reference). Frames arrive only at the start of a round: NetTarget's more()
    adds some only while the device holds receive buffers, and the Python loop holds one
    before it reads the tap where the C loop takes one only with a frame for it. Left
    out for the same reason: which chains are held when the round ends (they go back
    untouched, VirtQueue.give_back), and the notification hints (used flags,
    avail_event), which follow from it."""

    def __init__(self, device_end: socket.socket, wire: socket.socket) -> None:
        super().__init__(device_end, wire)
        self.outcomes: list[tuple[object, ...]] = []
        self._counted = dataclasses.astuple(self.device.stats)

    def more(self, round_: Round) -> list[Callable[[], Awaitable[object]]] | None:
        return None

    def check(self, round_: Round, error: DeviceNeedsReset | None) -> None:
        queues = round_.guest.queues
        received = round_.reached(RECEIVE)
        frames = (None if any(p.unreliable for p in received)
                  else received_frames(round_, received, round_.features))
        self.outcomes.append((
            [list(queues[i].pushes) for i in (0, 1)],
            [list(queues[i].refused) for i in (0, 1)],
            frames,
            None if error is None else str(error),
            # This round's counts.
            tuple(now - before for now, before in zip(
                dataclasses.astuple(self.device.stats), self._counted, strict=True)),
        ))
        self._counted = dataclasses.astuple(self.device.stats)
        super().check(round_, error)


@pytest.mark.parametrize("episodes", [1200])
def test_c_and_python_loops_leave_identical_rings(episodes: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The C inner loops (avmm.virtio.net_fast) and the Python ones, on the same hostile
    episodes (same seeds, same frames from the wire): every round ends with the same
    used entries, the same frames in the guest's buffers, the same chains refused, the
    same error and the same counters (a round that ends in an error: the same error,
    at the same chain)."""
    quiet_logs()
    if net_fast._net_ffi is None:
        pytest.fail("avmm.virtio._net_ffi is not built (run make venv)")
    outcomes = {}
    for enabled in (True, False):
        monkeypatch.setattr(net_fast, "ENABLED", enabled)
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with pair[0], pair[1]:
            target = OutcomeNetTarget(*pair)
            assert (target.device._fast_rx is not None) == enabled
            fuzz(target, episodes)
        outcomes[enabled] = target.outcomes
    assert len(outcomes[True]) == len(outcomes[False]) >= episodes
    clean = 0
    for index, (c, python) in enumerate(zip(outcomes[True], outcomes[False], strict=True)):
        if c[3] is None and python[3] is None:
            clean += 1
        else:
            # A protocol error cancels the other queue's task: how far that one got
            # first is trio's scheduling, which the loops' different yields change.
            # The error itself, and where the driver broke the rules, are the same.
            c, python = c[1:2] + c[3:4], python[1:2] + python[3:4]
        assert c == python, f"round {index}: the C loop left {c}, the Python loop {python}"
    assert clean >= episodes // 20, f"only {clean} rounds ended without an error"
