"""avmm's own dirty marks, path by path: every write a device or a virtqueue makes into
guest memory is marked, so that a migration sends the page again.

Each test sets the driver's buffers up, then starts a :class:`WriteWatch` (a copy of
guest memory, and avmm's marks on), lets the device write, and checks the invariant a
migration relies on: every page that changed since the copy is marked. The pages the
device wrote are only ever written by the device here (the driver's own writes happen
before the watch), so removing a path's marking fails its test.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from avmm.memory import PAGE_SIZE, ByteArrayMemory
from avmm.migration.dirty import DirtyMarks, PageSet
from avmm.virtio import blk_fast
from avmm.virtio.blk import BlockDevice, RequestType
from avmm.virtio.console import ConsoleDevice
from avmm.virtio.net import NET_HEADER_SIZE, VIRTIO_NET_F_MRG_RXBUF, NetDevice
from avmm.virtio.rng import RngDevice
from tests.virtio.queue_helpers import DriverQueue, make_queue
from tests.virtio.test_blk import header, make_image, service
from tests.virtio.test_console import Output
from tests.virtio.test_net import MAC, FakeTap, Guest, frame, running, until


class WriteWatch:
    """A copy of ``memory`` and avmm's marks, started together (a migration's first
    round): :meth:`changed_pages` are the pages written since, :meth:`marked_pages`
    what the marks say."""

    def __init__(self, memory: ByteArrayMemory) -> None:
        self.memory = memory
        self.pages = memory.size // PAGE_SIZE
        self.copy = bytes(memory.data)
        self.marks = DirtyMarks(memory.regions, self.pages)
        memory.dirty = self.marks

    def changed_pages(self) -> set[int]:
        data, copy = self.memory.data, self.copy
        return {page for page in range(self.pages)
                if data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
                != copy[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]}

    def marked_pages(self) -> set[int]:
        return set(PageSet.from_bitmap(self.marks.take(), self.pages))

    def check(self, *must_change: int) -> set[int]:
        """Every changed page is marked; the pages of the guest addresses
        ``must_change`` changed (the path under test did write)."""
        self.memory.dirty = None
        changed = self.changed_pages()
        for address in must_change:
            assert address // PAGE_SIZE in changed, f"0x{address:x} was not written"
        missed = changed - self.marked_pages()
        assert not missed, f"pages written but not marked: {sorted(missed)}"
        return changed


def skip_to(driver: DriverQueue, page_offset: int = 0) -> None:
    """Make the driver's next buffer start at ``page_offset`` into a page after the
    rings' pages, so that what the device writes there is on pages of its own."""
    here = driver.alloc_data(0, alignment=1)
    gap = (page_offset - here) % PAGE_SIZE or PAGE_SIZE
    driver.alloc_data(gap, alignment=1)


@contextmanager
def watching(memory: ByteArrayMemory, *must_change: int) -> Iterator[WriteWatch]:
    watch = WriteWatch(memory)
    yield watch
    watch.check(*must_change)


# -- the virtqueue -------------------------------------------------------------------------


def test_push_marks_the_used_ring() -> None:
    queue, driver = make_queue(16, base_address=0x3000)
    driver.add_chain(writable=[64])
    memory = driver.memory
    chain = queue.pop(memory)
    assert chain is not None
    with watching(memory, driver.used_ring):
        queue.push(memory, chain.head, 5)
    assert driver.used() == [(chain.head, 5)]


def test_notification_flags_are_marked() -> None:
    queue, driver = make_queue(16, event_idx=True)
    memory = driver.memory
    driver.add_chain(writable=[8])
    assert queue.pop(memory) is not None
    # avail_event: the used ring's last field, written by the device.
    with watching(memory, driver.used_ring + 4 + 8 * 16):
        queue.enable_notifications(memory)
    queue, driver = make_queue(16)
    with watching(driver.memory, driver.used_ring):
        queue.disable_notifications(driver.memory)


def test_chain_write_marks_every_buffer_it_fills() -> None:
    queue, driver = make_queue(16, memory_size=1 << 20)
    head = driver.add_chain(readable=[b"hdr"], writable=[100, 2 * PAGE_SIZE + 3, 30])
    memory = driver.memory
    chain = queue.pop(memory)
    assert chain is not None
    buffers = driver.chains[head].writable
    with watching(memory, *(address for address, _ in buffers)) as watch:
        written = chain.write(memory, os.urandom(chain.writable_length))
    assert written == chain.writable_length
    # More than 2 pages of data: at least three pages changed, every one marked.
    assert len(watch.changed_pages()) >= 3


# -- virtio-blk ----------------------------------------------------------------------------


def test_blk_read_marks_the_data_the_status_and_the_used_ring(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 64 * 1024, os.urandom(64 * 1024))
    with BlockDevice(image) as device:
        queue, driver = make_queue(16, memory_size=1 << 20)
        memory = driver.memory
        skip_to(driver)
        head = driver.add_chain(readable=[header(RequestType.IN, 2)],
                                writable=[512, 3 * PAGE_SIZE + 512, 1])
        buffers = driver.chains[head].writable
        with watching(memory, driver.used_ring, *(address for address, _ in buffers)):
            assert service(device, queue, memory) == 1
        data = driver.writable_data(head)
        assert data[:-1] == image.read_bytes()[1024:1024 + len(data) - 1]
        assert data[-1] == 0  # VIRTIO_BLK_S_OK


@pytest.fixture
def c_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """BlockDevices made after it serve IN and OUT in the C loop (avmm.virtio.blk_fast),
    as the I/O thread does."""
    if blk_fast._blk_ffi is None:
        pytest.fail("avmm.virtio._blk_ffi is not built (run make venv)")
    monkeypatch.setattr(blk_fast, "ENABLED", True)


@pytest.mark.parametrize("indirect", [False, True])
def test_blk_c_loop_read_marks_the_data_the_status_and_the_used_ring(
        c_loop: None, tmp_path: Path, indirect: bool) -> None:
    image = make_image(tmp_path / "disk.img", 64 * 1024, os.urandom(64 * 1024))
    with BlockDevice(image) as device:
        queue, driver = make_queue(16, memory_size=1 << 20)
        memory = driver.memory
        skip_to(driver)
        head = driver.add_chain(readable=[header(RequestType.IN, 2)],
                                writable=[512, 3 * PAGE_SIZE + 512, 1], indirect=indirect)
        buffers = driver.chains[head].writable
        with watching(memory, driver.used_ring, *(address for address, _ in buffers)):
            device.serve_batch(queue, memory, lambda index: None)
        assert device.stats.reads == 1 and device.stats.batches == 1  # one C batch
        data = driver.writable_data(head)
        assert data[:-1] == image.read_bytes()[1024:1024 + len(data) - 1]
        assert data[-1] == 0  # VIRTIO_BLK_S_OK


def test_blk_c_loop_marks_what_a_failed_read_may_have_written(
        c_loop: None, tmp_path: Path) -> None:
    """A read the C loop gives up on (the image came back short: another process cut
    it) leaves the request to the Python path, but the part that landed in the guest's
    buffers is marked all the same: the Python path may never take that chain again (a
    pause, or a driver that rewrote it)."""
    image = make_image(tmp_path / "disk.img", 64 * 1024, os.urandom(64 * 1024))
    with BlockDevice(image) as device:
        queue, driver = make_queue(16, memory_size=1 << 20)
        memory = driver.memory
        skip_to(driver)
        head = driver.add_chain(readable=[header(RequestType.IN, 0)],
                                writable=[2 * PAGE_SIZE, 1])
        os.truncate(image, PAGE_SIZE + 512)
        fast = device._fast
        assert fast is not None and fast.usable(memory)
        with watching(memory, driver.chains[head].writable[0][0]):
            done = fast.serve(queue, memory, device.fd, device.capacity, writes=False,
                              limit=16)
        assert (done.requests, done.stop) == (0, blk_fast.SLOW)


def test_blk_c_loop_write_marks_the_status(c_loop: None, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    with BlockDevice(image) as device:
        device.writeback = True  # what a driver with VIRTIO_BLK_F_FLUSH gets: C serves OUT
        queue, driver = make_queue(16, memory_size=1 << 20)
        memory = driver.memory
        skip_to(driver)
        head = driver.add_chain(readable=[header(RequestType.OUT, 6), b"\x5a" * 512],
                                writable=[1])
        (status_address, _), = driver.chains[head].writable
        memory.write(status_address, b"\xee")  # so that OK (0) is a change
        with watching(memory, driver.used_ring, status_address):
            device.serve_batch(queue, memory, lambda index: None)
        assert device.stats.writes == 1 and device.stats.batches == 1  # one C batch
        assert driver.writable_data(head) == b"\x00"
        assert image.read_bytes()[6 * 512:7 * 512] == b"\x5a" * 512


def test_blk_status_byte_alone_is_marked(tmp_path: Path) -> None:
    """A request that writes nothing but its status (FLUSH; its status byte on a page
    of its own)."""
    image = make_image(tmp_path / "disk.img")
    with BlockDevice(image) as device:
        queue, driver = make_queue(16, memory_size=1 << 20)
        memory = driver.memory
        skip_to(driver)
        head = driver.add_chain(readable=[header(RequestType.FLUSH)], writable=[1])
        (status_address, _), = driver.chains[head].writable
        memory.write(status_address, b"\xee")  # so that OK (0) is a change
        with watching(memory, status_address):
            service(device, queue, memory)
        assert driver.writable_data(head) == b"\x00"


def test_blk_get_id_marks_the_identity(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    with BlockDevice(image, serial="dirty-serial") as device:
        queue, driver = make_queue(16, memory_size=1 << 20)
        memory = driver.memory
        # The 16-byte header ends a page; the identity starts the next, and the status
        # byte is a page further (past a spare page-sized buffer).
        skip_to(driver, PAGE_SIZE - 16)
        head = driver.add_chain(readable=[header(RequestType.GET_ID)],
                                writable=[20, PAGE_SIZE, 1])
        (id_address, _), _spare, _status = driver.chains[head].writable
        assert id_address % PAGE_SIZE == 0
        with watching(memory, id_address):
            service(device, queue, memory)
        assert driver.writable_data(head)[:12] == b"dirty-serial"


# -- virtio-net receive --------------------------------------------------------------------


async def receive(guest: Guest, device: NetDevice, peer: socket.socket,
                  frames: list[bytes], chains: list[list[int]], used: int,
                  page_offset: int = 0, page_each: bool = False) -> list[int]:
    """Give receive chains of the given writable sizes (the first at ``page_offset``
    into a page of its own; with ``page_each`` every chain on pages of its own), then
    (watched) the frames from the tap; returns the heads."""
    async with running(device, guest.context):
        old = guest.rx.avail_idx
        skip_to(guest.rx, page_offset)
        heads = []
        for sizes in chains:
            heads.append(guest.rx.add_chain(writable=sizes))
            if page_each:
                skip_to(guest.rx)
        guest.kick_if_needed(0, old)
        await trio.testing.wait_all_tasks_blocked()
        # The chains the frames fill (the rest stay the driver's, untouched).
        buffers = [address for head in heads[:used]
                   for address, _ in guest.rx.chains[head].writable]
        with watching(guest.memory, guest.rx.used_ring, *buffers):
            for data in frames:
                peer.send(bytes(NET_HEADER_SIZE) + data)
            await until(lambda: guest.rx.used_idx == used)
            await trio.testing.wait_all_tasks_blocked()
    return heads


async def test_net_receive_into_one_buffer_is_marked() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        incoming = frame(os.urandom(100), 1514)
        heads = await receive(guest, NetDevice(FakeTap(a), mac=MAC), b, [incoming],
                              [[1526]], 1)
        assert guest.rx.writable_data(heads[0], 1526)[12:] == incoming


async def test_net_receive_into_a_chain_of_buffers_is_marked() -> None:
    """Several writable buffers in one chain: readv straight into all of them (the
    last one runs into the next page, which only readv writes)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest()
        incoming = frame(os.urandom(1400), 1514)
        heads = await receive(guest, NetDevice(FakeTap(a), mac=MAC), b, [incoming],
                              [[7, 5, 700, 814]], 1, page_offset=PAGE_SIZE - 112)
        assert guest.rx.writable_data(heads[0], 1526)[12:] == incoming


async def test_net_mergeable_receive_is_marked() -> None:
    """A frame spread over three chains: the bounce buffer copied into the later ones,
    the header with num_buffers written into the first."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        guest = Guest(features=VIRTIO_NET_F_MRG_RXBUF)
        incoming = frame(os.urandom(1500), 1514)
        # The first buffer straddles a page boundary: its second page holds only frame
        # data that readv put there.
        await receive(guest, NetDevice(FakeTap(a), mac=MAC), b, [incoming],
                      [[600], [600], [600], [600]], 3, page_offset=PAGE_SIZE - 100,
                      page_each=True)


# -- console and entropy -------------------------------------------------------------------


async def test_console_input_is_marked() -> None:
    guest = Guest()
    device = ConsoleDevice(output=Output())
    rx = guest.drivers[0]
    async with running(device, guest.context):
        head = rx.add_chain(writable=[PAGE_SIZE, 64])
        guest.context.kick(0)
        await trio.testing.wait_all_tasks_blocked()
        buffers = [address for address, _ in rx.chains[head].writable]
        with watching(guest.memory, rx.used_ring, *buffers):
            await device.send_input(os.urandom(PAGE_SIZE + 10))
            await trio.testing.wait_all_tasks_blocked()
    assert rx.used() == [(head, PAGE_SIZE + 10)]


async def test_entropy_is_marked() -> None:
    guest = Guest(1)
    driver = guest.drivers[0]
    device = RngDevice()
    head = driver.add_chain(writable=[100, 2 * PAGE_SIZE])
    buffers = [address for address, _ in driver.chains[head].writable]
    with watching(guest.memory, driver.used_ring, *buffers):
        async with running(device, guest.context):
            guest.context.kick(0)
            await trio.testing.wait_all_tasks_blocked()
    assert driver.used() == [(head, 100 + 2 * PAGE_SIZE)]
