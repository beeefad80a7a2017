"""virtio-blk against a hostile driver (see fuzz_support for what every episode checks),
over a real image file, writable or read-only, writeback or writethrough.

The device is driven through the step its I/O thread takes (serve_batch: the C loop of
avmm.virtio.blk_fast where it applies, then take_batch, process_batch, finish_batch)
without the thread, so that tens of thousands of chains take seconds; on both request
loops, and the two are compared with each other on the same episodes.
Its own checks: every request it answers gets the status, used length and data that the
test's own reading of §5.2.6 gives (requests the disk cannot do included: out of range,
partial sectors, unknown types, malformed segments), the image changes exactly as the
answered writes, discards and write-zeroes say, and after a reset a sector written is
read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from avmm.virtio import blk_fast
from avmm.virtio.blk import BlockDevice, RequestType, Status
from avmm.virtio.device import DeviceNeedsReset

from .fuzz_chains import (
    REQUEST,
    Planned,
    Request,
    split,
    split_length,
)
from .fuzz_support import (
    HOSTILE_TARGET,
    FuzzGuest,
    FuzzTarget,
    Round,
    fuzz,
    new_round,
    quiet_logs,
    well_formed_round,
)

EPISODES = 3300
IN, OUT, FLUSH, GET_ID = RequestType.IN, RequestType.OUT, RequestType.FLUSH, RequestType.GET_ID
DISCARD, WRITE_ZEROES = RequestType.DISCARD, RequestType.WRITE_ZEROES
SECTOR = 512
IMAGE_SIZE = 64 * 1024
SECTORS = IMAGE_SIZE // SECTOR
SERIAL = "fuzz-serial"
#: Request types, the known ones several times over so that most requests mean something.
TYPES = [IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES] * 3 + [
    2, 3, 5, 10, 14, 15, 2**31, 2**32 - 1]
#: Sectors past the disk's end, for the top of the sector range.
FAR_SECTORS = [SECTORS + 1, 2**32, 2**63, 2**64 - 8, 2**64 - 1]
SEGMENT_FLAGS = [0] * 6 + [1] * 3 + [2, 0x8000_0000]

SHORT_HEADER = "too-short request header"
NO_STATUS = "no writable status byte"


def header(request_type: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", request_type, 0, sector)


def segment(sector: int, sectors: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, sectors, flags)


def pattern(size: int) -> bytes:
    """Recognisable bytes: each depends on its position."""
    return bytes((i * 7 + 13 + (i >> 9)) & 0xFF for i in range(size))


def any_sector(rng: random.Random) -> int:
    value = rng.randint(0, SECTORS + 6)
    return value if value <= SECTORS else rng.choice(FAR_SECTORS)


def request_bytes(rng: random.Random) -> tuple[bytes, int]:
    """One request as the driver means it: header and payload, and the bytes it wants
    back (data + status)."""
    request_type = rng.choice(TYPES)
    sector = any_sector(rng)
    length = rng.randint(0, 5000)
    if length % 3:
        length -= length % SECTOR  # two in three are whole sectors
    if request_type in (DISCARD, WRITE_ZEROES):
        payload = b"".join(
            segment(rng.choice([rng.randint(0, SECTORS)] * 3 + [any_sector(rng)]),
                    rng.choice([rng.randint(0, 16)] * 2 + [rng.randint(0, SECTORS),
                                                           rng.getrandbits(32)]),
                    rng.choice(SEGMENT_FLAGS))
            for _ in range(rng.randint(0, 3)))
        if rng.randint(0, 9) == 0:
            payload += bytes(rng.randint(1, 15))  # not whole segments
        return header(request_type, sector) + payload, 1
    if request_type == OUT:
        return header(request_type, sector) + bytes([rng.getrandbits(8)]) * length, 1
    return header(request_type, sector), length + 1


Outcome = tuple[set[Status], int, bytes | None]


def expected_outcome(readable: bytes, writable_length: int, model: bytearray,
                     read_only: bool) -> Outcome:
    """The test's own reading of §5.2.6: (statuses allowed, used length, data read) for
    a request the device must answer. Applies its effect to ``model``."""
    request_type, _, sector = struct.unpack_from("<IIQ", readable)
    payload = readable[16:]
    data_length = writable_length - 1

    def in_range(first: int, count: int) -> bool:
        return first + count <= SECTORS

    if request_type == IN:
        if data_length % SECTOR or not in_range(sector, data_length // SECTOR):
            return {Status.IOERR}, 1, None
        start = sector * SECTOR
        return {Status.OK}, data_length + 1, bytes(model[start:start + data_length])
    if request_type == OUT:
        if read_only or len(payload) % SECTOR or not in_range(sector, len(payload) // SECTOR):
            return {Status.IOERR}, 1, None
        model[sector * SECTOR:sector * SECTOR + len(payload)] = payload
        return {Status.OK}, 1, None
    if request_type == FLUSH:
        return {Status.OK}, 1, None
    if request_type == GET_ID:
        length = min(20, data_length)
        return {Status.OK}, length + 1, SERIAL.encode().ljust(20, b"\0")[:length]
    if request_type in (DISCARD, WRITE_ZEROES):
        if read_only or len(payload) % 16:
            return {Status.IOERR}, 1, None
        segments = [struct.unpack_from("<QII", payload, i) for i in range(0, len(payload), 16)]
        allowed_flags = 1 if request_type == WRITE_ZEROES else 0
        bad_flags = any(flags & ~allowed_flags for _, _, flags in segments)
        bad_range = any(not in_range(s, n) for s, n, _ in segments)
        if bad_flags or bad_range:
            statuses = ({Status.UNSUPP} if bad_flags else set()) | (
                {Status.IOERR} if bad_range else set())
            return statuses, 1, None
        for first, count, _ in segments:
            model[first * SECTOR:(first + count) * SECTOR] = bytes(count * SECTOR)
        return {Status.OK}, 1, None
    return {Status.UNSUPP}, 1, None


class BlockTarget(FuzzTarget):
    name = "blk"
    roles = (REQUEST,)
    drained = frozenset({0})
    queue_max_sizes = BlockDevice.queue_max_sizes

    def __init__(self, image: Path) -> None:
        self.image = image
        self.devices = {ro: BlockDevice(image, read_only=ro, serial=SERIAL)
                        for ro in (False, True)}
        self.device = self.devices[False]
        self.model = bytearray(image.read_bytes())

    def close(self) -> None:
        for device in self.devices.values():
            device.close()

    def well_formed(self, rng: random.Random, queue: int, features: int) -> Request:
        readable, wanted = request_bytes(rng)
        return Request(split(rng, readable), split_length(rng, wanted))

    def content_hostile(self, rng: random.Random, queue: int, features: int,
                        final: bool) -> Request | None:
        if not final:
            return None
        readable, wanted = request_bytes(rng)
        if rng.random() < 0.5:
            cut = readable[:rng.randint(1, 15)]
            return Request(split(rng, cut), split_length(rng, wanted), SHORT_HEADER)
        return Request(split(rng, readable), [], NO_STATUS)

    def stops(self, queue: int, plan: Planned, features: int) -> bool:
        # No room for the header, or no device-writable byte for the status.
        return plan.readable_length < 16 or plan.writable_length < 1

    def begin(self, round_: Round) -> list[Callable[[], Awaitable[object]]]:
        rng = round_.rng
        self.device = self.devices[rng.random() < 0.25]
        # What run() sets from the negotiated VIRTIO_BLK_F_FLUSH.
        self.device.writeback = rng.random() < 0.5
        return []

    async def serve(self, round_: Round, tasks: Sequence[Callable[[], Awaitable[object]]]
                    ) -> DeviceNeedsReset | None:
        device, queue, memory = self.device, round_.guest.queues[0], round_.memory
        try:
            while True:
                queue.disable_notifications(memory)
                more, _, _ = device.serve_batch(queue, memory, round_.context.signal_used)
                if not more:
                    return None
        except DeviceNeedsReset as e:
            return e

    def check(self, round_: Round, error: DeviceNeedsReset | None) -> None:
        answered = []
        for plan in round_.reached(0):
            if plan.stops:
                break
            answered.append(plan)
        pushes = round_.guest.queues[0].pushes
        assert [head for head, _ in pushes] == [p.head for p in answered], (
            "blk answered other requests than those before the first it must refuse")
        memory = round_.memory.data
        for plan, (_, written) in zip(answered, pushes, strict=True):
            statuses, length, data = expected_outcome(
                plan.readable_bytes(round_.snapshot), plan.writable_length, self.model,
                self.device.read_only)
            assert written == length, f"used length {written} for {plan.kind}, not {length}"
            if plan.unreliable:
                continue
            address, size = plan.writable[-1]
            assert memory[address + size - 1] in statuses
            if data is not None:
                assert plan.writable_bytes(memory, len(data)) == data
        assert os.pread(self.device.fd, IMAGE_SIZE + 1, 0) == self.model, (
            "the image differs from what the answered requests say")

    def reset(self) -> None:
        self.device.reset()

    async def check_after_reset(self, guest: FuzzGuest, rng: random.Random) -> None:
        round_ = new_round(self, guest, rng, sizes=(16, 32))
        self.device.writeback = rng.random() < 0.5
        sector = rng.randrange(SECTORS - 8)
        count = rng.randint(1, 8)
        requests = [(0, Request(split(rng, header(IN, sector)),
                                [*split_length(rng, count * SECTOR), 1]))]
        data = rng.randbytes(count * SECTOR)
        if not self.device.read_only:
            requests.insert(0, (0, Request(split(rng, header(OUT, sector) + data), [1])))
            self.model[sector * SECTOR:(sector + count) * SECTOR] = data
        plans = await well_formed_round(self, round_, requests)
        memory = round_.memory.data
        expected = bytes(self.model[sector * SECTOR:(sector + count) * SECTOR])
        assert all(p.writable_bytes(memory)[-1] == Status.OK for p in plans)
        assert plans[-1].writable_bytes(memory, count * SECTOR) == expected
        assert os.pread(self.device.fd, IMAGE_SIZE + 1, 0) == self.model


def test_hostile_driver(blk_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        fuzz_report: Callable[[str], None]) -> None:
    """At least 10,000 ring- and descriptor-level hostile chains among random requests:
    the device only ever stops with DeviceNeedsReset where it must, answers every
    request before that as the spec says, changes the image only as they say, never
    writes guest memory outside the writable buffers it was given, and reads back what
    it wrote after each reset."""
    image = tmp_path / "fuzz.img"
    image.write_bytes(pattern(IMAGE_SIZE))
    # Syncs are invisible here and would take most of the time on a real disk.
    syncs: list[int] = []
    monkeypatch.setattr(os, "fdatasync", syncs.append)
    quiet_logs()
    target = BlockTarget(image)
    try:
        tally = fuzz(target, EPISODES)
    finally:
        target.close()
    fuzz_report(tally.line())
    assert syncs
    assert tally.hostile >= HOSTILE_TARGET, tally.line()


#: Counters that say how the work was split, not what was done: left out of comparisons.
_HOW = {"batches", "batched_requests"}


class OutcomeBlockTarget(BlockTarget):
    """A BlockTarget that records what each round left: the used entries, the error, the
    whole guest memory (data read, status bytes, used ring, notification hints), the
    image and the device's counters (BlockTarget.check compares them with the spec)."""

    def __init__(self, image: Path) -> None:
        super().__init__(image)
        self.outcomes: list[tuple[object, ...]] = []
        self._counted = self._counts()

    def _counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for device in self.devices.values():
            for name, value in dataclasses.asdict(device.stats).items():
                if name not in _HOW:
                    totals[name] = totals.get(name, 0) + value
        return totals

    def check(self, round_: Round, error: DeviceNeedsReset | None) -> None:
        counts = self._counts()
        self.outcomes.append((
            list(round_.guest.queues[0].pushes),
            None if error is None else str(error),
            hashlib.sha256(round_.memory.data).hexdigest(),
            hashlib.sha256(os.pread(self.device.fd, IMAGE_SIZE + 1, 0)).hexdigest(),
            {name: value - self._counted[name] for name, value in counts.items()},
        ))
        self._counted = counts
        super().check(round_, error)


def test_c_and_python_loops_leave_identical_rings(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The C request loop (avmm.virtio.blk_fast) and the Python one, on the same hostile
    episodes (same seeds): every round ends with the same used entries, the same error,
    the same guest memory, the same image and the same counters; and the C loop served a
    good share of the reads and writes (many of the corpus's are split headers, out of
    range, on the read-only disk or in writethrough mode: Python's)."""
    quiet_logs()
    if blk_fast._blk_ffi is None:
        pytest.fail("avmm.virtio._blk_ffi is not built (run make venv)")
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    outcomes = {}
    served = 0
    real_serve = blk_fast.BlockFastPath.serve

    def counting_serve(self: blk_fast.BlockFastPath, *args: object, **kwargs: bool | int
                       ) -> blk_fast.FastBatch:
        nonlocal served
        batch = real_serve(self, *args, **kwargs)  # type: ignore[arg-type]
        served += batch.requests
        return batch

    monkeypatch.setattr(blk_fast.BlockFastPath, "serve", counting_serve)
    for enabled in (True, False):
        monkeypatch.setattr(blk_fast, "ENABLED", enabled)
        image = tmp_path / f"fuzz-{enabled}.img"
        image.write_bytes(pattern(IMAGE_SIZE))
        target = OutcomeBlockTarget(image)
        try:
            assert all((d._fast is not None) == enabled for d in target.devices.values())
            fuzz(target, 1200)
        finally:
            target.close()
        outcomes[enabled] = target.outcomes
    assert len(outcomes[True]) == len(outcomes[False]) >= 1200
    for index, (c, python) in enumerate(zip(outcomes[True], outcomes[False], strict=True)):
        assert c == python, f"round {index}: the C loop left {c}, the Python loop {python}"
    answered = sum(counts["reads"] + counts["writes"]  # type: ignore[index]
                   for *_, counts in outcomes[True])
    assert served >= answered // 8, f"the C loop served {served} of {answered} reads and writes"
