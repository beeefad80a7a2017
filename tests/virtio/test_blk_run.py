"""virtio-blk's I/O thread with its whole loop in C (avmm.virtio.blk_fast's ``run``): what
a transport that lets the device write the irqfd itself (``context.direct_used_fd``, as
the in-process virtio-mmio slot does) gets. The run serves, waits for kicks and
interrupts the driver without Python; these tests check that it keeps every rule the
Python loop keeps: the driver's notification wishes (NO_INTERRUPT, EVENT_IDX), the
counters (published while it runs, not only when it stops), a rate limit set while it
runs, a request the C loop leaves to Python, and the dirty marks of a migration."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from avmm.memory import PAGE_SIZE
from avmm.migration.dirty import DirtyMarks, PageSet
from avmm.virtio import blk_fast
from avmm.virtio.blk import VIRTIO_BLK_F_FLUSH, BlockDevice, RequestType, Status
from avmm.virtio.device import PauseGate
from avmm.virtio.queue import VirtQueue
from avmm.vm_virtio import _MmioDeviceContext
from tests.vm.test_pause import _slot

from .queue_helpers import DriverQueue, make_queue
from .test_blk import SECTOR, header, make_image, pattern, status_of
from .test_blk_thread import EventfdContext, wait_used

IN, OUT, FLUSH = RequestType.IN, RequestType.OUT, RequestType.FLUSH
THREAD = "avmm blk0 I/O"


class DirectContext(EventfdContext):
    """An EventfdContext whose device may interrupt by writing an eventfd of its own
    (``direct_used_fd``); ``signal_used`` calls are still recorded (the Python path)."""

    def __init__(self, driver: DriverQueue, queue: VirtQueue, features: int) -> None:
        super().__init__(driver, queue, features)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.interrupts = 0
        # What a VM's pause closes (the queue here is the bare VirtQueue, which does not
        # look at it: the device's run must, through on_pause and may_take).
        self.gate = PauseGate()

    def close(self) -> None:
        super().close()
        os.close(self.call)

    def direct_used_fd(self, queue_index: int) -> int:
        assert queue_index == 0
        return self.call

    def on_pause(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self.gate.notify_on_close(callback)

    def take_interrupts(self) -> int:
        """Interrupts written since the last call."""
        try:
            count = os.eventfd_read(self.call)
        except BlockingIOError:
            count = 0
        self.interrupts += count
        return count


@pytest.fixture(autouse=True)
def c_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    if blk_fast._blk_ffi is None:
        pytest.fail("avmm.virtio._blk_ffi is not built (run make venv)")
    monkeypatch.setattr(blk_fast, "ENABLED", True)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlockDevice]:
    with BlockDevice(make_image(tmp_path / "disk.img")) as device:
        yield device


def served(event_idx: bool = False) -> tuple[VirtQueue, DriverQueue, DirectContext]:
    queue, driver = make_queue(size=16, event_idx=event_idx)
    return queue, driver, DirectContext(driver, queue, VIRTIO_BLK_F_FLUSH)


def add_read(driver: DriverQueue, sector: int, sectors: int = 1) -> int:
    """Make a read of ``sectors`` at ``sector`` available (the caller kicks or not)."""
    return driver.add_chain(readable=[header(IN, sector)],
                            writable=[sectors * SECTOR + 1])


async def read(driver: DriverQueue, context: DirectContext, sector: int, sectors: int = 1
               ) -> None:
    """A read made available, kicked and waited for until it is used."""
    target = (driver.used_idx + 1) & 0xFFFF
    add_read(driver, sector, sectors)
    context.kick()
    await wait_used(driver, target)


async def until(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(10) as scope:
        while not condition():
            await trio.sleep(0.001)
    assert not scope.cancelled_caught, f"timed out waiting for {what}"


async def test_the_run_serves_and_interrupts_through_the_irqfd(device: BlockDevice) -> None:
    queue, driver, context = served()
    first = add_read(driver, 1)
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
                assert driver.used() == [(head, 1)] and status_of(driver, head) == Status.OK
            # Published while the run goes on (PUBLISH_NS after the completions), not
            # only when it stops.
            await until(lambda: device.stats.writes == 3, "the counters")
            assert any(t.name == THREAD for t in threading.enumerate())
            nursery.cancel_scope.cancel()
    context.take_interrupts()
    assert driver.writable_data(first, SECTOR) == pattern(64 * 1024)[SECTOR:2 * SECTOR]
    assert os.pread(device.fd, SECTOR, 6 * SECTOR) == bytes([2]) * SECTOR
    # Each request completed alone and the driver wanted every interrupt: four, none of
    # them through signal_used.
    assert context.interrupts == 4 and context.signals == []
    assert queue.state.signalled_used == 4
    assert sum(context.kicks) == 3
    stats = device.stats
    assert (stats.reads, stats.writes, stats.bytes_read, stats.bytes_written) == (
        1, 3, SECTOR, 3 * SECTOR)
    assert stats.batched_requests == 4 and stats.batches == 4
    assert not any(t.name == THREAD for t in threading.enumerate())


async def test_no_interrupt_is_honoured(device: BlockDevice) -> None:
    _, driver, context = served()
    driver.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await read(driver, context, 0)
            driver.set_avail_flags(0)
            await read(driver, context, 0)
            nursery.cancel_scope.cancel()
    assert context.take_interrupts() == 1


async def test_event_idx_interrupts_only_once_used_event_is_passed(
        device: BlockDevice) -> None:
    queue, driver, context = served(event_idx=True)
    counts = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            for index in range(6):
                if index == 1:
                    driver.set_used_event(4)  # "interrupt me once entry 4 is used"
                await read(driver, context, index)
                counts.append(context.take_interrupts())
            nursery.cancel_scope.cancel()
    # The first completion always interrupts; then none until the used idx passes 4
    # (after the fifth completion, idx 5).
    assert counts == [1, 0, 0, 0, 1, 0]
    # The run re-armed the driver's notifications at its position before each wait.
    assert driver.avail_event == queue.state.next_available == 6


async def test_a_rate_limit_set_while_the_run_waits_applies_to_the_next_request(
        device: BlockDevice) -> None:
    _, driver, context = served()

    class CountingThrottle:
        def __init__(self) -> None:
            self.admitted: list[int] = []

        def admit(self, nbytes: int) -> int:
            self.admitted.append(nbytes)
            return 0

    throttle = CountingThrottle()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await read(driver, context, 0)
            await trio.sleep(0.05)  # the run waits in poll(2) by now
            device.throttle = throttle  # type: ignore[assignment]
            await read(driver, context, 0, sectors=2)
            nursery.cancel_scope.cancel()
    assert throttle.admitted == [2 * SECTOR]
    # The limited request went through the Python path, which signals through the
    # context; the first one through the irqfd.
    assert context.take_interrupts() == 1 and len(context.signals) == 1


async def test_a_request_the_c_loop_leaves_to_python_is_served_in_ring_order(
        device: BlockDevice) -> None:
    _, driver, context = served()
    heads = [
        driver.add_chain(readable=[header(OUT, 0), b"\x11" * SECTOR], writable=[1]),
        driver.add_chain(readable=[header(FLUSH)], writable=[1]),
        driver.add_chain(readable=[header(OUT, 1), b"\x22" * SECTOR], writable=[1]),
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await wait_used(driver, 3)
            nursery.cancel_scope.cancel()
    assert [head for head, _ in driver.used()] == heads
    assert all(status_of(driver, head) == Status.OK for head in heads)
    assert (device.stats.writes, device.stats.flushes) == (2, 1)
    assert os.pread(device.fd, 2 * SECTOR, 0) == b"\x11" * SECTOR + b"\x22" * SECTOR


async def test_a_migration_s_dirty_log_gets_the_run_s_writes(device: BlockDevice) -> None:
    _, driver, context = served()
    memory = driver.memory
    pages = memory.size // PAGE_SIZE
    before = bytes(memory.data)
    marks = DirtyMarks(memory.regions, pages)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await trio.sleep(0.05)  # the log starts while the run waits
            memory.dirty = marks
            heads = [driver.add_chain(readable=[header(IN, sector)],
                                      writable=[3 * PAGE_SIZE, 1]) for sector in (0, 8)]
            # The driver's own writes are not the device's: compare from here.
            before = bytes(memory.data)
            context.kick()
            await wait_used(driver, 2)
            nursery.cancel_scope.cancel()
    memory.dirty = None
    data = memory.data
    changed = {page for page in range(pages)
               if data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
               != before[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]}
    for head in heads:
        assert driver.chains[head].writable[0][0] // PAGE_SIZE in changed
    assert driver.used_ring // PAGE_SIZE in changed
    missed = changed - set(PageSet.from_bitmap(marks.take(), pages))
    assert not missed, f"pages written but not marked: {sorted(missed)}"


async def test_a_stop_ends_an_idle_run(device: BlockDevice) -> None:
    _, _, context = served()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await trio.sleep(0.05)  # asleep in the C loop's poll(2)
            nursery.cancel_scope.cancel()
    assert context.take_interrupts() == 0 and context.signals == []
    assert not any(t.name == THREAD for t in threading.enumerate())


async def test_after_a_completion_the_run_looks_for_the_next_request_without_notifications(
        device: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    # A look long enough for this test: the second request, made available without a
    # kick, is found by the look, with the driver's notifications still off.
    monkeypatch.setattr(blk_fast, "SPIN_NS", 10 * 10**9)
    _, driver, context = served()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await read(driver, context, 0)
            assert driver.used_flags == 1  # VIRTQ_USED_F_NO_NOTIFY: looking, not asleep
            add_read(driver, 1)  # no kick
            await wait_used(driver, 2)
            # A stop ends the look at once (the test's 10 s bound would not hold else).
            nursery.cancel_scope.cancel()
    # Never asleep, so the one kick was never read: the look found both requests.
    assert sum(context.kicks) == 0


async def test_without_the_look_the_run_re_arms_and_sleeps_until_kicked(
        device: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blk_fast, "SPIN_NS", 0)
    _, driver, context = served()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            await read(driver, context, 0)
            # Past the return that publishes the counters (which looks at the ring
            # again, as any look of the device may), the run sleeps for good.
            await until(lambda: device.stats.reads == 1, "the counters")
            await trio.sleep(0.05)
            assert driver.used_flags == 0  # notifications re-armed
            add_read(driver, 1)
            await trio.sleep(0.2)
            assert driver.used_idx == 1  # not kicked: asleep in poll(2)
            context.kick()
            await wait_used(driver, 2)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("c_run", [True, False])
async def test_the_slot_builds_interrupt_status_for_a_disk_that_interrupts_directly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, c_run: bool) -> None:
    # Decided when the slot is built, not when the I/O thread first runs: after a
    # restore the guest may take an interrupt the C loop sent before the snapshot, and
    # find the bit, before the thread runs again.
    monkeypatch.setattr(blk_fast, "ENABLED", c_run)
    _, driver = make_queue(size=8)
    device = BlockDevice(make_image(tmp_path / "disk.img"), read_only=True)
    slot = _slot(device, driver, PauseGate())
    try:
        assert device.interrupts_directly is c_run
        assert slot.transport.reports_used_always is c_run
        context = _MmioDeviceContext(slot)
        if c_run:
            assert context.direct_used_fd(0) == slot.irq_fd
    finally:
        slot.close()
        device.close()
