"""virtio-blk details a review found wrong: a discard that wrote zeroes where holes cannot
be punched, and used lengths that claimed a byte that was never written."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from avmm.virtio import blk
from avmm.virtio.blk import SECTOR_SIZE, BlockDevice, RequestType, Status

from .queue_helpers import make_queue

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")


def _service(device: BlockDevice, queue: object, memory: object) -> None:
    batch = device.take_batch(queue, memory)  # type: ignore[arg-type]
    result = device.process_batch(memory, batch)  # type: ignore[arg-type]
    device.complete_batch(queue, memory, result)  # type: ignore[arg-type]
    assert result.error is None


def test_discard_without_hole_punching_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Discard MAY deallocate: where the file system cannot punch holes it is a no-op,
    not a write of every discarded byte (write-zeroes stays write-zeroes)."""
    image = tmp_path / "disk.img"
    content = os.urandom(64 * SECTOR_SIZE)
    image.write_bytes(content)

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    writes: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append(offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(blk, "fallocate", unsupported)
    monkeypatch.setattr(os, "pwrite", pwrite)
    queue, driver = make_queue(size=16)
    with BlockDevice(image) as device:
        discard = driver.add_chain(
            readable=[_HEADER.pack(RequestType.DISCARD, 0, 0), _SEGMENT.pack(8, 16, 0)],
            writable=[1])
        _service(device, queue, driver.memory)
        assert not device.can_punch_holes
        assert writes == []
        assert image.read_bytes() == content  # old data: allowed after a discard
        zeroes = driver.add_chain(
            readable=[_HEADER.pack(RequestType.WRITE_ZEROES, 0, 0), _SEGMENT.pack(8, 16, 0)],
            writable=[1])
        _service(device, queue, driver.memory)
    assert driver.used() == [(discard, 1), (zeroes, 1)]
    assert driver.writable_data(discard) == driver.writable_data(zeroes) == bytes([Status.OK])
    assert image.read_bytes()[8 * SECTOR_SIZE:24 * SECTOR_SIZE] == bytes(16 * SECTOR_SIZE)


def test_partial_read_used_length_counts_only_what_was_written(tmp_path: Path) -> None:
    """A read that fails part-way wrote the bytes it got, not the byte after them: the
    status byte lies past a gap, so the used length is the data alone. virtio 1.2
    §2.7.8.2: the device writes at least len bytes from the start of the writable part;
    len may be an underestimate, never an overestimate."""
    image = tmp_path / "disk.img"
    content = os.urandom(8 * SECTOR_SIZE)
    image.write_bytes(content)
    queue, driver = make_queue(size=16)
    with BlockDevice(image) as device:
        os.truncate(image, 4 * SECTOR_SIZE + 100)  # shrank under the device
        partial = driver.add_chain(readable=[_HEADER.pack(RequestType.IN, 0, 0)],
                                   writable=[8 * SECTOR_SIZE, 1])
        whole = driver.add_chain(readable=[_HEADER.pack(RequestType.IN, 0, 1)],
                                 writable=[SECTOR_SIZE, 1])
        refused = driver.add_chain(readable=[_HEADER.pack(RequestType.IN, 0, 100)],
                                   writable=[SECTOR_SIZE, 1])
        _service(device, queue, driver.memory)
    got = 4 * SECTOR_SIZE + 100
    # A refused read wrote only its status: reported as 1, the usual status-only answer.
    assert driver.used() == [(partial, got), (whole, SECTOR_SIZE + 1), (refused, 1)]
    data = driver.writable_data(partial)
    assert data[:got] == content[:got] and data[-1] == Status.IOERR
    assert driver.writable_data(whole) == content[SECTOR_SIZE:2 * SECTOR_SIZE] + b"\0"
    assert driver.writable_data(refused)[-1] == Status.IOERR
