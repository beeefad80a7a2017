"""vhost-user devices in a snapshot (issue 12, item 6): the front-end's state, the
back-end's device state through SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE
(VHOST_USER_PROTOCOL_F_DEVICE_STATE), and the ring-base path for back-ends without it.

The front-end runs in a virtio-mmio slot without KVM (tests/virtio/slot_harness.py); the
test plays the driver and KVM. "Pausing" is stopping the slot's device task, as the
slot's pause() does: run() is cancelled, the rings are stopped with GET_VRING_BASE and
the back-end's device state is taken on the way down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from avmm.devices._state import DeviceStateError
from avmm.memory import GuestMemory
from avmm.state import codec
from avmm.vhost.device_state import BackendState, BlockBackendState
from avmm.vhost.frontend import VhostUserDevice, VhostUserFrontendState
from avmm.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, Request
from avmm.virtio.device import VIRTIO_F_VERSION_1, DeviceId
from avmm.vm_virtio import VirtioMmioSlot, VirtioSlotState
from tests.prerequisites import require
from tests.vhost.scripted_backend import ScriptedBackend, wait_until
from tests.vhost.test_frontend import avmm_backend, storage_daemon
from tests.virtio.queue_helpers import DriverQueue
from tests.virtio.slot_harness import OK_STATUS, RING_BASE, Driver, make_slot

DEVICE_STATE = 1 << ProtocolFeature.DEVICE_STATE
BLK_F_FLUSH = 1 << 9
IMAGE_SIZE = 1 << 20
GET_ID = 8
#: The driver's data buffers, past the rings of queue 0 (slot_harness's layout).
DATA = 0x40000


async def make_device(sock: Path, memory: GuestMemory) -> VhostUserDevice:
    """The front-end's device; its handshake blocks, so in a thread (as the VM build)."""
    return await trio.to_thread.run_sync(
        lambda: VhostUserDevice(sock, device_id=DeviceId.BLOCK, memory=memory,
                                queue_size=16))


async def in_thread(function: object, *args: object) -> object:
    return await trio.to_thread.run_sync(function, *args)  # type: ignore[arg-type]


@asynccontextmanager
async def slot_for(device: VhostUserDevice, memory: GuestMemory
                   ) -> AsyncIterator[VirtioMmioSlot]:
    slot = make_slot(device, memory)
    try:
        async with trio.open_nursery() as nursery:
            slot.attach(nursery)
            yield slot
            nursery.cancel_scope.cancel()
    finally:
        slot.close()


def ring(memory: GuestMemory) -> DriverQueue:
    """Queue 0 where slot_harness's Driver puts it, with buffers after it."""
    return DriverQueue(memory, 16, descriptor_table=RING_BASE,
                       available_ring=RING_BASE + 0x1000, used_ring=RING_BASE + 0x2000,
                       data_address=DATA, data_size=0x10000)


async def get_id(slot: VirtioMmioSlot, queue: DriverQueue) -> bytes:
    """One GET_ID request through the back-end: the serial it answers."""
    head = queue.add_chain([struct.pack("<IIQ", GET_ID, 0, 0)], [20, 1])
    os.eventfd_write(slot.kick_fds[0], 1)
    with trio.fail_after(20):
        while not (used := queue.used()):
            await trio.sleep(0.01)
    assert used[0][0] == head
    data = queue.writable_data(head)
    assert data[-1] == 0, "GET_ID failed"
    return data[:20].rstrip(b"\0")


def backend_part(state: VhostUserFrontendState) -> tuple[BackendState, BlockBackendState]:
    assert state.backend_state is not None
    outer = codec.decode(state.backend_state, BackendState)
    return outer, codec.decode(outer.device, BlockBackendState)


async def test_blk_device_state_travels_from_one_backend_process_to_another(
    tmp_path: Path,
) -> None:
    """Pause and save a slot served by one ``avmm backend blk``; restore it into a fresh
    slot served by a new back-end process on a copy of the image at another path and
    resume: the back-end state arrived and is in use (the new back-end answers the first
    one's serial to the driver, its counters go on from the first one's), and the ring
    continues where it stopped."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    copy = tmp_path / "elsewhere" / "disk-copy.img"
    copy.parent.mkdir()
    shutil.copy(image, copy)
    memory = GuestMemory(1 << 20)
    try:
        with avmm_backend("blk", tmp_path / "a.sock", "--image", str(image)):
            device = await make_device(tmp_path / "a.sock", memory)
            assert device.protocol_features & DEVICE_STATE
            async with slot_for(device, memory) as slot:
                queue = ring(memory)
                driver = Driver(slot.transport)
                await in_thread(driver.bring_up, (0,), 16, VIRTIO_F_VERSION_1 | BLK_F_FLUSH)
                assert driver.status == OK_STATUS
                serial = await get_id(slot, queue)
                await slot.pause()
                saved_slot = slot.save_state()
            device.close()
        # The snapshot's encoding carries it.
        saved_slot = codec.decode(codec.encode(saved_slot), VirtioSlotState)
        saved = codec.decode(saved_slot.device_state, VhostUserFrontendState)
        outer, block = backend_part(saved)
        assert outer.device_id == DeviceId.BLOCK and outer.features & BLK_F_FLUSH
        assert block.serial.encode() == serial and block.writeback
        assert block.stats["get_ids"] == 1 and block.capacity == IMAGE_SIZE // 512
        assert saved_slot.transport.queues[0].next_available == 1
        assert saved.inflight is not None  # INFLIGHT_SHMFD: the record travels too

        with avmm_backend("blk", tmp_path / "b.sock", "--image", str(copy)):
            probe = await make_device(tmp_path / "b.sock", memory)
            try:
                before = await fetched(probe)
            finally:
                probe.close()
            assert before.serial.encode() != serial  # another path, another serial
            assert before.stats["get_ids"] == 0 and not before.writeback
            saved_slot, after = await restored_and_resumed(
                tmp_path / "b.sock", memory, saved_slot, queue, serial)
        assert after.serial.encode() == serial
        assert after.writeback and after.stats["get_ids"] == 2
        # Snapshot, restore, snapshot, restore (Cloud Hypervisor's #8918 class): the
        # second round loses nothing either, on yet another back-end process.
        with avmm_backend("blk", tmp_path / "c.sock", "--image", str(image)):
            _, again = await restored_and_resumed(
                tmp_path / "c.sock", memory, saved_slot, queue, serial)
        assert again.serial.encode() == serial
        assert again.writeback and again.stats["get_ids"] == 3
    finally:
        memory.close()


async def restored_and_resumed(sock: Path, memory: GuestMemory, saved: VirtioSlotState,
                               queue: DriverQueue, serial: bytes
                               ) -> tuple[VirtioSlotState, BlockBackendState]:
    """A fresh device on ``sock`` restored from ``saved`` and resumed, one more GET_ID
    (answered ``serial``, one ring position further), paused and saved again: the new
    slot state and the back-end's state in it."""
    fresh = await make_device(sock, memory)
    try:
        async with slot_for(fresh, memory) as slot:
            await in_thread(slot.restore_state, saved)  # it blocks: a thread, as the build
            used = queue.used_idx
            await slot.resume()
            assert await get_id(slot, queue) == serial
            assert queue.used_idx == used + 1
            await slot.pause()
            state = codec.decode(codec.encode(slot.save_state()), VirtioSlotState)
    finally:
        fresh.close()
    return state, backend_part(codec.decode(state.device_state, VhostUserFrontendState))[1]


async def fetched(device: VhostUserDevice) -> BlockBackendState:
    """What the back-end behind ``device`` holds now (a SAVE transfer)."""
    await device.fetch_device_state()
    return backend_part(device.save_state())[1]


async def test_a_state_the_backend_cannot_load_is_one_line(tmp_path: Path) -> None:
    """CHECK_DEVICE_STATE failure (a damaged state; a disk of another size) surfaces as
    one DeviceStateError line, and the device is left as it was."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    memory = GuestMemory(1 << 20)
    try:
        with avmm_backend("blk", tmp_path / "a.sock", "--image", str(image)):
            device = await make_device(tmp_path / "a.sock", memory)
            try:
                await device.fetch_device_state()
                state = device.save_state()
            finally:
                device.close()
            assert state.backend_state is not None
            outer = codec.decode(state.backend_state, BackendState)
            block = codec.decode(outer.device, BlockBackendState)
            # Saved from a disk of another size (the config space the front-end checks
            # is this back-end's: only the back-end can tell).
            other_disk = codec.encode(BackendState(
                outer.device_id, outer.queue_count, outer.features, outer.kind,
                codec.encode(BlockBackendState(
                    block.capacity * 2, block.read_only, block.serial, block.writeback,
                    block.can_punch_holes, block.can_zero_range, block.stats))))
            for bad in (state.backend_state[:-3], other_disk):
                device = await make_device(tmp_path / "a.sock", memory)
                try:
                    damaged = dataclasses.replace(state, backend_state=bad)
                    with pytest.raises(DeviceStateError) as error:
                        await in_thread(device.restore_state, damaged)
                    message = str(error.value)
                    assert "\n" not in message and "refused the saved device state" in message
                    assert "CHECK_DEVICE_STATE" in message
                    assert device.connected  # the connection is still in step
                finally:
                    device.close()
    finally:
        memory.close()


@pytest.mark.qemu
async def test_qemu_storage_daemon_saves_and_restores_through_ring_bases(
    tmp_path: Path,
) -> None:
    """qemu-storage-daemon has no DEVICE_STATE: its state is None, the ring positions
    come from GET_VRING_BASE, and a restore onto a new daemon (on a new socket) takes
    the state and serves from the saved position."""
    if shutil.which("qemu-storage-daemon") is None:
        require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    memory = GuestMemory(1 << 20)
    try:
        with storage_daemon(image, tmp_path / "a.sock"):
            device = await make_device(tmp_path / "a.sock", memory)
            assert not device.protocol_features & DEVICE_STATE
            async with slot_for(device, memory) as slot:
                queue = ring(memory)
                driver = Driver(slot.transport)
                await in_thread(driver.bring_up, (0,), 16, VIRTIO_F_VERSION_1)
                await get_id(slot, queue)
                await get_id(slot, queue)
                await slot.pause()
                saved = device.save_state()
                assert slot.transport.queues[0].state.next_available == 2
            device.close()
        assert saved.backend_state is None
        saved = codec.decode(codec.encode(saved), VhostUserFrontendState)
        with storage_daemon(image, tmp_path / "b.sock"):
            fresh = await make_device(tmp_path / "b.sock", memory)
            try:
                await in_thread(fresh.restore_state, saved)
                assert fresh.save_state() == saved
            finally:
                fresh.close()
    finally:
        memory.close()


# -- hostile and lacking back-ends (scripted) ------------------------------------------

_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<III")
REPLY_ACK = 1 << ProtocolFeature.REPLY_ACK
PROTOCOL_MQ = 1 << ProtocolFeature.MQ
NO_FD = 1 << 8
BASE_AT_STOP = 7


class StateBackend(ScriptedBackend):
    """A scripted back-end that offers DEVICE_STATE and answers SET_DEVICE_STATE_FD as
    ``mode`` says: "ok" (a few bytes, then end-of-file; CHECK says 0), "refuse",
    "check_fails", "flood" (more than any front-end should buffer), "never_close"
    (some bytes, then the pipe stays open), "silent" (no answer at all) or
    "wrong_reply" (the reply of another request). GET_VRING_BASE answers
    :data:`BASE_AT_STOP`."""

    def __init__(self, path: Path, mode: str = "ok", **kwargs: object) -> None:
        kwargs.setdefault("features", VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
        kwargs.setdefault("protocol_features", REPLY_ACK | DEVICE_STATE)
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.mode = mode
        self.state_fds: list[int] = []
        self.loaded = bytearray()

    def _answer(self, conn: socket.socket, request: Request, payload: bytes) -> None:
        conn.sendall(_HEADER.pack(int(request), 0x1 | 0x4, len(payload)) + payload)

    def _handle(self, conn: socket.socket, request: Request, flags: int, payload: bytes,
                fds: list[int]) -> None:
        if request == Request.GET_VRING_BASE:
            with self._lock:
                self.requests.append((request, payload))
            index = struct.unpack_from("<I", payload)[0]
            self._answer(conn, request, struct.pack("<II", index, BASE_AT_STOP))
        elif request == Request.SET_DEVICE_STATE_FD:
            with self._lock:
                self.requests.append((request, payload))
            direction = struct.unpack_from("<I", payload)[0]
            self.state_fds.extend(fds)
            fd = fds[0]
            mode = self.mode
            if mode == "silent":
                return
            if mode == "refuse":
                self._answer(conn, request, _U64.pack(1 | NO_FD))
                return
            if mode == "wrong_reply":
                self._answer(conn, Request.GET_FEATURES, _U64.pack(0))
                return
            self._answer(conn, request, _U64.pack(NO_FD))
            if direction == 1:  # load: read to end-of-file in a thread
                threading.Thread(target=self._read_all, args=(fd,), daemon=True).start()
            elif mode == "flood":
                threading.Thread(target=self._flood, args=(fd,), daemon=True).start()
            else:
                os.write(fd, b"hello")
                if mode != "never_close":
                    self.state_fds.remove(fd)
                    os.close(fd)
        elif request == Request.CHECK_DEVICE_STATE:
            with self._lock:
                self.requests.append((request, payload))
            self._answer(conn, request, _U64.pack(1 if self.mode == "check_fails" else 0))
        else:
            super()._handle(conn, request, flags, payload, fds)

    def _read_all(self, fd: int) -> None:
        while data := os.read(fd, 65536):
            self.loaded += data

    def _flood(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(65536))

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for fd in self.state_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


async def entropy_device(sock: Path, memory: GuestMemory, **kwargs: object
                         ) -> VhostUserDevice:
    return await trio.to_thread.run_sync(
        lambda: VhostUserDevice(sock, device_id=DeviceId.ENTROPY, memory=memory,
                                queue_size=16, **kwargs))  # type: ignore[arg-type]


@asynccontextmanager
async def paused_after_running(backend: StateBackend, sock: Path
                               ) -> AsyncIterator[tuple[VhostUserDevice, VirtioMmioSlot]]:
    """A device on ``backend`` whose rings ran and were stopped (the device paused)."""
    memory = GuestMemory(1 << 20)
    try:
        device = await entropy_device(sock, memory)
        try:
            async with slot_for(device, memory) as slot:
                driver = Driver(slot.transport)
                await in_thread(driver.bring_up, (0,))
                await in_thread(wait_until, lambda: backend.seen(Request.SET_VRING_ENABLE)
                                >= 1, 20.0, "bring-up")
                with trio.fail_after(30):  # far above STATE_TIMEOUT_S: no hang
                    await slot.pause()
                assert backend.seen(Request.GET_VRING_BASE) == 1
                yield device, slot
        finally:
            device.close()
    finally:
        memory.close()


@pytest.mark.parametrize(("mode", "reason", "kept"), [
    ("refuse", "SET_DEVICE_STATE_FD failed", True),
    ("check_fails", "CHECK_DEVICE_STATE answered 1", True),
    ("flood", "more than 1048576 bytes", False),
    ("never_close", "TooSlowError", False),
    ("silent", "TooSlowError", False),
    ("wrong_reply", "expected the reply to SET_DEVICE_STATE_FD", False),
])
async def test_a_hostile_backend_cannot_hang_or_crash_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, reason: str, kept: bool,
) -> None:
    """Each misbehaviour ends the transfer within STATE_TIMEOUT_S: save_state refuses
    with one line naming it, the ring positions are kept, and a back-end that broke
    the protocol or hung is dropped (its rings were already stopped)."""
    monkeypatch.setattr("avmm.vhost.frontend.STATE_TIMEOUT_S", 0.5)
    sock = tmp_path / "be.sock"
    with StateBackend(sock, mode) as backend:
        async with paused_after_running(backend, sock) as (device, slot):
            assert backend.seen(Request.SET_DEVICE_STATE_FD) == 1
            with pytest.raises(DeviceStateError) as error:
                device.save_state()
            message = str(error.value)
            assert "\n" not in message and reason in message, message
            assert device.connected is kept
            assert device.stop_unconfirmed is None  # nothing lingers: rings stopped
            assert slot.transport.queues[0].state.next_available == BASE_AT_STOP


async def test_a_good_scripted_backend_state_is_saved(tmp_path: Path) -> None:
    """The same back-end, behaving: the bytes it wrote are the saved state, and the
    kept state is refused once the rings have run again."""
    sock = tmp_path / "be.sock"
    with StateBackend(sock, "ok") as backend:
        async with paused_after_running(backend, sock) as (device, slot):
            state = device.save_state()
            assert state.backend_state == b"hello"
            assert backend.seen(Request.CHECK_DEVICE_STATE) == 1
            await slot.resume()  # the rings run again
            await in_thread(wait_until, lambda: backend.seen(Request.SET_VRING_ENABLE)
                            >= 2, 20.0, "second bring-up")
            with pytest.raises(DeviceStateError, match="not current"):
                device.save_state()


async def test_a_restored_device_starts_its_rings_at_the_saved_bases(
    tmp_path: Path,
) -> None:
    """Restore on a new back-end at a new socket: the saved state is loaded through
    the pipe, and the first run gives SET_VRING_BASE the position GET_VRING_BASE gave
    at the save, not the used idx in guest memory (0 here)."""
    with StateBackend(tmp_path / "a.sock") as backend:
        async with paused_after_running(backend, tmp_path / "a.sock") as (_, slot):
            saved = codec.decode(codec.encode(slot.save_state()), VirtioSlotState)
    memory = GuestMemory(1 << 20)
    try:
        with StateBackend(tmp_path / "b.sock") as fresh_backend:
            fresh = await entropy_device(tmp_path / "b.sock", memory)
            try:
                async with slot_for(fresh, memory) as slot:
                    await in_thread(slot.restore_state, saved)
                    await in_thread(wait_until, lambda: bytes(fresh_backend.loaded)
                                    == b"hello", 10.0, "the state loaded")
                    assert fresh_backend.seen(Request.SET_VRING_BASE) == 0
                    await slot.resume()
                    await in_thread(wait_until, lambda: fresh_backend.seen(
                        Request.SET_VRING_ENABLE) >= 1, 20.0, "bring-up")
            finally:
                fresh.close()
        bases = [payload for request, payload in fresh_backend.requests
                 if request == Request.SET_VRING_BASE]
        assert bases == [struct.pack("<II", 0, BASE_AT_STOP)]
    finally:
        memory.close()


async def test_after_a_dropped_save_the_resume_reconnects_at_the_exact_bases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A back-end dropped while its state was being saved (it answered out of step)
    had its rings stopped cleanly first: the reconnect at resume gives the new
    back-end the positions GET_VRING_BASE gave, not the used idx in guest memory."""
    monkeypatch.setattr("avmm.vhost.frontend.STATE_TIMEOUT_S", 0.5)
    sock = tmp_path / "be.sock"
    with StateBackend(sock, "wrong_reply") as backend:
        async with paused_after_running(backend, sock) as (device, slot):
            assert not device.connected
            backend.__exit__(None, None, None)  # the old back-end goes away
            sock.unlink()
            with StateBackend(sock) as again:
                await slot.resume()
                await in_thread(wait_until, lambda: again.seen(Request.SET_VRING_ENABLE)
                                >= 1, 20.0, "bring-up after the reconnect")
                bases = [payload for request, payload in again.requests
                         if request == Request.SET_VRING_BASE]
                assert bases == [struct.pack("<II", 0, BASE_AT_STOP)]
                assert device.reconnects == 1


@pytest.mark.parametrize(("lacking", "reason"), [
    ({"protocol_features": REPLY_ACK}, "VHOST_USER_PROTOCOL_F_DEVICE_STATE"),
    ({"features": VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES},
     "was offered features 0x10"),
    ({"protocol_features": REPLY_ACK | DEVICE_STATE | PROTOCOL_MQ, "queue_num": 2},
     "saved with 1 queues"),
])
async def test_a_restore_onto_a_backend_lacking_what_the_snapshot_used_is_refused(
    tmp_path: Path, lacking: dict[str, object], reason: str,
) -> None:
    """One line, naming what is missing; nothing is sent to the back-end."""
    memory = GuestMemory(1 << 20)
    try:
        full = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | (1 << 4)
        with StateBackend(tmp_path / "a.sock", features=full):
            device = await entropy_device(tmp_path / "a.sock", memory)
            saved = device.save_state()
            device.close()
        with StateBackend(tmp_path / "b.sock", **{"features": full, **lacking}) as backend:
            fresh = await entropy_device(tmp_path / "b.sock", memory,
                                         num_queues=2 if "queue_num" in lacking else None)
            try:
                with pytest.raises(DeviceStateError) as error:
                    await in_thread(fresh.restore_state, saved)
            finally:
                fresh.close()
        message = str(error.value)
        assert "\n" not in message and reason in message, message
        assert backend.seen(Request.SET_DEVICE_STATE_FD) == 0
    finally:
        memory.close()
