"""virtio-console: guest output, host input with back-pressure and emergency writes
(hostile drivers: test_fuzz_console.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from avmm.virtio.console import (
    OUTPUT_CHUNK,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    ConsoleDevice,
)
from avmm.virtio.device import DeviceId, DeviceNeedsReset

from .test_net import Guest, running


class Output:
    """Collects what the device passes to ``output``."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.calls.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.calls)


def test_identity_features_and_config() -> None:
    device = ConsoleDevice(output=Output())
    assert device.name == "console0"
    assert device.device_id == DeviceId.CONSOLE
    assert device.queue_max_sizes == (256, 256)
    assert device.device_features() == VIRTIO_CONSOLE_F_EMERG_WRITE
    # cols, rows, max_nr_ports (no SIZE, no MULTIPORT) and the write-only emerg_wr.
    assert device.read_config(0, 12) == bytes(12)
    assert device.read_config(10, 8) == bytes(8)


def test_emergency_write_goes_to_output() -> None:
    output = Output()
    device = ConsoleDevice(output=output)
    device.write_config(8, b"A\0\0\0")  # the driver's 32-bit write
    device.write_config(8, b"B")  # a byte-wide write
    device.write_config(4, b"\0\0\0\0C\0\0\0")  # a write covering emerg_wr
    device.write_config(0, b"\x50\x00\x19\x00")  # cols/rows: read-only, ignored
    device.write_config(9, b"\x01")  # not the low byte of emerg_wr
    assert output.calls == [b"A", b"B", b"C"]
    assert device.stats.emergency_bytes == 3


async def test_transmitted_bytes_reach_output() -> None:
    guest = Guest()
    output = Output()
    device = ConsoleDevice(output=output)
    tx = guest.drivers[1]
    async with running(device, guest.context):
        first = tx.add_chain([b"hello, ", b"world"])
        second = tx.add_chain([b"\r\n"], indirect=True)
        guest.context.kick(1)
        await trio.testing.wait_all_tasks_blocked()
    assert output.data == b"hello, world\r\n"
    assert tx.used() == [(first, 0), (second, 0)]
    assert device.stats.output_bytes == 14
    assert guest.context.signals == [1]


async def test_large_output_comes_in_bounded_pieces() -> None:
    guest = Guest(memory_size=1 << 20)
    output = Output()
    device = ConsoleDevice(output=output)
    data = bytes(range(256)) * ((OUTPUT_CHUNK * 2 + 1000) // 256)
    async with running(device, guest.context):
        guest.drivers[1].add_chain([data[:1000], data[1000:]])
        guest.context.kick(1)
        await trio.testing.wait_all_tasks_blocked()
    assert output.data == data
    assert max(len(call) for call in output.calls) <= OUTPUT_CHUNK
    assert len(output.calls) == 3


async def test_input_lands_in_receive_buffers() -> None:
    guest = Guest()
    device = ConsoleDevice(output=Output())
    rx = guest.drivers[0]
    async with running(device, guest.context):
        head = rx.add_chain(writable=[64])
        guest.context.kick(0)
        await device.send_input(b"ls -l\n")
        await trio.testing.wait_all_tasks_blocked()
    assert rx.used() == [(head, 6)]
    assert rx.writable_data(head, 6) == b"ls -l\n"
    assert device.stats.input_bytes == 6
    assert guest.context.signals == [0]


async def test_input_waits_for_receive_buffers() -> None:
    """The device takes one input at a time and holds it until the guest has buffers
    for it; the next send_input waits meanwhile. A small buffer takes part of it."""
    guest = Guest()
    device = ConsoleDevice(output=Output())
    rx = guest.drivers[0]
    done: list[bytes] = []

    async def send(data: bytes) -> None:
        await device.send_input(data)
        done.append(data)

    async with running(device, guest.context), trio.open_nursery() as nursery:
        nursery.start_soon(send, b"abc")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send, b"def")
        await trio.testing.wait_all_tasks_blocked()
        assert done == [b"abc"]  # taken by the device, which has nowhere to put it
        assert rx.used_idx == 0
        first = rx.add_chain(writable=[2])
        guest.context.kick(0)
        await trio.testing.wait_all_tasks_blocked()
        assert rx.used() == [(first, 2)] and rx.writable_data(first) == b"ab"
        assert done == [b"abc"]
        second = rx.add_chain(writable=[16])
        guest.context.kick(0)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [b"abc", b"def"]
        assert rx.used() == [(second, 1)] and rx.writable_data(second, 1) == b"c"
        third = rx.add_chain(writable=[16])
        guest.context.kick(0)
        await trio.testing.wait_all_tasks_blocked()
        assert rx.used() == [(third, 3)] and rx.writable_data(third, 3) == b"def"


async def test_input_before_the_driver_is_ready_waits() -> None:
    guest = Guest()
    device = ConsoleDevice(output=Output())
    rx = guest.drivers[0]
    with trio.move_on_after(0.05) as scope:
        await device.send_input(b"early")
    assert scope.cancelled_caught  # nobody serves the queue yet: send_input waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.send_input, b"early")
        await trio.testing.wait_all_tasks_blocked()
        async with running(device, guest.context):
            head = rx.add_chain(writable=[16])
            guest.context.kick(0)
            await trio.testing.wait_all_tasks_blocked()
    assert rx.used() == [(head, 5)] and rx.writable_data(head, 5) == b"early"


async def test_input_survives_a_reset() -> None:
    guest = Guest()
    device = ConsoleDevice(output=Output())
    async with running(device, guest.context):
        await device.send_input(b"kept")
        await trio.testing.wait_all_tasks_blocked()
    device.reset()
    guest.reset()
    async with running(device, guest.context):
        head = guest.drivers[0].add_chain(writable=[16])
        guest.context.kick(0)
        await trio.testing.wait_all_tasks_blocked()
    assert guest.drivers[0].writable_data(head, 4) == b"kept"


@pytest.mark.parametrize(("queue", "readable", "writable", "match"), [
    (0, [b"x"], [8], "receive chain"),
    (1, [b"x"], [8], "transmit chain"),
])
async def test_wrong_direction_buffers_need_reset(queue: int, readable: list[bytes],
                                                  writable: list[int], match: str) -> None:
    guest = Guest()
    guest.drivers[queue].add_chain(readable, writable)
    device = ConsoleDevice(output=Output())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.send_input, b"input")
            with pytest.raises(DeviceNeedsReset, match=match):
                await device.run(guest.context)
            nursery.cancel_scope.cancel()
