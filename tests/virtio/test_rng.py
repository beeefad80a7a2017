"""virtio-rng: random bytes into device-writable buffers, lengths and limits (hostile
drivers: test_fuzz_rng.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from avmm.virtio.device import DeviceId, DeviceNeedsReset
from avmm.virtio.rng import MAX_REQUEST_BYTES, RngDevice

from .test_net import Guest, running


def test_identity_features_and_config() -> None:
    device = RngDevice()
    assert device.name == "rng0"
    assert device.device_id == DeviceId.ENTROPY
    assert device.queue_max_sizes == (256,)
    assert device.device_features() == 0
    assert device.read_config(0, 8) == bytes(8)


async def test_buffers_are_filled_and_lengths_reported() -> None:
    guest = Guest(1)
    driver = guest.drivers[0]
    device = RngDevice()
    async with running(device, guest.context):
        first = driver.add_chain(writable=[100, 28])
        second = driver.add_chain(writable=[128], indirect=True)
        guest.context.kick(0)
        await trio.testing.wait_all_tasks_blocked()
    assert driver.used() == [(first, 128), (second, 128)]
    one, two = driver.writable_data(first), driver.writable_data(second)
    assert one != two
    assert one != bytes(128) and two != bytes(128)
    assert device.stats.requests == 2 and device.stats.bytes == 256
    assert guest.context.signals == [0]  # one interrupt for the batch


async def test_requests_are_capped() -> None:
    guest = Guest(1, memory_size=1 << 20)
    driver = guest.drivers[0]
    device = RngDevice()
    async with running(device, guest.context):
        head = driver.add_chain(writable=[MAX_REQUEST_BYTES + 1000])
        guest.context.kick(0)
        await trio.testing.wait_all_tasks_blocked()
    assert driver.used() == [(head, MAX_REQUEST_BYTES)]
    data = driver.writable_data(head)
    assert data[MAX_REQUEST_BYTES:] == bytes(1000)  # beyond the cap: untouched
    assert data[MAX_REQUEST_BYTES - 64:MAX_REQUEST_BYTES] != bytes(64)


async def test_device_readable_buffer_needs_reset() -> None:
    guest = Guest(1)
    guest.drivers[0].add_chain([b"seed?"], [16])
    with trio.fail_after(5), pytest.raises(DeviceNeedsReset, match="device-readable"):
        await RngDevice().run(guest.context)
