"""virtio-blk served by its own I/O thread: what a transport that hands over the kick
eventfd (``context.kick_fd``, as the in-process virtio-mmio slot does) gets. The same
requests as test_blk.py, but kicked through a real eventfd and signalled from the
device's thread. Every test runs on both request loops (tests/virtio/inner_loops.py): the
C one, which this thread uses where it applies, and the Python one."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm.virtio import blk_fast
from avmm.virtio.blk import VIRTIO_BLK_F_FLUSH, BlockDevice, RequestType, Status
from avmm.virtio.device import DeviceNeedsReset
from avmm.virtio.queue import VirtQueue

from .queue_helpers import DriverQueue, make_queue
from .test_blk import IMAGE_SIZE, SECTOR, header, leaves, make_image, pattern, status_of

IN, OUT = RequestType.IN, RequestType.OUT


class EventfdContext:
    """A DeviceContext with a real kick eventfd; ``signal_used`` may be called from any
    thread (it is, from the device's)."""

    def __init__(self, driver: DriverQueue, queue: VirtQueue, features: int) -> None:
        self.memory = driver.memory
        self.queues = [queue]
        self.features = features
        self.kick_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
        self.lock = threading.Lock()
        self.signals: list[tuple[int, str]] = []
        self.kicks: list[int] = []

    def close(self) -> None:
        os.close(self.kick_fds[0])

    def kick_fd(self, queue_index: int) -> int:
        return self.kick_fds[queue_index]

    def kick(self) -> None:
        os.eventfd_write(self.kick_fds[0], 1)

    def kicks_received(self, queue_index: int, count: int) -> None:
        self.kicks.append(count)

    async def wait_kick(self, queue_index: int) -> None:  # pragma: no cover
        raise AssertionError("a context with kick_fd is served by the device's thread")

    def signal_used(self, queue_index: int) -> None:
        with self.lock:
            self.signals.append((queue_index, threading.current_thread().name))

    def signal_config_change(self) -> None:  # pragma: no cover
        pass


@pytest.fixture
def device(blk_path: str, tmp_path: Path):
    with BlockDevice(make_image(tmp_path / "disk.img")) as device:
        yield device


@pytest.fixture
def served():
    queue, driver = make_queue(size=16)
    context = EventfdContext(driver, queue, VIRTIO_BLK_F_FLUSH)
    yield queue, driver, context
    context.close()


async def wait_used(driver: DriverQueue, target: int) -> None:
    while driver.used_idx != target:
        await trio.sleep(0.001)


async def test_requests_are_served_and_signalled_from_the_io_thread(
        device: BlockDevice, served) -> None:
    _, driver, context = served
    # Made available before the device starts: served without a kick.
    first = driver.add_chain(readable=[header(IN, 1)], writable=[SECTOR + 1])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await wait_used(driver, 1)
            assert driver.used() == [(first, SECTOR + 1)]
            for round_ in range(3):
                head = driver.add_chain(readable=[header(OUT, round_ + 4),
                                                  bytes([round_]) * SECTOR], writable=[1])
                context.kick()
                await wait_used(driver, round_ + 2)
                assert driver.used() == [(head, 1)]
            nursery.cancel_scope.cancel()
    assert driver.writable_data(first, SECTOR) == pattern(IMAGE_SIZE)[SECTOR:2 * SECTOR]
    assert [name for _, name in context.signals] == ["avmm blk0 I/O"] * 4
    assert sum(context.kicks) == 3
    assert device.stats.writes == 3 and device.stats.reads == 1
    assert device.stats.bytes_written == 3 * SECTOR and device.stats.bytes_read == SECTOR
    assert not any(t.name == "avmm blk0 I/O" for t in threading.enumerate())


async def test_cancel_during_a_batch_completes_the_batch(
        device: BlockDevice, served, blk_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    queue, driver, context = served
    entered, release = threading.Event(), threading.Event()
    if blk_path == "python":
        real = os.pwritev

        def slow_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
            entered.set()
            release.wait(10)
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", slow_pwritev)
    else:
        # The C loop's pwritev cannot be slowed from here: the whole call is held.
        real_serve = blk_fast.BlockFastPath.serve

        def slow_serve(self: blk_fast.BlockFastPath, *args: Any, **kwargs: Any
                       ) -> blk_fast.FastBatch:
            entered.set()
            release.wait(10)
            return real_serve(self, *args, **kwargs)

        monkeypatch.setattr(blk_fast.BlockFastPath, "serve", slow_serve)
    head = driver.add_chain(readable=[header(OUT, 2), b"\x77" * SECTOR], writable=[1])
    timer = threading.Timer(0.1, release.set)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await trio.to_thread.run_sync(entered.wait, 10)
            nursery.cancel_scope.cancel()
            timer.start()
    timer.join()
    # run() returned only after the batch was done, on the used ring and signalled.
    assert driver.used() == [(head, 1)]
    assert status_of(driver, head) == Status.OK
    assert len(context.signals) == 1
    assert queue.state.next_used == queue.state.next_available == 1


async def test_a_malformed_chain_needs_reset_after_the_good_ones(
        device: BlockDevice, served) -> None:
    _, driver, context = served
    good = driver.add_chain(readable=[header(OUT, 0), b"\x55" * SECTOR], writable=[1])
    driver.add_chain(readable=[header(IN)[:15]], writable=[SECTOR + 1])  # short header
    with trio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
    errors = leaves(info.value)
    assert len(errors) == 1 and isinstance(errors[0], DeviceNeedsReset), errors
    assert driver.used() == [(good, 1)]
    assert len(context.signals) == 1


async def test_an_idle_device_stops_promptly(device: BlockDevice, served) -> None:
    _, _, context = served
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await trio.sleep(0.05)  # the thread is asleep in poll(2) by now
            nursery.cancel_scope.cancel()
    assert context.signals == []
