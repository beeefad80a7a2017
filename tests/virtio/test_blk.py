"""virtio-blk over a raw image file: requests through a real VirtQueue, driven by the
DriverQueue test double, against a real file."""

from __future__ import annotations

import errno
import itertools
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest
import structlog
import trio

from avmm.errors import AvmmError
from avmm.memory import ByteArrayMemory
from avmm.virtio import blk
from avmm.virtio.blk import (
    BLOCK_CONFIG_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    BlockConfig,
    BlockDevice,
    DiskError,
    RequestType,
    Status,
)
from avmm.virtio.device import DeviceId, DeviceNeedsReset
from avmm.virtio.queue import QueueError, VirtQueue
from tests.prerequisites import require

from .queue_helpers import DriverQueue, make_queue

IN, OUT, FLUSH, GET_ID = RequestType.IN, RequestType.OUT, RequestType.FLUSH, RequestType.GET_ID
DISCARD, WRITE_ZEROES = RequestType.DISCARD, RequestType.WRITE_ZEROES
SECTOR = 512
IMAGE_SIZE = 64 * 1024
IO_FAILED = "disk I/O failed; the guest sees IOERR (logged once per kind)"


# -- plumbing -----------------------------------------------------------------------------


def pattern(size: int, seed: int = 1) -> bytes:
    """Recognisable bytes: every byte depends on its position and the seed."""
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(size))


def make_image(path: Path, size: int = IMAGE_SIZE, content: bytes | None = None) -> Path:
    path.write_bytes(pattern(size) if content is None else content)
    return path


def header(request_type: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", request_type, 0, sector)


def segment(sector: int, sectors: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, sectors, flags)


def split(data: bytes, *cuts: int) -> list[bytes]:
    """``data`` cut at the given offsets."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class FakeContext:
    """The DeviceContext a transport would give: one queue, kicks on demand, and a record
    of every used-buffer signal."""

    def __init__(self, driver: DriverQueue, queue: VirtQueue, features: int) -> None:
        self.memory = driver.memory
        self.queues = [queue]
        self.features = features
        self.signals: list[int] = []
        self.config_changes = 0
        self._kicks = 0
        self._kicked = trio.Event()
        self._signalled = trio.Event()

    def kick(self) -> None:
        self._kicks += 1
        self._kicked.set()

    async def wait_kick(self, queue_index: int) -> None:
        assert queue_index == 0
        while not self._kicks:
            self._kicked = trio.Event()
            await self._kicked.wait()
        self._kicks = 0

    def signal_used(self, queue_index: int) -> None:
        self.signals.append(queue_index)
        self._signalled.set()

    def signal_config_change(self) -> None:
        self.config_changes += 1

    async def wait_signal(self) -> None:
        self._signalled = trio.Event()
        await self._signalled.wait()


async def serve(device: BlockDevice, driver: DriverQueue, queue: VirtQueue, *,
                features: int = VIRTIO_BLK_F_FLUSH, until_used: int | None = None) -> FakeContext:
    """Run the device through trio until the used idx reaches ``until_used`` (default:
    every chain added so far), then cancel it."""
    context = FakeContext(driver, queue, features)
    target = driver.avail_idx if until_used is None else until_used
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            context.kick()
            while driver.used_idx != target:
                await context.wait_signal()
            nursery.cancel_scope.cancel()
    return context


def service(device: BlockDevice, queue: VirtQueue, memory: ByteArrayMemory) -> int:
    """One batch through the very steps run() takes, minus the worker thread; raises the
    batch's protocol error after completing what came before it."""
    batch = device.take_batch(queue, memory)
    result = device.process_batch(memory, batch)
    device.complete_batch(queue, memory, result)
    if result.error is not None:
        raise result.error
    return len(result.completions)


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def status_of(driver: DriverQueue, head: int) -> int:
    return driver.writable_data(head)[-1]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


@pytest.fixture
def device(image: Path):
    with BlockDevice(image) as device:
        yield device


# -- construction, features, config space -----------------------------------------------


def test_features_of_a_writable_disk(device: BlockDevice) -> None:
    assert device.device_id == DeviceId.BLOCK
    assert device.queue_max_sizes == (256,)
    features = device.device_features()
    assert features == (VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
                        | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)
    assert features == (1 << 2) | (1 << 6) | (1 << 9) | (1 << 13) | (1 << 14)


def test_features_of_a_read_only_disk(image: Path) -> None:
    with BlockDevice(image, read_only=True) as device:
        features = device.device_features()
    assert features == (1 << 2) | (1 << 5) | (1 << 6) | (1 << 9)
    assert features & VIRTIO_BLK_F_RO
    assert not features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)


def test_config_space_layout(device: BlockDevice) -> None:
    space = device.read_config(0, 64)
    # The spec's offsets (virtio 1.2 §5.2.4), read without the construct declaration.
    assert BLOCK_CONFIG_SIZE == 60
    assert struct.unpack_from("<Q", space, 0)[0] == IMAGE_SIZE // SECTOR  # capacity
    assert struct.unpack_from("<I", space, 12)[0] == 254  # seg_max
    assert struct.unpack_from("<I", space, 20)[0] == 512  # blk_size
    assert struct.unpack_from("<I", space, 36)[0] == blk.MAX_DISCARD_SECTORS
    assert struct.unpack_from("<I", space, 40)[0] == blk.MAX_DISCARD_SEG
    assert struct.unpack_from("<I", space, 44)[0] == blk.DISCARD_SECTOR_ALIGNMENT
    assert struct.unpack_from("<I", space, 48)[0] == blk.MAX_WRITE_ZEROES_SECTORS
    assert struct.unpack_from("<I", space, 52)[0] == blk.MAX_WRITE_ZEROES_SEG
    assert space[56] == 1  # write_zeroes_may_unmap
    assert space[57:] == bytes(7)  # unused1, then past the end
    parsed = BlockConfig.parse(space)
    assert parsed.capacity == 128 and parsed.blk_size == 512 and parsed.writeback == 0


def test_config_space_of_a_read_only_disk_has_no_discard_limits(image: Path) -> None:
    with BlockDevice(image, read_only=True) as device:
        space = device.read_config(0, BLOCK_CONFIG_SIZE)
    assert struct.unpack_from("<Q", space, 0)[0] == 128
    assert space[36:] == bytes(BLOCK_CONFIG_SIZE - 36)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8, 13])
def test_config_reads_at_any_offset(device: BlockDevice, size: int) -> None:
    whole = device.read_config(0, BLOCK_CONFIG_SIZE) + bytes(256)
    for offset in range(0, 80):
        assert device.read_config(offset, size) == whole[offset:offset + size], offset
    assert device.read_config(-1, size) == bytes(size)
    assert device.read_config(1 << 40, size) == bytes(size)
    assert device.read_config(4, 0) == b""


def test_capacity_hides_a_partial_last_sector(tmp_path: Path) -> None:
    path = make_image(tmp_path / "odd.img", 3 * SECTOR + 100)
    with structlog.testing.capture_logs() as logs, BlockDevice(path) as device:
        assert device.capacity == 3
        assert struct.unpack_from("<Q", device.read_config(0, 8))[0] == 3
    assert [entry["hidden_bytes"] for entry in logs] == [100]


def test_a_missing_image_is_a_disk_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    with pytest.raises(DiskError, match=r"nope\.img") as info:
        BlockDevice(missing)
    assert isinstance(info.value, AvmmError)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(DiskError, match="for reading:"):
        BlockDevice(missing, read_only=True)


def test_a_directory_is_not_a_disk(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=str(tmp_path)):
        BlockDevice(tmp_path, read_only=True)
    with pytest.raises(DiskError, match=str(tmp_path)):
        BlockDevice(tmp_path)


def test_close_is_idempotent(image: Path) -> None:
    device = BlockDevice(image)
    fd = device.fd
    device.close()
    device.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_default_serial_is_stable_and_per_image(tmp_path: Path) -> None:
    one, two = make_image(tmp_path / "one.img"), make_image(tmp_path / "two.img")
    with BlockDevice(one) as a, BlockDevice(one, read_only=True) as b, BlockDevice(two) as c:
        assert a.serial == b.serial != c.serial
        assert len(a.serial.encode()) == 20


def test_serial_is_checked(image: Path) -> None:
    with BlockDevice(image, serial="x" * 20) as device:
        assert device.serial == "x" * 20
    with pytest.raises(DiskError, match="longer than 20"):
        BlockDevice(image, serial="x" * 21)
    with pytest.raises(DiskError, match="not ASCII"):
        BlockDevice(image, serial="dísk")


# -- requests through trio --------------------------------------------------------------


async def test_write_then_read_round_trip(device: BlockDevice, image: Path) -> None:
    queue, driver = make_queue(size=16)
    data = pattern(3 * SECTOR, seed=9)
    write = driver.add_chain(readable=[header(OUT, 5), data], writable=[1])
    read = driver.add_chain(readable=[header(IN, 5)], writable=[3 * SECTOR, 1])
    context = await serve(device, driver, queue)
    assert driver.used() == [(write, 1), (read, 3 * SECTOR + 1)]
    assert status_of(driver, write) == Status.OK == status_of(driver, read)
    assert driver.writable_data(read, 3 * SECTOR) == data
    content = image.read_bytes()
    assert content[5 * SECTOR:8 * SECTOR] == data
    assert content[:5 * SECTOR] == pattern(IMAGE_SIZE)[:5 * SECTOR]
    assert content[8 * SECTOR:] == pattern(IMAGE_SIZE)[8 * SECTOR:]
    # Both chains were available at the first kick: one batch, one signal.
    assert context.signals == [0]
    assert device.stats.reads == device.stats.writes == 1
    assert device.stats.bytes_read == device.stats.bytes_written == 3 * SECTOR
    assert device.stats.batches == 1


async def test_requests_arriving_later_are_served(device: BlockDevice) -> None:
    queue, driver = make_queue(size=16)
    context = FakeContext(driver, queue, VIRTIO_BLK_F_FLUSH)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            for round_ in range(3):
                head = driver.add_chain(readable=[header(IN, round_)], writable=[SECTOR + 1])
                context.kick()
                await context.wait_signal()
                assert driver.used() == [(head, SECTOR + 1)]
                start = round_ * SECTOR
                assert driver.writable_data(head, SECTOR) == pattern(IMAGE_SIZE)[
                    start:start + SECTOR]
            nursery.cancel_scope.cancel()
    assert context.signals == [0, 0, 0]


@pytest.mark.parametrize("indirect", [False, True])
def test_multi_segment_requests(device: BlockDevice, image: Path, indirect: bool) -> None:
    queue, driver = make_queue(size=64)
    data = pattern(4 * SECTOR, seed=3)
    # The header shares its buffer with the first data bytes; the data is cut unevenly.
    pieces = split(header(OUT, 10) + data, 5, 16 + 100, 16 + 612, 16 + 1800)
    write = driver.add_chain(readable=pieces, writable=[1], indirect=indirect)
    # Data in odd-sized buffers; the status shares its buffer with the last data bytes.
    read = driver.add_chain(readable=split(header(IN, 10), 3, 9),
                            writable=[7, 505, 1000, 536 + 1], indirect=indirect)
    assert service(device, queue, driver.memory) == 2
    assert driver.used() == [(write, 1), (read, 4 * SECTOR + 1)]
    assert status_of(driver, write) == status_of(driver, read) == Status.OK
    assert driver.writable_data(read, 4 * SECTOR) == data
    assert image.read_bytes()[10 * SECTOR:14 * SECTOR] == data


def test_status_goes_in_the_last_writable_byte_only(device: BlockDevice) -> None:
    queue, driver = make_queue(size=16)
    # An OUT with extra writable room: the status is its last byte, the rest untouched.
    head = driver.add_chain(readable=[header(OUT, 0), bytes(SECTOR)], writable=[4])
    driver.memory.write(driver.chains[head].writable[0][0], b"\xaa\xbb\xcc\xdd")
    service(device, queue, driver.memory)
    assert driver.used() == [(head, 1)]
    assert driver.writable_data(head) == b"\xaa\xbb\xcc\x00"


def test_zero_length_transfers_are_fine(device: BlockDevice) -> None:
    queue, driver = make_queue(size=16)
    read = driver.add_chain(readable=[header(IN, 128)], writable=[1])
    write = driver.add_chain(readable=[header(OUT, 128)], writable=[1])
    service(device, queue, driver.memory)
    assert driver.used() == [(read, 1), (write, 1)]
    assert status_of(driver, read) == status_of(driver, write) == Status.OK


# -- flush and write caching --------------------------------------------------------------


@pytest.fixture
def io_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the order of pwritev and fdatasync calls (fdatasync itself can't be seen)."""
    calls: list[str] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(f"pwritev@{offset}")
        return real_pwritev(fd, buffers, offset)

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


async def test_flush_syncs_after_the_writes_before_it(device: BlockDevice,
                                                      io_calls: list[str]) -> None:
    queue, driver = make_queue(size=16)
    first = driver.add_chain(readable=[header(OUT, 1), bytes(SECTOR)], writable=[1])
    second = driver.add_chain(readable=[header(OUT, 2), bytes(SECTOR)], writable=[1])
    flush = driver.add_chain(readable=[header(FLUSH)], writable=[1])
    await serve(device, driver, queue, features=VIRTIO_BLK_F_FLUSH)
    assert driver.used() == [(first, 1), (second, 1), (flush, 1)]
    assert status_of(driver, flush) == Status.OK
    # Writeback mode: the writes alone never sync; the flush syncs after both.
    assert io_calls == ["pwritev@512", "pwritev@1024", "fdatasync"]
    assert device.writeback
    assert device.stats.flushes == 1


async def test_without_negotiated_flush_writes_are_writethrough(
        device: BlockDevice, io_calls: list[str]) -> None:
    queue, driver = make_queue(size=16)
    heads = [driver.add_chain(readable=[header(OUT, n), bytes(SECTOR)], writable=[1])
             for n in range(3)]
    read = driver.add_chain(readable=[header(IN, 0)], writable=[SECTOR + 1])
    await serve(device, driver, queue, features=0)
    assert [head for head, _ in driver.used()] == [*heads, read]
    # One sync for the whole batch, before any of it was completed.
    assert io_calls == ["pwritev@0", "pwritev@512", "pwritev@1024", "fdatasync"]
    assert not device.writeback
    device.reset()
    assert not device.writeback


def test_writethrough_sync_failure_fails_the_writes(
        device: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    queue, driver = make_queue(size=16)
    write = driver.add_chain(readable=[header(OUT, 0), bytes(SECTOR)], writable=[1])
    read = driver.add_chain(readable=[header(IN, 0)], writable=[SECTOR + 1])
    assert not device.writeback
    service(device, queue, driver.memory)
    assert status_of(driver, write) == Status.IOERR
    assert status_of(driver, read) == Status.OK


def test_flush_failure_is_ioerr(device: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    device.writeback = True
    queue, driver = make_queue(size=16)
    flush = driver.add_chain(readable=[header(FLUSH)], writable=[1])
    service(device, queue, driver.memory)
    assert status_of(driver, flush) == Status.IOERR
    assert device.stats.io_errors == 1


# -- GET_ID -------------------------------------------------------------------------------


def test_get_id_returns_the_serial_nul_padded(image: Path) -> None:
    queue, driver = make_queue(size=16)
    with BlockDevice(image, serial="disk-7") as device:
        full = driver.add_chain(readable=[header(GET_ID)], writable=[20, 1])
        short = driver.add_chain(readable=[header(GET_ID)], writable=[5])
        roomy = driver.add_chain(readable=[header(GET_ID)], writable=[32, 1])
        service(device, queue, driver.memory)
    assert driver.used() == [(full, 21), (short, 5), (roomy, 21)]
    assert driver.writable_data(full) == b"disk-7" + bytes(14) + b"\x00"
    assert driver.writable_data(short) == b"disk\x00"
    assert driver.writable_data(roomy, 20) == b"disk-7" + bytes(14)
    assert driver.writable_data(roomy)[-1] == Status.OK


def test_get_id_default_serial_has_no_terminator(device: BlockDevice) -> None:
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(GET_ID)], writable=[21])
    service(device, queue, driver.memory)
    assert driver.writable_data(head, 20) == device.serial.encode()


# -- DISCARD and WRITE_ZEROES -------------------------------------------------------------


@pytest.mark.parametrize("punch", [True, False], ids=["punch-hole", "no-punch-hole"])
def test_discard_zeroes_the_ranges(image: Path, monkeypatch: pytest.MonkeyPatch,
                                   punch: bool) -> None:
    """Discarded ranges read as zeroes where holes can be punched; elsewhere a discard
    does nothing (test_blk_hardening.py)."""
    if not punch:
        def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        monkeypatch.setattr(blk, "fallocate", unsupported)
    queue, driver = make_queue(size=16)
    with BlockDevice(image) as device:
        head = driver.add_chain(
            readable=[header(DISCARD), segment(8, 8) + segment(40, 3)], writable=[1])
        service(device, queue, driver.memory)
        assert device.can_punch_holes is punch
        assert device.stats.bytes_discarded == 11 * SECTOR
    assert status_of(driver, head) == Status.OK
    expected = bytearray(pattern(IMAGE_SIZE))
    if punch:
        expected[8 * SECTOR:16 * SECTOR] = bytes(8 * SECTOR)
        expected[40 * SECTOR:43 * SECTOR] = bytes(3 * SECTOR)
    assert image.read_bytes() == expected


def test_discard_punches_holes(tmp_path: Path) -> None:
    image = make_image(tmp_path / "big.img", content=b"\xab" * (4 << 20))
    before = os.stat(image).st_blocks
    queue, driver = make_queue(size=16)
    with BlockDevice(image) as device:
        head = driver.add_chain(readable=[header(DISCARD), segment(0, 4096)], writable=[1])
        service(device, queue, driver.memory)
    assert status_of(driver, head) == Status.OK
    assert os.stat(image).st_blocks < before - 2048  # some 2 MiB deallocated
    assert image.read_bytes()[:2 << 20] == bytes(2 << 20)


@pytest.mark.parametrize("unmap", [0, 1])
@pytest.mark.parametrize("zero_range", [True, False], ids=["zero-range", "no-zero-range"])
def test_write_zeroes(image: Path, monkeypatch: pytest.MonkeyPatch, unmap: int,
                      zero_range: bool) -> None:
    modes: list[int] = []
    real = blk.fallocate

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        if not zero_range:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        real(fd, mode, offset, length)

    monkeypatch.setattr(blk, "fallocate", fallocate)
    queue, driver = make_queue(size=16)
    with BlockDevice(image) as device:
        head = driver.add_chain(
            readable=[header(WRITE_ZEROES), segment(1, 2, unmap), segment(100, 28, unmap)],
            writable=[1])
        service(device, queue, driver.memory)
        assert device.stats.bytes_zeroed == 30 * SECTOR
    assert status_of(driver, head) == Status.OK
    expected = bytearray(pattern(IMAGE_SIZE))
    expected[SECTOR:3 * SECTOR] = bytes(2 * SECTOR)
    expected[100 * SECTOR:] = bytes(28 * SECTOR)
    assert image.read_bytes() == expected
    punch = blk.FALLOC_FL_PUNCH_HOLE | blk.FALLOC_FL_KEEP_SIZE
    assert (punch in modes) == bool(unmap)


@pytest.mark.parametrize("request_type", [DISCARD, WRITE_ZEROES])
@pytest.mark.parametrize(("segments", "status"), [
    (segment(127, 2), Status.IOERR),  # past the end
    (segment(0, 1) + segment(1 << 63, 1), Status.IOERR),
    (segment(0, blk.MAX_DISCARD_SECTORS + 1), Status.IOERR),
    (segment(0, 1) + b"\x00" * 8, Status.IOERR),  # not whole segments
    (segment(0, 1) * (blk.MAX_DISCARD_SEG + 1), Status.IOERR),
    (segment(0, 1, 0x2), Status.UNSUPP),  # a reserved flag
    (segment(0, 1, 0x8000_0000), Status.UNSUPP),
])
def test_bad_segments_change_nothing(device: BlockDevice, image: Path, request_type: int,
                                     segments: bytes, status: Status) -> None:
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(request_type), segments], writable=[1])
    service(device, queue, driver.memory)
    assert status_of(driver, head) == status
    assert image.read_bytes() == pattern(IMAGE_SIZE)


def test_discard_with_unmap_is_unsupported(device: BlockDevice, image: Path) -> None:
    # §5.2.6.2: unmap is for WRITE_ZEROES only.
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(DISCARD), segment(0, 1, 1)], writable=[1])
    service(device, queue, driver.memory)
    assert status_of(driver, head) == Status.UNSUPP
    assert image.read_bytes() == pattern(IMAGE_SIZE)


# -- refusals -----------------------------------------------------------------------------


def test_read_only_disk_refuses_every_write(image: Path) -> None:
    queue, driver = make_queue(size=16)
    with BlockDevice(image, read_only=True) as device:
        write = driver.add_chain(readable=[header(OUT, 0), bytes(SECTOR)], writable=[1])
        discard = driver.add_chain(readable=[header(DISCARD), segment(0, 1)], writable=[1])
        zeroes = driver.add_chain(readable=[header(WRITE_ZEROES), segment(0, 1)],
                                  writable=[1])
        flush = driver.add_chain(readable=[header(FLUSH)], writable=[1])
        read = driver.add_chain(readable=[header(IN, 1)], writable=[SECTOR + 1])
        service(device, queue, driver.memory)
        assert device.stats.rejected == 3
    assert [status_of(driver, h) for h in (write, discard, zeroes, flush, read)] == [
        Status.IOERR, Status.IOERR, Status.IOERR, Status.OK, Status.OK]
    assert driver.writable_data(read, SECTOR) == pattern(IMAGE_SIZE)[SECTOR:2 * SECTOR]
    assert image.read_bytes() == pattern(IMAGE_SIZE)


@pytest.mark.parametrize(("request_type", "sector", "length"), [
    (IN, 128, SECTOR),  # first sector past the end
    (IN, 127, 2 * SECTOR),  # straddles the end
    (OUT, 127, 2 * SECTOR),
    (OUT, 2**64 - 1, SECTOR),
    (IN, 2**64 - 1, 0),
    (IN, 0, 100),  # not whole sectors
    (OUT, 0, SECTOR + 1),
    (OUT, 0, SECTOR - 1),
])
def test_out_of_range_and_partial_sectors_are_ioerr(
        device: BlockDevice, image: Path, request_type: int, sector: int, length: int) -> None:
    queue, driver = make_queue(size=16)
    if request_type == IN:
        head = driver.add_chain(readable=[header(IN, sector)], writable=[length + 1])
    else:
        head = driver.add_chain(readable=[header(OUT, sector), b"\xee" * length],
                                writable=[1])
    service(device, queue, driver.memory)
    assert driver.used() == [(head, 1)]
    assert status_of(driver, head) == Status.IOERR
    if request_type == IN:
        assert driver.writable_data(head, length) == bytes(length)
    assert image.read_bytes() == pattern(IMAGE_SIZE)
    assert device.stats.rejected == 1


@pytest.mark.parametrize("request_type", [2, 3, 5, 10, 14, 15, 16, 0x8000_0000, 2**32 - 1])
def test_unknown_request_types_are_unsupported(device: BlockDevice, image: Path,
                                               request_type: int) -> None:
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(request_type), bytes(SECTOR)],
                            writable=[SECTOR + 1])
    service(device, queue, driver.memory)
    assert driver.used() == [(head, 1)]
    assert status_of(driver, head) == Status.UNSUPP
    assert image.read_bytes() == pattern(IMAGE_SIZE)
    assert device.stats.unsupported == 1


# -- host I/O errors ----------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                             str(mount_point)], capture_output=True, text=True, check=False)
    if result.returncode:
        require(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_file_system_is_ioerr_logged_once(tiny_tmpfs: Path) -> None:
    """A real ENOSPC: a sparse 1 MiB image on a 64 KiB tmpfs."""
    path = tiny_tmpfs / "sparse.img"
    with open(path, "wb") as file:
        file.truncate(1 << 20)
    queue, driver = make_queue(size=16, memory_size=1 << 20)
    with structlog.testing.capture_logs() as logs, BlockDevice(path) as device:
        first = driver.add_chain(readable=[header(OUT, 0), b"\x11" * (128 << 10)],
                                 writable=[1])
        second = driver.add_chain(readable=[header(OUT, 512), b"\x22" * (128 << 10)],
                                  writable=[1])
        read = driver.add_chain(readable=[header(IN, 0)], writable=[SECTOR + 1])
        service(device, queue, driver.memory)
        assert device.stats.io_errors == 2
    assert [status_of(driver, h) for h in (first, second, read)] == [
        Status.IOERR, Status.IOERR, Status.OK]
    failures = [entry for entry in logs if entry["event"] == IO_FAILED]
    assert len(failures) == 1 and failures[0]["errno"] == "ENOSPC"


def test_enospc_from_pwritev(device: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC where no tmpfs can be mounted (and always, for the partial-write path)."""
    real = os.pwritev
    calls = []

    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 1:
            return real(fd, [bytes(buffers[0])[:SECTOR]], offset)  # a short write first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", pwritev)
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(OUT, 0), bytes(4 * SECTOR)], writable=[1])
    service(device, queue, driver.memory)
    assert calls == [0, SECTOR]  # the short write was continued where it stopped
    assert status_of(driver, head) == Status.IOERR
    assert device.stats.io_errors == 1


def test_read_errors_are_ioerr_logged_once_per_kind(
        device: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", preadv)
    queue, driver = make_queue(size=16)
    with structlog.testing.capture_logs() as logs:
        heads = [driver.add_chain(readable=[header(IN, n)], writable=[SECTOR + 1])
                 for n in range(3)]
        service(device, queue, driver.memory)
    assert [status_of(driver, h) for h in heads] == [Status.IOERR] * 3
    assert [(e["operation"], e["errno"]) for e in logs if e["event"] == IO_FAILED] == [
        ("read", "EIO")]


def test_a_shrunken_image_reads_as_ioerr(device: BlockDevice, image: Path) -> None:
    os.truncate(image, 10 * SECTOR)
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(IN, 9)], writable=[2 * SECTOR + 1])
    service(device, queue, driver.memory)
    assert status_of(driver, head) == Status.IOERR
    assert driver.used() == [(head, SECTOR)]  # the sector that was there (status past a gap)


# -- protocol violations ------------------------------------------------------------------


@pytest.mark.parametrize(("readable", "writable"), [
    ([header(IN)[:15]], [SECTOR + 1]),  # header too short
    ([header(IN)[:8], header(IN)[8:15]], [SECTOR + 1]),
    ([header(OUT), bytes(SECTOR)], []),  # no status byte
    ([header(FLUSH)], [0]),  # a zero-length writable descriptor is no status byte
], ids=["short-header", "short-split-header", "no-status", "empty-status"])
async def test_malformed_chain_needs_reset_after_completing_earlier_ones(
        device: BlockDevice, image: Path, readable: list[bytes], writable: list[int]) -> None:
    queue, driver = make_queue(size=16)
    good = driver.add_chain(readable=[header(OUT, 0), b"\x55" * SECTOR], writable=[1])
    driver.add_chain(readable=readable, writable=writable)
    after = driver.add_chain(readable=[header(OUT, 1), b"\x66" * SECTOR], writable=[1])
    context = FakeContext(driver, queue, VIRTIO_BLK_F_FLUSH)
    with trio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            context.kick()
    errors = leaves(info.value)
    assert len(errors) == 1 and isinstance(errors[0], DeviceNeedsReset), errors
    assert driver.used() == [(good, 1)]
    assert context.signals == [0]
    content = image.read_bytes()
    assert content[:SECTOR] == b"\x55" * SECTOR
    assert content[SECTOR:] == pattern(IMAGE_SIZE)[SECTOR:]  # `after` never ran
    assert status_of(driver, after) == 0 and driver.chains[after].used_length is None


def test_queue_error_after_good_chains_completes_them_first(device: BlockDevice) -> None:
    queue, driver = make_queue(size=16)
    good = driver.add_chain(readable=[header(IN, 0)], writable=[SECTOR + 1])
    driver.make_available(16)  # a head past the table: QueueError from pop()
    with pytest.raises(QueueError):
        service(device, queue, driver.memory)
    assert driver.used() == [(good, SECTOR + 1)]


def test_buffers_outside_memory_need_reset(device: BlockDevice) -> None:
    # The queue checks buffers against RAM when it pops; memory that shrank since (or a
    # queue that did not check) must still end in DeviceNeedsReset, not an IndexError.
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(IN, 0)], writable=[SECTOR + 1])
    batch = device.take_batch(queue, driver.memory)
    small = ByteArrayMemory(driver.chains[head].writable[0][0])
    small.data[:] = driver.memory.data[:len(small.data)]
    result = device.process_batch(small, batch)
    assert result.completions == []
    assert isinstance(result.error, DeviceNeedsReset)


# -- cancellation -------------------------------------------------------------------------


async def test_cancel_during_a_batch_completes_the_batch(
        device: BlockDevice, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = os.pwritev

    def slow_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        entered.set()
        release.wait(10)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", slow_pwritev)
    queue, driver = make_queue(size=16)
    head = driver.add_chain(readable=[header(OUT, 2), b"\x77" * SECTOR], writable=[1])
    context = FakeContext(driver, queue, VIRTIO_BLK_F_FLUSH)
    timer = threading.Timer(0.1, release.set)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.run, context)
            context.kick()
            await trio.to_thread.run_sync(entered.wait, 10)
            nursery.cancel_scope.cancel()
            timer.start()
    timer.join()
    # run() returned only after the batch was done and on the used ring.
    assert driver.used() == [(head, 1)]
    assert status_of(driver, head) == Status.OK
    assert context.signals == [0]
    assert image.read_bytes()[2 * SECTOR:3 * SECTOR] == b"\x77" * SECTOR
    assert queue.state.next_used == queue.state.next_available == 1
