"""A driver's reset completes only once the device has stopped (virtio 1.2 §2.4.1, issue
11 B6): until then Status keeps reading non-zero (the driver polls it for 0), and a
device that never stops never lets it read 0, with a log line saying why.

The transport is tested with callbacks that say whether the device stopped; the slot
with an in-process device that ignores the cancellation for a while and keeps writing
guest memory, as an I/O thread stuck in a slow ``pwritev`` would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from structlog.testing import capture_logs

from avmm.memory import ByteArrayMemory, GuestMemory
from avmm.virtio.device import DeviceContext, DeviceId, VirtioDevice
from avmm.virtio.mmio import MmioTransport, Register, TransportCallbacks
from tests.virtio.slot_harness import OK_STATUS, Driver, make_slot
from tests.virtio.test_mmio import MEMORY_SIZE, FakeDevice, bring_up, rd, wr


class _StopLater:
    """Transport callbacks for a device that stops only when the test says so."""

    def __init__(self) -> None:
        self.stopped = False
        self.resets = 0

    def callbacks(self) -> TransportCallbacks:
        def reset(transport: MmioTransport) -> bool:
            self.resets += 1
            return self.stopped

        return TransportCallbacks(activate=lambda transport: None, reset=reset,
                                  interrupt=lambda: None, queue_notify=lambda index: None,
                                  stopped=lambda: self.stopped)


def test_status_reads_non_zero_until_the_device_has_stopped() -> None:
    control = _StopLater()
    device = FakeDevice()
    transport = MmioTransport(device, ByteArrayMemory(MEMORY_SIZE), control.callbacks())
    assert bring_up(transport) == OK_STATUS
    device_resets = device.resets
    with capture_logs() as logs:
        wr(transport, Register.STATUS, 0)
    assert control.resets == 1
    assert rd(transport, Register.STATUS) == OK_STATUS  # the reset has not completed
    assert device.resets == device_resets  # nor the device reset under its running self
    assert any(entry["event"].startswith("virtio reset waits") for entry in logs), logs
    # The driver must wait for 0 before it initialises again: other writes are dropped.
    wr(transport, Register.STATUS, 1)
    wr(transport, Register.QUEUE_SEL, 0)
    wr(transport, Register.QUEUE_READY, 0)
    assert rd(transport, Register.STATUS) == OK_STATUS
    assert transport.queues[0].state.ready

    control.stopped = True
    assert rd(transport, Register.STATUS) == 0  # completed on the driver's next poll
    assert device.resets == device_resets + 1
    assert not transport.queues[0].state.ready
    assert not transport.activated
    assert control.resets == 1  # the callback was not called again


def test_a_second_reset_write_asks_again() -> None:
    control = _StopLater()
    transport = MmioTransport(FakeDevice(), ByteArrayMemory(MEMORY_SIZE), control.callbacks())
    bring_up(transport)
    wr(transport, Register.STATUS, 0)
    assert rd(transport, Register.STATUS) == OK_STATUS
    wr(transport, Register.STATUS, 0)
    assert control.resets == 2
    control.stopped = True
    wr(transport, Register.STATUS, 0)
    assert rd(transport, Register.STATUS) == 0


class _StubbornDevice(VirtioDevice):
    """Keeps writing guest memory for a while after it is cancelled."""

    device_id = DeviceId.ENTROPY
    queue_max_sizes = (16,)
    name = "stubborn0"
    ADDRESS = 0x80000

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished = threading.Event()
        self.writes = 0

    def device_features(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def run(self, context: DeviceContext) -> None:
        memory = context.memory
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                # Cancelled, but its I/O is not done yet: it still writes guest memory.
                while not self.release.is_set():
                    self.writes += 1
                    memory.write_u32(self.ADDRESS, self.writes)
                    await trio.sleep(0.01)
                self.finished.set()


@contextmanager
def _released_at_the_end(device: _StubbornDevice) -> Iterator[None]:
    # A failed assertion must not leave the device task writing forever (the nursery
    # would wait for it).
    try:
        yield
    finally:
        device.release.set()


@pytest.mark.parametrize("released", [True, False])
async def test_a_slot_completes_the_reset_only_after_the_device_stopped(
    monkeypatch: pytest.MonkeyPatch, released: bool,
) -> None:
    monkeypatch.setattr("avmm.vm_virtio.RESET_TIMEOUT_S", 0.3)
    device = _StubbornDevice()
    memory = GuestMemory(1 << 20)
    slot = make_slot(device, memory)
    driver = Driver(slot.transport)
    try:
        with trio.fail_after(30), capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                slot.attach(nursery)
                with _released_at_the_end(device):
                    await _reset_a_stubborn_device(device, memory, driver, logs, released)
                nursery.cancel_scope.cancel()
    finally:
        slot.close()
        memory.close()


async def _reset_a_stubborn_device(device: _StubbornDevice, memory: GuestMemory,
                                   driver: Driver, logs: list[dict[str, object]],
                                   released: bool) -> None:
    await trio.to_thread.run_sync(driver.bring_up)
    await trio.sleep(0.1)
    started = time.monotonic()
    await trio.to_thread.run_sync(driver.reset)
    assert time.monotonic() - started >= 0.3  # the vCPU waited for the device first
    assert driver.status == OK_STATUS
    assert not device.finished.is_set()
    written = device.writes
    await trio.sleep(0.1)
    assert device.writes > written  # it really is still writing
    assert any(str(entry["event"]).startswith("virtio reset waits") for entry in logs), logs
    if not released:
        # It does not stop by itself: Status stays non-zero. (Tearing the slot down
        # afterwards still works: the nursery's cancellation ends the test.)
        await trio.sleep(0.2)
        assert driver.status == OK_STATUS
        return
    device.release.set()

    def poll() -> bool:
        while driver.status != 0:
            time.sleep(0.005)
        return device.finished.is_set()

    # The first Status read of 0 comes after the device's last write.
    assert await trio.to_thread.run_sync(poll)
    last = memory.read_u32(device.ADDRESS)
    await trio.sleep(0.1)
    assert memory.read_u32(device.ADDRESS) == last
    # And the device can be brought up again.
    device.release.clear()
    device.finished.clear()
    await trio.to_thread.run_sync(driver.bring_up)
    assert driver.status == OK_STATUS
