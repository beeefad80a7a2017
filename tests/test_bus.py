"""The PIO/MMIO bus: mapping, lookup, unclaimed accesses, failing handlers."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from avmm.bus import Bus, BusDevice, BusError, BusRange, BusStats
from avmm.errors import AvmmError


class RecordingDevice:
    """Answers reads with a pattern derived from the offset and records every access."""

    def __init__(self, tag: int = 0) -> None:
        self.tag = tag
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes((self.tag + offset + i) & 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


class FailingDevice:
    def read(self, offset: int, size: int) -> bytes:
        raise RuntimeError("device bug")

    def write(self, offset: int, data: bytes) -> None:
        raise RuntimeError("device bug")


class ShortReadDevice:
    def read(self, offset: int, size: int) -> bytes:
        return b"\x00"

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_recording_device_is_a_bus_device() -> None:
    device: BusDevice = RecordingDevice()
    assert device.read(0, 1) == b"\x00"


def test_bus_error_is_an_avmm_error() -> None:
    assert issubclass(BusError, AvmmError)


def test_read_and_write_reach_device_with_offset() -> None:
    bus = Bus("pio")
    device = RecordingDevice(tag=0x10)
    mapping = bus.insert(device, 0x3F8, 8, name="serial")
    assert mapping == BusRange(0x3F8, 8, "serial", device)
    assert mapping.end == 0x400

    assert bus.read(0x3FA, 2) == bytes([0x12, 0x13])
    assert bus.write(0x3FF, b"\xab") is True
    assert device.reads == [(2, 2)]
    assert device.writes == [(7, b"\xab")]
    assert bus.stats() == BusStats()


def test_access_filling_the_range_exactly_is_claimed() -> None:
    bus = Bus("mmio")
    device = RecordingDevice()
    bus.insert(device, 0x1000, 8, name="dev")
    assert bus.read(0x1000, 8) == bytes(range(8))
    assert bus.write(0x1000, bytes(8)) is True


def test_unclaimed_read_returns_ones_and_is_counted() -> None:
    bus = Bus("pio")
    bus.insert(RecordingDevice(), 0x60, 5, name="i8042")
    assert bus.read(0x80, 1) == b"\xff"
    assert bus.read(0x5F, 4) == b"\xff" * 4  # starts before, reaches into the range
    assert bus.read(0x70, 2) == b"\xff\xff"
    assert bus.write(0x80, b"\x00") is False
    stats = bus.stats()
    assert stats.unclaimed_reads == 3
    assert stats.unclaimed_writes == 1
    assert stats.crossing_reads == 1
    assert stats.crossing_writes == 0
    assert stats.handler_errors == 0


def test_repeated_stray_accesses_are_counted_but_logged_once() -> None:
    bus = Bus("pio")
    bus.insert(FailingDevice(), 0x3F8, 8, name="serial")
    with capture_logs() as logs:
        for _ in range(5):
            bus.write(0x80, b"\x00")  # Linux's I/O delay port
            bus.read(0x3F8, 1)
        bus.write(0x80, b"\x00\x00")  # another size is another line
    assert [entry["event"] for entry in logs] == [
        "unclaimed bus access",
        "bus device handler raised",
        "unclaimed bus access",
    ]
    stats = bus.stats()
    assert stats.unclaimed_writes == 6
    assert stats.unclaimed_reads == 5
    assert stats.handler_errors == 5


def test_empty_bus_is_all_unclaimed() -> None:
    bus = Bus("mmio")
    assert len(bus) == 0
    assert bus.lookup(0) is None
    assert bus.read(0, 4) == b"\xff" * 4
    assert bus.write(0, b"\x01") is False


def test_access_crossing_range_end_is_unclaimed_and_logged() -> None:
    bus = Bus("pio")
    device = RecordingDevice()
    bus.insert(device, 0x501, 2, name="debug-exit")
    bus.insert(RecordingDevice(), 0x503, 1, name="next")
    with capture_logs() as logs:
        assert bus.read(0x502, 2) == b"\xff\xff"
        assert bus.write(0x501, b"\x01\x02\x03\x04") is False
    assert device.reads == []
    assert device.writes == []
    stats = bus.stats()
    assert (stats.crossing_reads, stats.crossing_writes) == (1, 1)
    assert (stats.unclaimed_reads, stats.unclaimed_writes) == (1, 1)
    crossings = [
        entry for entry in logs if entry["event"] == "bus access crosses a device range edge"
    ]
    assert [entry["device"] for entry in crossings] == ["debug-exit", "debug-exit"]
    assert crossings[0]["address"] == "0x502"
    assert crossings[0]["log_level"] == "warning"


def test_insert_rejects_overlap_naming_both_devices() -> None:
    bus = Bus("pio")
    bus.insert(RecordingDevice(), 0x3F8, 8, name="serial")
    for base, length in [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FA, 2), (0x300, 0x200)]:
        with pytest.raises(BusError) as excinfo:
            bus.insert(RecordingDevice(), base, length, name="intruder")
        assert "'serial'" in str(excinfo.value)
        assert "'intruder'" in str(excinfo.value)
    # Adjacent ranges are fine.
    bus.insert(RecordingDevice(), 0x3F0, 8, name="below")
    bus.insert(RecordingDevice(), 0x400, 1, name="above")
    assert [r.name for r in bus.ranges] == ["below", "serial", "above"]


@pytest.mark.parametrize("length", [0, -1])
def test_insert_rejects_empty_range(length: int) -> None:
    bus = Bus("pio")
    with pytest.raises(BusError, match=r"'dev'.*not positive"):
        bus.insert(RecordingDevice(), 0x10, length, name="dev")
    assert len(bus) == 0


def test_insert_rejects_negative_base() -> None:
    with pytest.raises(BusError, match="negative"):
        Bus("pio").insert(RecordingDevice(), -1, 1, name="dev")


def test_remove_unmaps_and_returns_the_range() -> None:
    bus = Bus("pio")
    device = RecordingDevice()
    bus.insert(device, 0x60, 5, name="i8042")
    removed = bus.remove(0x60)
    assert removed.device is device
    assert bus.lookup(0x60) is None
    assert bus.read(0x60, 1) == b"\xff"
    with pytest.raises(BusError, match="nothing is mapped at 0x60"):
        bus.remove(0x60)
    bus.insert(RecordingDevice(), 0x60, 5, name="again")


def test_remove_requires_the_exact_base() -> None:
    bus = Bus("pio")
    bus.insert(RecordingDevice(), 0x60, 5, name="i8042")
    with pytest.raises(BusError):
        bus.remove(0x61)
    with pytest.raises(BusError):
        bus.remove(0x10)
    assert len(bus) == 1


def test_lookup_edges() -> None:
    bus = Bus("mmio")
    bus.insert(RecordingDevice(), 0xD000_0000, 0x1000, name="virtio0")
    assert bus.lookup(0xCFFF_FFFF) is None
    found = bus.lookup(0xD000_0000)
    assert found is not None
    assert found.name == "virtio0"
    found = bus.lookup(0xD000_0FFF)
    assert found is not None
    assert found.name == "virtio0"
    assert bus.lookup(0xD000_1000) is None


def test_handler_exception_is_contained_and_logged() -> None:
    bus = Bus("pio")
    bus.insert(FailingDevice(), 0x3F8, 8, name="serial")
    with capture_logs() as logs:
        assert bus.read(0x3F9, 1) == b"\xff"
        assert bus.write(0x3F8, b"x") is False
    failures = [entry for entry in logs if entry["event"] == "bus device handler raised"]
    assert len(failures) == 2
    assert failures[0]["device"] == "serial"
    assert failures[0]["address"] == "0x3f9"
    assert failures[0]["access"] == "read"
    assert failures[1]["access"] == "write"
    assert failures[0]["log_level"] == "error"
    assert failures[0]["exc_info"] is True
    stats = bus.stats()
    assert stats.handler_errors == 2
    assert (stats.unclaimed_reads, stats.unclaimed_writes) == (1, 1)


def test_handler_returning_wrong_size_reads_as_ones() -> None:
    bus = Bus("pio")
    bus.insert(ShortReadDevice(), 0x10, 4, name="short")
    with capture_logs() as logs:
        assert bus.read(0x10, 4) == b"\xff" * 4
    assert logs[0]["device"] == "short"
    assert bus.stats().handler_errors == 1


def test_concurrent_reads_while_the_map_changes() -> None:
    """Readers never see a torn map while another thread inserts and removes ranges."""
    bus = Bus("mmio")
    stable = RecordingDevice(tag=7)
    bus.insert(stable, 0x8000, 0x100, name="stable")
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            if bus.read(0x8010, 1) != bytes([7 + 0x10]):
                errors.append("stable range misread")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(300):
            base = 0x1000 + (i % 7) * 0x10
            bus.insert(RecordingDevice(), base, 0x10, name=f"churn{i}")
            bus.remove(base)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert [r.name for r in bus.ranges] == ["stable"]


def _naive_lookup(mapped: list[tuple[int, int, str]], address: int) -> str | None:
    for base, length, name in mapped:
        if base <= address < base + length:
            return name
    return None


@settings(max_examples=200, deadline=None)
@given(
    operations=st.lists(
        st.tuples(st.integers(0, 300), st.integers(-2, 40), st.booleans()), max_size=40
    ),
    probes=st.lists(st.integers(-5, 400), max_size=60),
)
def test_lookup_agrees_with_naive_scan(
    operations: list[tuple[int, int, bool]], probes: list[int]
) -> None:
    bus = Bus("prop")
    mapped: list[tuple[int, int, str]] = []
    for number, (base, length, remove) in enumerate(operations):
        if remove:
            expect_ok = any(b == base for b, _, _ in mapped)
            try:
                bus.remove(base)
            except BusError:
                assert not expect_ok
            else:
                assert expect_ok
                mapped = [m for m in mapped if m[0] != base]
            continue
        name = f"dev{number}"
        overlaps = any(b < base + length and base < b + n for b, n, _ in mapped)
        expect_ok = length > 0 and not overlaps
        try:
            bus.insert(RecordingDevice(), base, length, name=name)
        except BusError:
            assert not expect_ok
        else:
            assert expect_ok
            mapped.append((base, length, name))
    assert [(r.base, r.length, r.name) for r in bus.ranges] == sorted(mapped)
    for address in [*probes, *(b for b, _, _ in mapped), *(b + n for b, n, _ in mapped)]:
        found = bus.lookup(address)
        assert (found.name if found else None) == _naive_lookup(mapped, address)
        claimed = bus.write(address, b"\x00")
        assert claimed == (_naive_lookup(mapped, address) is not None)
