"""virtio-net under TX and RX rate limiters, on a socket pair standing in for the tap:
every frame arrives, in order, and the limiters' accounting matches the frames; elapsed
time is checked only as a lower bound that noise can only make larger."""

from __future__ import annotations

import socket
import time

import trio
import trio.testing

from avmm.ratelimit import (
    LIMITER_WAIT_SLICE_S,
    BucketConfig,
    RateLimitConfig,
    RateLimiter,
    Throttle,
)
from avmm.virtio.net import MAX_FRAME_SIZE, NET_HEADER_SIZE, NetDevice
from tests.virtio.test_net import MAC, FakeTap, Guest, frame, running, until


def throttle(**buckets: BucketConfig) -> Throttle:
    return Throttle(RateLimiter(RateLimitConfig(**buckets)))


async def test_tx_frames_go_out_at_the_limited_rate_in_order() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        device = NetDevice(FakeTap(a), mac=MAC)
        device.tx_throttle = limit = throttle(ops=BucketConfig(size=1, refill_ms=20))
        frames = [frame(bytes([i]) * 10, 60 + i) for i in range(5)]
        start = time.monotonic()
        async with running(device, guest.context):
            for data in frames:
                guest.send(data)
            await until(lambda: guest.tx.used_idx == len(frames), timeout=30)
        elapsed = time.monotonic() - start
        received = [b.recv(2048)[NET_HEADER_SIZE:] for _ in frames]
    assert received == frames
    assert limit.admitted_ops == 5
    assert limit.admitted_bytes == sum(len(f) for f in frames)
    assert limit.throttled == 4
    assert elapsed >= 4 * 0.020
    assert device.stats.tx_frames == 5


async def test_rx_frames_are_read_only_while_the_limiter_has_room() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        device = NetDevice(FakeTap(a), mac=MAC)
        device.rx_throttle = limit = throttle(ops=BucketConfig(size=1, refill_ms=20))
        frames = [frame(bytes([i]) * 10, 70 + i) for i in range(5)]
        start = time.monotonic()
        async with running(device, guest.context):
            heads = guest.give_buffers(*[1600] * len(frames))
            for data in frames:
                b.send(bytes(NET_HEADER_SIZE) + data)
            await until(lambda: guest.rx.used_idx == len(frames), timeout=30)
        elapsed = time.monotonic() - start
    got = [guest.rx.writable_data(h, NET_HEADER_SIZE + len(f))[NET_HEADER_SIZE:]
           for h, f in zip(heads, frames, strict=True)]
    assert got == frames
    assert (limit.admitted_ops, limit.admitted_bytes) == (5, sum(len(f) for f in frames))
    assert elapsed >= 4 * 0.020
    assert limit.wait_ns["ops"] > 0


async def test_rx_bandwidth_runs_into_debt_by_one_frame_and_waits_it_off() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        device = NetDevice(FakeTap(a), mac=MAC)
        # 60 bytes per 100 ms = 600 B/s; frames of 100 bytes.
        device.rx_throttle = limit = throttle(bandwidth=BucketConfig(size=60, refill_ms=100))
        frames = [frame(bytes([i]), 100) for i in range(3)]
        start = time.monotonic()
        async with running(device, guest.context):
            guest.give_buffers(*[1600] * len(frames))
            for data in frames:
                b.send(bytes(NET_HEADER_SIZE) + data)
            await until(lambda: guest.rx.used_idx == len(frames), timeout=30)
        elapsed = time.monotonic() - start
    # Frame 1 at once (level 60 -> -40); frame 2 once 41 bytes are back (68.3 ms;
    # level 1 -> -99), frame 3 once 100 more are (166.7 ms).
    assert elapsed >= (41 + 100) / 600
    assert limit.admitted_bytes == 300 and limit.throttled == 2
    assert limit.wait_ns["bandwidth"] >= int((41 + 100) / 600 * 1e9) - 2_000_000
    assert limit.wait_ns["ops"] == 0


async def test_a_stop_forgets_the_held_tx_chain_and_the_queue_gives_it_back() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        device = NetDevice(FakeTap(a), mac=MAC)
        device.tx_throttle = throttle(ops=BucketConfig(size=1, refill_ms=60_000))
        async with running(device, guest.context):
            guest.send(frame(b"one"))
            guest.send(frame(b"two"))
            await until(lambda: guest.tx.used_idx == 1)
            await trio.sleep(0.02)
        queue = guest.context.queues[1]
        assert queue is not None and queue.held == 1
        assert device._tx_held is None
        assert queue.give_back(guest.memory) == (1, 0)


async def test_a_frame_dropped_for_its_size_costs_the_limiter_nothing() -> None:
    """An oversized transmit chain is dropped without being charged: a guest must not
    be able to drive its limiter (or a group shared with other VMs) into debt with
    frames that never go out. The next frame goes out at once."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest(memory_size=1 << 22)
        device = NetDevice(FakeTap(a), mac=MAC)
        device.tx_throttle = limit = throttle(
            bandwidth=BucketConfig(size=4096, refill_ms=60_000))
        good = frame(b"after", 100)
        async with running(device, guest.context):
            guest.send(frame(b"huge", MAX_FRAME_SIZE + 1))
            guest.send(good)
            await until(lambda: guest.tx.used_idx == 2, timeout=30)
        received = b.recv(2048)[NET_HEADER_SIZE:]
    assert received == good
    assert (limit.admitted_ops, limit.admitted_bytes, limit.throttled) == (1, len(good), 0)
    assert device.stats.tx_dropped == 1


def _virtual_ns() -> int:
    return int(trio.current_time() * 1e9)


async def test_a_changed_limit_reaches_a_held_frame_within_one_wait_slice(
        autojump_clock: trio.testing.MockClock) -> None:
    """PATCH's promise, on virtual time: a frame held by a limit of one frame per ten
    minutes goes out at most LIMITER_WAIT_SLICE_S after the limit is widened (the
    limiter is swapped as a PATCH swaps it), and again after the limit is removed;
    never at the old limit's pace."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        device = NetDevice(FakeTap(a), mac=MAC)
        slow = RateLimitConfig(ops=BucketConfig(size=1, refill_ms=600_000))
        device.tx_throttle = limit = Throttle(RateLimiter(slow, clock=_virtual_ns))
        frames = [frame(bytes([i]) * 10, 60 + i) for i in range(3)]
        async with running(device, guest.context):
            for data in frames:
                guest.send(data)
            await until(lambda: guest.tx.used_idx == 1, timeout=5)
            await trio.sleep(30)  # held: the old limit would free one in ten minutes
            assert guest.tx.used_idx == 1
            widened = trio.current_time()
            limit.limiter = RateLimiter(RateLimitConfig(
                ops=BucketConfig(size=1, refill_ms=1)), clock=_virtual_ns)
            await until(lambda: guest.tx.used_idx == 2, timeout=5)
            assert trio.current_time() - widened <= LIMITER_WAIT_SLICE_S + 0.01
            # The third frame: held again by a slow limit, then the limit is taken off.
            limit.limiter = RateLimiter(slow, clock=_virtual_ns)
            await trio.sleep(30)
            removed = trio.current_time()
            device.tx_throttle = None
            limit.unblock()
            await until(lambda: guest.tx.used_idx == 3, timeout=5)
            assert trio.current_time() - removed <= LIMITER_WAIT_SLICE_S + 0.01
        received = [b.recv(2048)[NET_HEADER_SIZE:] for _ in frames]
    assert received == frames
