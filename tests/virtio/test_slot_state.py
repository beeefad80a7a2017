"""A virtio-mmio slot's state: saved while paused, carried through the snapshot codec,
restored into a freshly built slot over a copy of guest memory, which then serves the
rings from the saved positions (no request served twice, none lost), and hostile states
refused with one line."""

from __future__ import annotations

import dataclasses
import random
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from avmm.devices._state import DeviceStateError
from avmm.errors import VmStateError
from avmm.memory import ByteArrayMemory
from avmm.state import SnapshotError
from avmm.state.codec import decode, encode
from avmm.virtio.blk import BlockDevice, BlockState, RequestType
from avmm.virtio.console import ConsoleDevice, ConsoleState
from avmm.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioDevice
from avmm.virtio.mmio import MmioTransportState, TransportStateError
from avmm.virtio.net import NET_HEADER_SIZE, NetDevice, NetState
from avmm.virtio.queue import SavedQueueState
from avmm.virtio.rng import RngDevice, RngState
from avmm.vm_virtio import VirtioMmioSlot, VirtioSlotState
from tests.virtio.queue_helpers import DriverQueue
from tests.virtio.slot_harness import RING_BASE, RING_STRIDE, Driver, make_slot
from tests.virtio.test_net import FakeTap

MEMORY_SIZE = 1 << 20
QUEUE_SIZE = 16
MAC = bytes.fromhex("525400123456")


def driver_queue(memory: ByteArrayMemory, index: int) -> DriverQueue:
    """The driver's side of queue ``index`` at the addresses Driver.bring_up gives it."""
    base = RING_BASE + index * RING_STRIDE
    return DriverQueue(memory, QUEUE_SIZE, descriptor_table=base, available_ring=base + 0x1000,
                       used_ring=base + 0x2000, data_address=0x40000 + index * 0x20000,
                       data_size=0x20000)


def used_entries(memory: ByteArrayMemory, index: int) -> list[tuple[int, int]]:
    """Every (head, length) the device put in queue ``index``'s used ring (fewer than a
    ring's worth in these tests), read from memory alone."""
    used = RING_BASE + index * RING_STRIDE + 0x2000
    count = memory.read_u16(used + 2)
    assert count <= QUEUE_SIZE
    return [(memory.read_u32(used + 4 + 8 * i), memory.read_u32(used + 8 + 8 * i))
            for i in range(count)]


def copy_of(memory: ByteArrayMemory) -> ByteArrayMemory:
    copy = ByteArrayMemory(memory.size)
    copy.write(0, memory.read(0, memory.size))
    return copy


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(0.02)  # blk's own I/O thread is invisible to wait_all_tasks_blocked
    await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def serving(slot: VirtioMmioSlot) -> AsyncIterator[None]:
    try:
        async with trio.open_nursery() as nursery:
            slot.attach(nursery)
            yield
            nursery.cancel_scope.cancel()
    finally:
        slot.close()


async def bring_up(slot: VirtioMmioSlot, queues: tuple[int, ...],
                   features: int = VIRTIO_F_VERSION_1) -> None:
    driver = Driver(slot.transport)
    await trio.to_thread.run_sync(lambda: driver.bring_up(queues, QUEUE_SIZE, features))
    await settle()


def kick(slot: VirtioMmioSlot, index: int) -> None:
    import os
    os.eventfd_write(slot.kick_fds[index], 1)


# -- round trips ---------------------------------------------------------------------------


_SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


def make_device(kind: str, tmp_path: Path) -> tuple[VirtioDevice, tuple[int, ...]]:
    if kind == "rng":
        return RngDevice(name="rng0"), (0,)
    if kind == "blk":
        image = tmp_path / "disk.img"
        if not image.exists():
            image.write_bytes(bytes(64 * 512))
        return BlockDevice(image, name="blk0"), (0,)
    if kind == "console":
        return ConsoleDevice(output=lambda data: None, name="console0"), (0, 1)
    sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    _SOCKETS.extend((sock, peer))
    return NetDevice(FakeTap(sock), mac=MAC, name="net0"), (0, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rng", "blk", "console", "net"])
async def test_a_paused_slot_state_survives_the_codec_and_a_new_slot(
        kind: str, tmp_path: Path) -> None:
    memory = ByteArrayMemory(MEMORY_SIZE)
    device, queues = make_device(kind, tmp_path)
    for index in queues:
        driver_queue(memory, index)
    slot = make_slot(device, memory)
    async with serving(slot):
        await bring_up(slot, queues, VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
        with pytest.raises(VmStateError):
            slot.save_state()  # not paused
        await slot.pause()
        await slot.pause()  # idempotent
        state = slot.save_state()
    assert isinstance(state, VirtioSlotState)
    assert state.transport.status & 4  # DRIVER_OK
    assert all(queue.ready == (index in queues)
               for index, queue in enumerate(state.transport.queues))
    decoded = decode(encode(state), VirtioSlotState)
    assert decoded == state

    device2, _ = make_device(kind, tmp_path)
    slot2 = make_slot(device2, copy_of(memory))
    try:
        slot2.restore_state(decoded)
        assert slot2.paused and slot2.transport.activated
        assert slot2.transport.save_state() == state.transport
        assert encode(device2.save_state()) == state.device_state
    finally:
        slot2.close()


# -- continuing where the saved state was -------------------------------------------------


async def test_a_restored_rng_serves_exactly_the_requests_the_saved_one_had_not() -> None:
    memory = ByteArrayMemory(MEMORY_SIZE)
    driver = driver_queue(memory, 0)
    slot = make_slot(RngDevice(name="rng0"), memory)
    async with serving(slot):
        await bring_up(slot, (0,))
        first = [driver.add_chain(writable=[16]) for _ in range(3)]
        kick(slot, 0)
        await settle()
        assert [head for head, _ in used_entries(memory, 0)] == first
        await slot.pause()
        # Made available while paused: not taken, and nothing else moves.
        later = [driver.add_chain(writable=[16]) for _ in range(4)]
        kick(slot, 0)
        await settle()
        assert len(used_entries(memory, 0)) == 3
        blob = encode(slot.save_state())
        saved_memory = copy_of(memory)
    saved = decode(blob, VirtioSlotState)
    assert saved.transport.queues[0].next_available == 3
    assert saved.transport.queues[0].next_used == 3

    slot2 = make_slot(RngDevice(name="rng0"), saved_memory)
    slot2.restore_state(saved)
    async with serving(slot2):
        await settle()
        assert len(used_entries(saved_memory, 0)) == 3  # restored paused: nothing served
        await slot2.resume()
        await settle()
        entries = used_entries(saved_memory, 0)
        assert [head for head, _ in entries] == first + later
        assert all(length == 16 for _, length in entries)
        # And it goes on taking new requests from there.
        again = DriverQueueView(saved_memory, driver)
        head = again.add(16)
        kick(slot2, 0)
        await settle()
        assert used_entries(saved_memory, 0)[-1] == (head, 16)


class DriverQueueView:
    """The saved driver's queue over the restored copy of memory: the driver lives on in
    the guest, so its bookkeeping continues (the DriverQueue constructor would zero
    the rings)."""

    def __init__(self, memory: ByteArrayMemory, driver: DriverQueue) -> None:
        self.driver = driver
        driver.memory = memory

    def add(self, length: int) -> int:
        return self.driver.add_chain(writable=[length])


async def test_a_restored_disk_writes_each_pending_request_once(tmp_path: Path) -> None:
    """Writes served before the pause are not redone (their sectors are overwritten on
    disk behind the restored device's back to tell), writes made available while paused
    are all done by the restored device, each once."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * 512))
    memory = ByteArrayMemory(MEMORY_SIZE)
    driver = driver_queue(memory, 0)

    def write(sector: int) -> int:
        header = struct.pack("<IIQ", int(RequestType.OUT), 0, sector)
        return driver.add_chain(readable=[header, bytes([sector + 1]) * 512], writable=[1])

    slot = make_slot(BlockDevice(image, name="blk0"), memory)
    async with serving(slot):
        await bring_up(slot, (0,))
        served = [write(sector) for sector in (0, 1)]
        kick(slot, 0)
        with trio.fail_after(10):
            while len(used_entries(memory, 0)) < 2:
                await settle()
        await slot.pause()
        pending = [write(sector) for sector in (2, 3, 4)]
        kick(slot, 0)
        await settle()
        assert len(used_entries(memory, 0)) == 2
        blob = encode(slot.save_state())
        saved_memory = copy_of(memory)
    # Mark the sectors written before the snapshot: a second write would undo this.
    with image.open("r+b") as disk:
        disk.write(b"\xee" * 1024)

    slot2 = make_slot(BlockDevice(image, name="blk0"), saved_memory)
    slot2.restore_state(decode(blob, VirtioSlotState))
    async with serving(slot2):
        await slot2.resume()
        with trio.fail_after(10):
            while len(used_entries(saved_memory, 0)) < 5:
                await settle()
        await settle()
    entries = used_entries(saved_memory, 0)
    assert [head for head, _ in entries] == served + pending
    data = image.read_bytes()
    assert data[:1024] == b"\xee" * 1024
    assert data[1024:2560] == bytes([3]) * 512 + bytes([4]) * 512 + bytes([5]) * 512
    assert data[2560:] == bytes(len(data) - 2560)


async def test_receive_buffers_a_paused_net_device_held_go_to_the_restored_one() -> None:
    memory = ByteArrayMemory(MEMORY_SIZE)
    rx = driver_queue(memory, 0)
    tx = driver_queue(memory, 1)
    sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock, peer:
        device = NetDevice(FakeTap(sock), mac=MAC, name="net0")  # type: ignore[arg-type]
        slot = make_slot(device, memory)
        async with serving(slot):
            await bring_up(slot, (0, 1))
            buffers = [rx.add_chain(writable=[2048]) for _ in range(4)]
            kick(slot, 0)
            frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + b"sent once" * 8
            sent = tx.add_chain(readable=[bytes(NET_HEADER_SIZE) + frame])
            kick(slot, 1)
            await settle()
            # Taken and held, waiting for a frame: by net's own I/O thread, which a loaded
            # host may not have run within settle()'s moment.
            with trio.fail_after(10):
                while slot.transport.queues[0].state.next_available < 1:
                    await settle()
            # The tap carries a virtio-net header before each frame (IFF_VNET_HDR).
            assert peer.recv(4096) == bytes(NET_HEADER_SIZE) + frame
            await slot.pause()
            # Given back: the position moved back over the buffers it held.
            assert slot.transport.queues[0].state.next_available == 0
            assert used_entries(memory, 0) == []
            blob = encode(slot.save_state())
            saved_memory = copy_of(memory)

    sock2, peer2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock2, peer2:
        device2 = NetDevice(FakeTap(sock2), mac=MAC, name="net0")  # type: ignore[arg-type]
        slot2 = make_slot(device2, saved_memory)
        slot2.restore_state(decode(blob, VirtioSlotState))
        async with serving(slot2):
            await slot2.resume()
            reply = b"\x04" * 6 + b"\x02" * 6 + b"\x08\x00" + b"arrived after" * 4
            peer2.send(bytes(NET_HEADER_SIZE) + reply)
            with trio.fail_after(10):
                while not used_entries(saved_memory, 0):
                    await settle()
            head, length = used_entries(saved_memory, 0)[0]
            assert head == buffers[0] and length == NET_HEADER_SIZE + len(reply)
            rx_view = DriverQueueView(saved_memory, rx)
            assert rx_view.driver.writable_data(head, length)[NET_HEADER_SIZE:] == reply
            # The frame sent before the snapshot is not sent again.
            peer2.setblocking(False)
            with pytest.raises(BlockingIOError):
                peer2.recv(4096)
            assert used_entries(saved_memory, 1) == [(sent, 0)]


async def test_console_input_not_yet_delivered_reaches_the_restored_guest() -> None:
    memory = ByteArrayMemory(MEMORY_SIZE)
    rx = driver_queue(memory, 0)
    driver_queue(memory, 1)
    device = ConsoleDevice(output=lambda data: None, name="console0")
    slot = make_slot(device, memory)
    async with serving(slot):
        await bring_up(slot, (0, 1))
        first = rx.add_chain(writable=[4])
        kick(slot, 0)
        await settle()
        with trio.fail_after(10):
            await device.send_input(b"hello, world")  # 4 bytes fit; 8 wait for buffers
        await settle()
        assert used_entries(memory, 0) == [(first, 4)]
        await slot.pause()
        state = slot.save_state()
        saved_memory = copy_of(memory)
    assert decode(state.device_state, ConsoleState) == ConsoleState(b"o, world")

    device2 = ConsoleDevice(output=lambda data: None, name="console0")
    slot2 = make_slot(device2, saved_memory)
    slot2.restore_state(decode(encode(state), VirtioSlotState))
    async with serving(slot2):
        await slot2.resume()
        view = DriverQueueView(saved_memory, rx)
        second = view.driver.add_chain(writable=[64])
        kick(slot2, 0)
        with trio.fail_after(10):
            while len(used_entries(saved_memory, 0)) < 2:
                await settle()
        assert used_entries(saved_memory, 0)[1] == (second, 8)
        assert view.driver.writable_data(second, 8) == b"o, world"


# -- hostile states --------------------------------------------------------------------------


async def saved_rng_state() -> tuple[VirtioSlotState, ByteArrayMemory]:
    memory = ByteArrayMemory(MEMORY_SIZE)
    driver_queue(memory, 0)
    slot = make_slot(RngDevice(name="rng0"), memory)
    async with serving(slot):
        await bring_up(slot, (0,))
        await slot.pause()
        return slot.save_state(), memory


def _queue(state: VirtioSlotState, **changes: object) -> VirtioSlotState:
    queue = dataclasses.replace(state.transport.queues[0], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(state, transport=dataclasses.replace(
        state.transport, queues=[queue, *state.transport.queues[1:]]))


def _transport(state: VirtioSlotState, **changes: object) -> VirtioSlotState:
    return dataclasses.replace(
        state, transport=dataclasses.replace(state.transport, **changes))  # type: ignore[arg-type]


HOSTILE = {
    "another device": lambda s: dataclasses.replace(s, device_id=2),
    "another device's state": lambda s: dataclasses.replace(s, device_state=encode(
        NetState(MAC))),
    "a newer device state": lambda s: dataclasses.replace(
        s, device_state=s.device_state.replace(b"RngState\x01", b"RngState\x02")),
    "garbage device state": lambda s: dataclasses.replace(s, device_state=b"\x07\xff"),
    "too few queues": lambda s: _transport(s, queues=[]),
    "another max size": lambda s: _queue(s, max_size=QUEUE_SIZE * 2),
    "a ring outside RAM": lambda s: _queue(s, used_ring=MEMORY_SIZE - 8),
    "a misaligned ring": lambda s: _queue(s, descriptor_table=RING_BASE + 8),
    "a size beyond the maximum": lambda s: _queue(s, size=1 << 20),
    "a position beyond u16": lambda s: _queue(s, next_available=1 << 16),
    "a negative address": lambda s: _queue(s, available_ring=-2),
    "a bool for an int": lambda s: _queue(s, next_used=True),
    "an event_idx not negotiated": lambda s: _queue(s, event_idx=True),
    "status bits out of order": lambda s: _transport(s, status=4),
    "status bits nobody sets": lambda s: _transport(s, status=0x2F),
    "unoffered features": lambda s: _transport(s, driver_features=(1 << 64) - 1),
    "interrupt bits beyond": lambda s: _transport(s, interrupt_status=4),
    "a generation beyond u32": lambda s: _transport(s, config_generation=1 << 32),
    "not a state": lambda s: s.transport,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_a_hostile_slot_state_is_refused_with_one_line(case: str) -> None:
    state, memory = await saved_rng_state()
    bad = HOSTILE[case](state)
    slot = make_slot(RngDevice(name="rng0"), copy_of(memory))
    try:
        before = slot.transport.save_state()
        with pytest.raises(DeviceStateError) as error:
            slot.restore_state(bad)  # type: ignore[arg-type]
        message = str(error.value)
        assert "\n" not in message and "rng0" in message, message
        # Nothing changed: the transport's checks all come first.
        assert slot.transport.save_state() == before
    finally:
        slot.close()


def test_transport_state_errors_are_device_state_errors() -> None:
    assert issubclass(TransportStateError, DeviceStateError)


@pytest.mark.parametrize(("device_state", "device", "field"), [
    (BlockState(writeback=True, capacity=65, read_only=False, serial="x"), "blk", "capacity"),
    (NetState(mac=bytes(6)), "net", "MAC"),
    (NetState(mac=b"\x52" * 7), "net", "mac"),
    (ConsoleState(pending_input="text"), "console", "pending_input"),  # type: ignore[arg-type]
    (RngState(), "blk", "BlockState"),
])
def test_a_device_state_that_does_not_fit_the_device_is_refused(
        device_state: object, device: str, field: str, tmp_path: Path) -> None:
    made, _ = make_device(device, tmp_path)
    try:
        with pytest.raises(DeviceStateError, match=field) as error:
            made.restore_state(device_state)
        assert "\n" not in str(error.value)
    finally:
        closer = getattr(made, "close", None)
        if closer is not None:
            closer()


async def test_a_slot_state_of_another_version_is_refused_by_the_codec() -> None:
    state, _ = await saved_rng_state()
    blob = encode(state)
    for name in (b"MmioTransportState", b"SavedQueueState", b"VirtioSlotState"):
        # A record is its name, then its version as a varint (1 here).
        assert blob.count(name + b"\x01") >= 1
        with pytest.raises(SnapshotError) as error:
            decode(blob.replace(name + b"\x01", name + b"\x05"), VirtioSlotState)
        assert "version 5" in str(error.value) and "\n" not in str(error.value)


def test_saved_queue_state_is_frozen_and_versioned() -> None:
    assert SavedQueueState.STATE_VERSION == 1
    assert MmioTransportState.STATE_VERSION == 1
    assert VirtioSlotState.STATE_VERSION == 1
    state = MmioTransportState()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.status = 1  # type: ignore[misc]


async def test_a_pending_reset_completes_at_the_restored_drivers_first_status_read() -> None:
    state, memory = await saved_rng_state()
    pending = _transport(state, reset_pending=True)
    device = RngDevice(name="rng0")
    slot = make_slot(device, copy_of(memory))
    try:
        slot.restore_state(pending)
        assert slot.transport.reset_pending and not slot.transport.activated
        assert slot.transport.save_state().reset_pending
        # Nothing runs, so the driver's poll finds the device stopped and the reset done.
        assert Driver(slot.transport).status == 0
        assert not slot.transport.reset_pending
        assert slot.transport.save_state().queues[0] == SavedQueueState.of(
            type(slot.transport.queues[0].state)(max_size=state.transport.queues[0].max_size))
    finally:
        slot.close()


async def test_damaged_slot_state_bytes_are_refused_with_one_line_or_restore_cleanly() -> None:
    """Every single-byte change of an encoded slot state either fails to decode
    (SnapshotError), or decodes to a state that restore refuses (DeviceStateError) or
    accepts; nothing else escapes, and every refusal is one line."""
    state, memory = await saved_rng_state()
    blob = encode(state)
    rng = random.Random(12)
    outcomes = {"decode": 0, "restore": 0, "accepted": 0}
    for _ in range(300):
        damaged = bytearray(blob)
        damaged[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        slot = make_slot(RngDevice(name="rng0"), copy_of(memory))
        try:
            try:
                decoded = decode(bytes(damaged), VirtioSlotState)
            except SnapshotError as e:
                assert "\n" not in str(e)
                outcomes["decode"] += 1
                continue
            try:
                slot.restore_state(decoded)
            except DeviceStateError as e:
                assert "\n" not in str(e)
                outcomes["restore"] += 1
            else:
                outcomes["accepted"] += 1
        finally:
            slot.close()
    assert outcomes["decode"] and outcomes["restore"], outcomes
