"""virtio-blk under a rate limiter: which chains a batch takes (fake clock), and the whole
device on both of its loops (trio task, I/O thread) with a real clock, checked by its
accounting and by a lower bound on elapsed time that noise can only make larger."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from avmm.ratelimit import BucketConfig, RateLimitConfig, RateLimiter, Throttle
from avmm.virtio.blk import VIRTIO_BLK_F_FLUSH, BlockDevice, RequestType, Status
from tests.virtio.queue_helpers import make_queue
from tests.virtio.test_blk import (
    IMAGE_SIZE,
    SECTOR,
    FakeContext,
    header,
    make_image,
    pattern,
    status_of,
)
from tests.virtio.test_blk_thread import EventfdContext

from .test_bucket import MS, FakeClock

IN, OUT, FLUSH = RequestType.IN, RequestType.OUT, RequestType.FLUSH


@pytest.fixture
def device(tmp_path: Path):
    with BlockDevice(make_image(tmp_path / "disk.img")) as device:
        yield device


def test_a_batch_stops_at_the_first_refused_chain_and_holds_it(device: BlockDevice) -> None:
    clock = FakeClock()
    throttle = Throttle(RateLimiter(RateLimitConfig(
        ops=BucketConfig(size=2, refill_ms=100),
        bandwidth=BucketConfig(size=4 * SECTOR, refill_ms=1000)), clock=clock))
    device.throttle = throttle
    queue, driver = make_queue(size=16)
    heads = [driver.add_chain(readable=[header(IN, i)], writable=[SECTOR + 1])
             for i in range(3)]
    flush = driver.add_chain(readable=[header(FLUSH)], writable=[1])
    memory = driver.memory

    batch = device.take_batch(queue, memory)
    assert [c.head for c in batch.chains] == heads[:2]
    assert batch.deferred is not None and batch.deferred.head == heads[2]
    assert batch.wait_ns == 50 * MS  # one op at 2 per 100 ms
    assert device.finish_batch(queue, memory, batch,
                               device.process_batch(memory, batch), lambda _: None)
    assert driver.used_idx == 2

    # Asked again too early: still held, nothing taken.
    clock.at_ms(49)
    again = device.take_batch(queue, memory, batch.deferred)
    assert again.chains == [] and again.deferred is batch.deferred
    # Ops are back, but 2 sectors of bandwidth are gone (4 per second): the held read
    # is admitted, the flush (no bytes, one op) too.
    clock.at_ms(100)
    last = device.take_batch(queue, memory, again.deferred)
    assert [c.head for c in last.chains] == [heads[2], flush]
    assert last.deferred is None
    device.complete_batch(queue, memory, device.process_batch(memory, last))
    assert [status_of(driver, h) for h in [*heads, flush]] == [Status.OK] * 4
    assert (throttle.admitted_ops, throttle.admitted_bytes) == (4, 3 * SECTOR)
    assert throttle.throttled == 1
    assert throttle.wait_ns == {"ops": 100 * MS, "bandwidth": 0}


def test_unlimited_takes_the_held_chain_first(device: BlockDevice) -> None:
    queue, driver = make_queue(size=16)
    memory = driver.memory
    first = driver.add_chain(readable=[header(IN, 0)], writable=[SECTOR + 1])
    second = driver.add_chain(readable=[header(IN, 1)], writable=[SECTOR + 1])
    held = queue.pop(memory)
    batch = device.take_batch(queue, memory, held)
    assert [c.head for c in batch.chains] == [first, second]


async def run_limited(device: BlockDevice, context, driver, count: int) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            if hasattr(context, "kick"):
                context.kick()
            while driver.used_idx != count:
                await trio.sleep(0.002)
            nursery.cancel_scope.cancel()
    return time.monotonic() - start


@pytest.mark.parametrize("loop", ["trio", "io-thread"])
async def test_the_device_serves_every_request_at_the_limited_rate(
        device: BlockDevice, loop: str) -> None:
    # 1 op per 25 ms, no burst: N requests need at least (N - 1) x 25 ms.
    count = 6
    throttle = Throttle(RateLimiter(RateLimitConfig(ops=BucketConfig(size=1, refill_ms=25))))
    device.throttle = throttle
    queue, driver = make_queue(size=16)
    heads = [driver.add_chain(readable=[header(IN, i)], writable=[SECTOR + 1])
             for i in range(count)]
    context = (FakeContext(driver, queue, VIRTIO_BLK_F_FLUSH) if loop == "trio"
               else EventfdContext(driver, queue, VIRTIO_BLK_F_FLUSH))
    try:
        elapsed = await run_limited(device, context, driver, count)
    finally:
        if loop == "io-thread":
            context.close()
    assert [h for h, _ in driver.used()] == heads
    for i, head in enumerate(heads):
        assert status_of(driver, head) == Status.OK
        assert driver.writable_data(head, SECTOR) == \
            pattern(IMAGE_SIZE)[i * SECTOR:(i + 1) * SECTOR]
    assert (throttle.admitted_ops, throttle.admitted_bytes) == (count, count * SECTOR)
    assert device.stats.reads == count
    # Every request after the first waited for its op; none was admitted early.
    assert throttle.throttled == count - 1
    assert elapsed >= (count - 1) * 0.025
    assert throttle.wait_ns["ops"] >= (count - 1) * 25 * MS - count * MS
    assert throttle.wait_ns["bandwidth"] == 0


async def test_a_stop_while_held_gives_the_chain_back_untouched(device: BlockDevice) -> None:
    throttle = Throttle(RateLimiter(RateLimitConfig(ops=BucketConfig(size=1,
                                                                     refill_ms=60_000))))
    device.throttle = throttle
    queue, driver = make_queue(size=16)
    first = driver.add_chain(readable=[header(OUT, 0), b"\x55" * SECTOR], writable=[1])
    second = driver.add_chain(readable=[header(OUT, 1), b"\x66" * SECTOR], writable=[1])
    context = EventfdContext(driver, queue, VIRTIO_BLK_F_FLUSH)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device.run, context)
                while driver.used_idx != 1:
                    await trio.sleep(0.002)
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()  # the I/O thread is in its timed wait
    finally:
        context.close()
    assert driver.used() == [(first, 1)]
    assert queue.held == 1
    assert queue.give_back(driver.memory) == (1, 0)
    assert queue.state.next_available == 1
    assert (device.path.read_bytes()[SECTOR:2 * SECTOR]
            == pattern(IMAGE_SIZE)[SECTOR:2 * SECTOR])
    del second
