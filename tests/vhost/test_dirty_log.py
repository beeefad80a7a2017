"""vhost-user dirty logging for live migration (issue 13, item 3): the front-end hands a
back-end the log (LOG_SHMFD, SET_LOG_BASE, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG) and reads
the pages it wrote; avmm's back-end SDK logs them; a back-end without logging is named
in one line, up front.

The front-end runs in a virtio-mmio slot without KVM (tests/virtio/slot_harness.py); the
test plays the guest's driver: block reads (the back-end writes the data into guest
buffers) and writes (the back-end writes only the status byte).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from avmm.memory import GuestMemory
from avmm.migration.dirty import PageSet
from avmm.vhost import dirty_log
from avmm.vhost.frontend import VhostFrontendError, VhostUserDevice
from avmm.vhost.protocol import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Message,
    ProtocolFeature,
    Request,
    encode_message,
    receive_message,
)
from avmm.virtio.device import VIRTIO_F_VERSION_1, DeviceId
from avmm.vm_virtio import VirtioMmioSlot
from tests.prerequisites import require
from tests.vhost.frontend_double import MemfdMemory, connected, served
from tests.vhost.scripted_backend import ScriptedBackend
from tests.vhost.test_frontend import avmm_backend, storage_daemon
from tests.virtio.queue_helpers import DriverQueue
from tests.virtio.slot_harness import OK_STATUS, RING_BASE, Driver, make_slot

PAGE = 4096
MEMORY_SIZE = 4 << 20
IMAGE_SIZE = 1 << 20
#: The driver's data buffers: well away from the rings (slot_harness puts queue 0's
#: at RING_BASE), so that the pages the back-end writes are told apart.
DATA = 0x200000
BLK_IN, BLK_OUT = 0, 1
LOG_SHMFD = 1 << ProtocolFeature.LOG_SHMFD
REPLY_ACK = 1 << ProtocolFeature.REPLY_ACK


def pages_of(extents: list[tuple[int, int]]) -> set[int]:
    return {page for address, length in extents
            for page in range(address // PAGE, (address + length - 1) // PAGE + 1)}


@contextmanager
def blk_backend(kind: str, image: Path, sock: Path) -> Iterator[object]:
    if kind == "qsd":
        if shutil.which("qemu-storage-daemon") is None:
            require("qemu-storage-daemon is not installed (make deps installs qemu-system-x86)")
        with storage_daemon(image, sock) as process:
            yield process
    else:
        with avmm_backend("blk", sock, "--image", str(image)) as process:
            yield process


async def make_device(sock: Path, memory: GuestMemory) -> VhostUserDevice:
    """The front-end's device; its handshake blocks, so in a thread (as the VM build)."""
    return await trio.to_thread.run_sync(
        lambda: VhostUserDevice(sock, device_id=DeviceId.BLOCK, memory=memory,
                                queue_size=16))


@asynccontextmanager
async def running_slot(device: VhostUserDevice, memory: GuestMemory
                       ) -> AsyncIterator[tuple[VirtioMmioSlot, DriverQueue]]:
    """``device`` in a slot whose driver has set DRIVER_OK with queue 0 up."""
    slot = make_slot(device, memory)
    try:
        async with trio.open_nursery() as nursery:
            slot.attach(nursery)
            queue = DriverQueue(memory, 16, descriptor_table=RING_BASE,
                                available_ring=RING_BASE + 0x1000,
                                used_ring=RING_BASE + 0x2000, data_address=DATA,
                                data_size=0x100000)
            driver = Driver(slot.transport)
            await trio.to_thread.run_sync(driver.bring_up, (0,), 16, VIRTIO_F_VERSION_1)
            assert driver.status == OK_STATUS
            yield slot, queue
            nursery.cancel_scope.cancel()
    finally:
        slot.close()


async def request(slot: VirtioMmioSlot, queue: DriverQueue, kind: int, sector: int,
                  data: bytes = b"", read: int = 0) -> tuple[int, list[tuple[int, int]]]:
    """One block request through the back-end; its head and device-writable buffers."""
    readable = [struct.pack("<IIQ", kind, 0, sector)] + ([data] if data else [])
    head = queue.add_chain(readable, ([read] if read else []) + [1])
    os.eventfd_write(slot.kick_fds[0], 1)
    with trio.fail_after(30):
        while not (used := queue.used()):
            await trio.sleep(0.01)
    assert used[0][0] == head
    assert queue.writable_data(head)[-1] == 0, "the request failed"
    return head, list(queue.chains[head].writable)


@pytest.mark.parametrize("kind", ["avmm", "qsd"])
async def test_pages_the_backend_writes_are_in_collect_dirty(tmp_path: Path,
                                                             kind: str) -> None:
    """With logging started while the rings run, a block read's data pages, its status
    byte's page and the used ring's page come back from collect_dirty, and nothing
    else; a block write adds only its status byte's page and the used ring (the data
    pages were only read); the log starts empty after each collect; a pause and resume
    (the rings stopped and started again) keep logging on; stop_dirty_log turns it off
    and the device goes on serving."""
    image = tmp_path / "disk.img"
    contents = os.urandom(IMAGE_SIZE)
    image.write_bytes(contents)
    memory = GuestMemory(MEMORY_SIZE)
    pages = MEMORY_SIZE // PAGE
    used_ring = pages_of([(RING_BASE + 0x2000, 4 + 8 * 16)])
    try:
        with blk_backend(kind, image, tmp_path / "blk.sock"):
            device = await make_device(tmp_path / "blk.sock", memory)
            try:
                assert device.can_log_dirty and device.dirty_log_problem() is None
                async with running_slot(device, memory) as (slot, queue):
                    await request(slot, queue, BLK_IN, 0, read=512)  # rings are up
                    await device.start_dirty_log(MEMORY_SIZE)

                    head, writable = await request(slot, queue, BLK_IN, 8, read=3 * PAGE)
                    assert queue.writable_data(head)[:3 * PAGE] == \
                        contents[8 * 512:8 * 512 + 3 * PAGE]
                    dirty = device.collect_dirty()
                    assert isinstance(dirty, PageSet) and dirty.size == pages
                    assert set(dirty) == pages_of(writable) | used_ring
                    assert set(device.collect_dirty()) <= used_ring

                    _, writable = await request(slot, queue, BLK_OUT, 40,
                                                data=os.urandom(2 * PAGE))
                    assert set(device.collect_dirty()) == pages_of(writable) | used_ring
                    assert (tmp_path / "disk.img").read_bytes()[40 * 512:40 * 512 + 16] \
                        != contents[40 * 512:40 * 512 + 16]

                    await slot.pause()
                    await slot.resume()
                    _, writable = await request(slot, queue, BLK_IN, 0, read=PAGE)
                    assert pages_of(writable) <= set(device.collect_dirty())

                    await device.stop_dirty_log()
                    with pytest.raises(VhostFrontendError, match="not on"):
                        device.collect_dirty()
                    head, _ = await request(slot, queue, BLK_IN, 0, read=512)
                    assert queue.writable_data(head)[:512] == contents[:512]
                    # And on again, after a stop: a second migration attempt.
                    await device.start_dirty_log(MEMORY_SIZE)
                    _, writable = await request(slot, queue, BLK_IN, 16, read=PAGE)
                    assert pages_of(writable) <= set(device.collect_dirty())
                    await device.stop_dirty_log()
            finally:
                device.close()
    finally:
        memory.close()


async def test_logging_started_before_driver_ok_applies_at_the_bring_up(
    tmp_path: Path,
) -> None:
    """start_dirty_log while no ring runs returns at once; the bring-up at DRIVER_OK
    hands the log over (the back-end's writes are logged from the first request)."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(IMAGE_SIZE))
    memory = GuestMemory(MEMORY_SIZE)
    try:
        with avmm_backend("blk", tmp_path / "blk.sock", "--image", str(image)):
            device = await make_device(tmp_path / "blk.sock", memory)
            try:
                await device.start_dirty_log(MEMORY_SIZE)
                async with running_slot(device, memory) as (slot, queue):
                    _, writable = await request(slot, queue, BLK_IN, 0, read=2 * PAGE)
                    assert pages_of(writable) <= set(device.collect_dirty())
                await device.stop_dirty_log()
            finally:
                device.close()
    finally:
        memory.close()


@pytest.mark.parametrize("kind", ["avmm", "qsd"])
async def test_a_backend_restarted_while_logging_gets_the_log_again(tmp_path: Path,
                                                                    kind: str) -> None:
    """The back-end is killed while logging is on and started again on the same
    socket: the reconnect's bring-up hands the new process the log, and what it writes
    is in collect_dirty."""
    image = tmp_path / "disk.img"
    contents = os.urandom(IMAGE_SIZE)
    image.write_bytes(contents)
    sock = tmp_path / "blk.sock"
    memory = GuestMemory(MEMORY_SIZE)
    try:
        with blk_backend(kind, image, sock) as process:
            device = await make_device(sock, memory)
            try:
                async with running_slot(device, memory) as (slot, queue):
                    await device.start_dirty_log(MEMORY_SIZE)
                    await request(slot, queue, BLK_IN, 0, read=512)
                    device.collect_dirty()
                    process.kill()  # type: ignore[attr-defined]
                    await trio.to_thread.run_sync(process.wait)  # type: ignore[attr-defined]
                    with contextlib.suppress(FileNotFoundError):
                        sock.unlink()  # the dead back-end's socket file
                    with blk_backend(kind, image, sock):
                        head, writable = await request(slot, queue, BLK_IN, 24,
                                                       read=2 * PAGE)
                        assert queue.writable_data(head)[:2 * PAGE] == \
                            contents[24 * 512:24 * 512 + 2 * PAGE]
                        assert device.reconnects >= 1
                        assert pages_of(writable) <= set(device.collect_dirty())
                        await device.stop_dirty_log()
            finally:
                device.close()
    finally:
        memory.close()


# -- back-ends that cannot log ---------------------------------------------------------


@pytest.mark.parametrize(("features", "protocol", "missing"), [
    (VHOST_F_LOG_ALL, REPLY_ACK, "VHOST_USER_PROTOCOL_F_LOG_SHMFD"),
    (0, REPLY_ACK | LOG_SHMFD, "VHOST_F_LOG_ALL"),
])
async def test_a_backend_that_cannot_log_is_named_in_one_line(
    tmp_path: Path, features: int, protocol: int, missing: str,
) -> None:
    """A back-end without LOG_SHMFD (or without VHOST_F_LOG_ALL): can_log_dirty is
    False, dirty_log_problem() says why in one line naming the device, the socket and
    the missing feature, and start_dirty_log refuses with that line."""
    sock = tmp_path / "scripted.sock"
    memory = GuestMemory(MEMORY_SIZE)
    try:
        with ScriptedBackend(sock, features=VIRTIO_F_VERSION_1
                             | VHOST_USER_F_PROTOCOL_FEATURES | features,
                             protocol_features=protocol):
            device = await make_device(sock, memory)
            try:
                assert not device.can_log_dirty
                problem = device.dirty_log_problem()
                assert problem is not None and "\n" not in problem
                assert missing in problem and str(sock) in problem
                assert device.name in problem
                with pytest.raises(VhostFrontendError) as error:
                    await device.start_dirty_log(MEMORY_SIZE)
                assert str(error.value) == problem
            finally:
                device.close()
    finally:
        memory.close()


class LogRefusingBackend(ScriptedBackend):
    """Offers logging, then answers SET_LOG_BASE with a value that is neither 0 nor the
    log's size (a failure)."""

    def _handle(self, conn: socket.socket, request: Request, flags: int, payload: bytes,
                fds: list[int]) -> None:
        if request == Request.SET_LOG_BASE:
            with self._lock:
                self.requests.append((request, payload))
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("<IIIQ", int(request), 0x5, 8, 7))
        else:
            super()._handle(conn, request, flags, payload, fds)


async def test_a_refused_log_fails_start_dirty_log_and_the_device_runs_on(
    tmp_path: Path,
) -> None:
    """A back-end that refuses the log at the bring-up: start_dirty_log fails with one
    line and logging is off again; the rings run (no DEVICE_NEEDS_RESET)."""
    sock = tmp_path / "scripted.sock"
    memory = GuestMemory(MEMORY_SIZE)
    try:
        with LogRefusingBackend(sock, features=VIRTIO_F_VERSION_1
                                | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL,
                                protocol_features=REPLY_ACK | LOG_SHMFD) as backend:
            device = await make_device(sock, memory)
            try:
                async with running_slot(device, memory) as (slot, _):
                    with pytest.raises(VhostFrontendError, match="refused the dirty log"):
                        await device.start_dirty_log(MEMORY_SIZE)
                    assert backend.seen(Request.SET_LOG_BASE) == 1
                    with pytest.raises(VhostFrontendError, match="not on"):
                        device.collect_dirty()
                    assert Driver(slot.transport).status == OK_STATUS  # no NEEDS_RESET
                    assert device.connected and device.reconnects == 0
            finally:
                device.close()
    finally:
        memory.close()


async def test_a_log_refused_at_the_bring_up_makes_collect_dirty_refuse(
    tmp_path: Path,
) -> None:
    """Logging started before DRIVER_OK, refused by the back-end at the bring-up: the
    device starts anyway and collect_dirty refuses with the back-end's refusal (the
    migration fails; the guest's disk does not)."""
    sock = tmp_path / "scripted.sock"
    memory = GuestMemory(MEMORY_SIZE)
    try:
        with LogRefusingBackend(sock, features=VIRTIO_F_VERSION_1
                                | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL,
                                protocol_features=REPLY_ACK | LOG_SHMFD) as backend:
            device = await make_device(sock, memory)
            try:
                await device.start_dirty_log(MEMORY_SIZE)
                async with running_slot(device, memory) as (slot, _):
                    with trio.fail_after(20):  # the device task's bring-up
                        while not backend.seen(Request.SET_VRING_ENABLE):
                            await trio.sleep(0.01)
                    assert backend.seen(Request.SET_LOG_BASE) == 1
                    with pytest.raises(VhostFrontendError, match="refused the dirty log"):
                        device.collect_dirty()
                    assert Driver(slot.transport).status == OK_STATUS
                await device.stop_dirty_log()
            finally:
                device.close()
    finally:
        memory.close()


# -- the back-end SDK against a hostile front-end --------------------------------------


async def test_the_backend_answers_a_log_it_cannot_use_and_keeps_the_connection(
    tmp_path: Path,
) -> None:
    """SET_LOG_BASE with an unsealed file, a file smaller than the log it describes, a
    zero size or no fd: answered 1 (the front-end waits for an answer), the connection
    stays; a good one is answered 0."""
    from avmm.virtio.rng import RngDevice

    async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
        await frontend.handshake(protocol=REPLY_ACK | LOG_SHMFD)
        assert frontend.protocol_features & LOG_SHMFD

        async def set_log_base(size: int, fds: list[int]) -> int:
            await frontend.send(Request.SET_LOG_BASE, {"mmap_size": size,
                                                       "mmap_offset": 0}, fds)
            answer = await frontend.receive()
            assert answer.reply and answer.request == Request.SET_LOG_BASE
            return int(answer.payload)

        unsealed = MemfdMemory(PAGE, seals=0)
        sealed = MemfdMemory(PAGE)
        try:
            assert await set_log_base(PAGE, [unsealed.fd]) == 1
            assert await set_log_base(2 * PAGE, [sealed.fd]) == 1
            assert await set_log_base(0, [sealed.fd]) == 1
            assert await set_log_base(PAGE, []) == 1
            assert await set_log_base(PAGE, [sealed.fd]) == 0
            assert await frontend.get(Request.GET_FEATURES) & VHOST_F_LOG_ALL
        finally:
            unsealed.close()
            sealed.close()


async def test_the_backend_logs_what_it_writes_for_a_qemu_like_frontend(
    tmp_path: Path,
) -> None:
    """A front-end that turns logging on while the ring runs, as QEMU does: SET_LOG_BASE
    (answered 0), SET_FEATURES toggling only VHOST_F_LOG_ALL and SET_VRING_ADDR changing
    only the log flag and address are taken on the running ring; other changes under
    it are still refused. The rng's buffer pages and the used ring's page (at the log
    address given) are then set in the log; after logging is turned off, nothing more
    is."""
    from avmm.vhost.protocol import VHOST_VRING_F_LOG
    from avmm.virtio.device import VIRTIO_F_EVENT_IDX
    from avmm.virtio.rng import RngDevice
    from tests.vhost.frontend_double import USER_BASE

    async with served(RngDevice(), tmp_path) as path, connected(path) as frontend:
        await frontend.handshake(protocol=REPLY_ACK | LOG_SHMFD)
        ring = frontend.add_ring(0)
        await frontend.start()
        driver = ring.driver
        log_area = MemfdMemory(PAGE)
        try:
            await frontend.send(Request.SET_LOG_BASE, {"mmap_size": PAGE,
                                                       "mmap_offset": 0}, [log_area.fd])
            assert (await frontend.receive()).payload == 0

            def address(flags: int, log: int, used: int = driver.used_ring) -> dict:
                return {"index": 0, "flags": flags,
                        "descriptor": USER_BASE + driver.descriptor_table,
                        "used": USER_BASE + used,
                        "available": USER_BASE + driver.available_ring, "log": log}

            nack = frontend.ack
            assert await nack(Request.SET_FEATURES,
                              frontend.features | VHOST_F_LOG_ALL | VIRTIO_F_EVENT_IDX) != 0
            assert await nack(Request.SET_VRING_ADDR,
                              address(VHOST_VRING_F_LOG, driver.used_ring,
                                      used=driver.used_ring + 0x1000)) != 0
            assert await nack(Request.SET_VRING_ADDR, address(0x2, 0)) != 0
            await frontend.set(Request.SET_FEATURES, frontend.features | VHOST_F_LOG_ALL)
            await frontend.set(Request.SET_VRING_ADDR,
                               address(VHOST_VRING_F_LOG, driver.used_ring))

            head = driver.add_chain(writable=[3 * PAGE])
            ring.kick()
            assert await ring.wait_used(1) == [(head, 3 * PAGE)]
            logged = int.from_bytes(log_area.data[:PAGE], "little")
            expected = pages_of(driver.chains[head].writable) | pages_of(
                [(driver.used_ring, 4 + 8 * driver.size)])
            assert {bit for bit in range(PAGE * 8) if logged >> bit & 1} == expected

            log_area.data[:PAGE] = bytes(PAGE)
            await frontend.set(Request.SET_FEATURES, frontend.features)
            await frontend.set(Request.SET_VRING_ADDR, address(0, 0))
            driver.add_chain(writable=[PAGE])
            ring.kick()
            await ring.wait_used(1)
            assert log_area.data[:PAGE] == bytes(PAGE)
        finally:
            log_area.close()


# -- the log itself ----------------------------------------------------------------------


def test_pages_are_numbered_by_guest_ram_file_offset() -> None:
    """The log is by guest physical address; collected pages are file pages, through
    the region table (RAM above the 32-bit MMIO hole sits right after low RAM in the
    file), and a back-end's marks outside every region are dropped."""
    regions = [SimpleNamespace(guest_address=0, size=1 << 20, file_offset=0),
               SimpleNamespace(guest_address=1 << 32, size=1 << 20, file_offset=1 << 20)]
    log = dirty_log.FrontendLog(regions, 2 << 20)
    backend = dirty_log.BackendLog(log.fd, log.size, 0)
    try:
        assert backend.mark(0x3000, 1) and backend.mark((1 << 32) + 0x5000, PAGE + 1)
        assert backend.mark(0x20_0000, 1)  # in the log, but in no region
        assert not backend.mark(log.size * 8 * PAGE, 1)  # past the log: not set
        taken = PageSet.from_bitmap(log.take().to_bytes(64, "little"), 512)
        assert list(taken) == [3, 256 + 5, 256 + 6]
        assert log.take() == 0
    finally:
        backend.close()
        log.close()


def test_misses_from_two_threads_are_counted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The RX and TX threads of a back-end's net mark the same log: writes past its end
    from both are all counted, and the warning about them comes once."""
    regions = [SimpleNamespace(guest_address=0, size=1 << 20, file_offset=0)]
    log = dirty_log.FrontendLog(regions, 1 << 20)
    writer = dirty_log.BackendLog(log.fd, log.size, 0)
    warnings: list[str] = []
    monkeypatch.setattr(dirty_log.log, "warning",
                        lambda event, **_: warnings.append(event))
    past = log.size * 8 * PAGE  # the first page the log does not cover
    misses = 20_000

    def miss() -> None:
        for _ in range(misses):
            writer.mark(past, 1)

    threads = [threading.Thread(target=miss) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert writer.missed == 2 * misses
        assert len(warnings) == 1
    finally:
        writer.close()
        log.close()


def test_concurrent_marks_are_never_lost() -> None:
    """Two back-ends (QEMU shares one log among its vhost devices) set interleaved bits
    of the same bytes from two threads while the front-end reads and clears the log:
    every bit set comes back exactly once or more, none is lost."""
    regions = [SimpleNamespace(guest_address=0, size=64 << 20, file_offset=0)]
    log = dirty_log.FrontendLog(regions, 64 << 20)
    writers = [dirty_log.BackendLog(log.fd, log.size, 0) for _ in range(2)]
    pages = (64 << 20) // PAGE
    done = threading.Event()

    def write(which: int) -> None:
        for _ in range(20):
            for page in range(which, pages, 2):
                writers[which].mark(page * PAGE, 1)
        done.set()

    seen = 0
    threads = [threading.Thread(target=write, args=(which,)) for which in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        while not done.is_set() or any(thread.is_alive() for thread in threads):
            seen |= log.take()
        for thread in threads:
            thread.join()
        seen |= log.take()
        assert seen == (1 << pages) - 1
    finally:
        for writer in writers:
            writer.close()
        log.close()


def test_a_set_log_base_reply_may_have_no_payload() -> None:
    """libvhost-user answers SET_LOG_BASE with a u64, DPDK with nothing: both parse."""

    class Wire:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def recvmsg(self, size: int, *_: object) -> tuple[bytes, list, int, None]:
            chunk, self.data = self.data[:size], self.data[size:]
            return chunk, [], 0, None

    for payload in (None, 8192):
        raw = encode_message(Message(Request.SET_LOG_BASE, payload, reply=True))
        message = trio.run(receive_message, Wire(raw))
        assert message.request == Request.SET_LOG_BASE and message.payload == payload
