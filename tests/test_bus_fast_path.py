"""What the bus tells a vCPU's C fast path: which stray accesses it only counts
(``is_quiet``), counting what was answered elsewhere (``count_unclaimed``), and map
changes (``on_change``)."""

from __future__ import annotations

from structlog.testing import capture_logs

from avmm.bus import Bus


class Device:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_a_stray_access_is_quiet_once_counted_and_logged() -> None:
    bus = Bus("pio")
    assert not bus.is_quiet(0x80, 1, write=True)
    with capture_logs() as logs:
        assert bus.write(0x80, b"\x00") is False
        assert bus.is_quiet(0x80, 1, write=True)
        for _ in range(3):
            assert bus.write(0x80, b"\x00") is False  # the shortcut: counted, not logged
        assert bus.read(0x80, 1) == b"\xff"
    assert [entry["event"] for entry in logs] == ["unclaimed bus access"] * 2
    # Reads and writes, and each size, are told apart.
    assert bus.is_quiet(0x80, 1, write=False)
    assert not bus.is_quiet(0x80, 2, write=True)
    assert bus.stats().unclaimed_writes == 4
    assert bus.stats().unclaimed_reads == 1


def test_accesses_touching_a_device_are_never_quiet() -> None:
    bus = Bus("pio")
    bus.insert(Device(), 0x3F8, 8, name="serial")
    bus.write(0x3F8, b"\x00")
    assert not bus.is_quiet(0x3F8, 1, write=True)
    bus.write(0x3F7, b"\x00\x00")  # crosses the range's start: logged as a warning
    assert not bus.is_quiet(0x3F7, 2, write=True)
    assert bus.stats().crossing_writes == 1


def test_a_new_map_forgets_quiet_accesses_and_tells_listeners() -> None:
    bus = Bus("mmio")
    changes: list[int] = []
    bus.on_change(lambda: changes.append(len(bus)))
    bus.write(0xD800_0000, b"\x00" * 4)
    assert bus.is_quiet(0xD800_0000, 4, write=True)
    bus.insert(Device(), 0xD800_0000, 0x1000, name="late")
    assert changes == [1]  # called once the new map is in place
    assert not bus.is_quiet(0xD800_0000, 4, write=True)
    assert bus.write(0xD800_0000, b"\x00" * 4) is True
    bus.remove(0xD800_0000)
    assert changes == [1, 0]


def test_a_failing_listener_is_logged_and_does_not_stop_the_change() -> None:
    bus = Bus("pio")

    def broken() -> None:
        raise RuntimeError("listener bug")

    bus.on_change(broken)
    with capture_logs() as logs:
        bus.insert(Device(), 0x60, 1, name="i8042")
    assert len(bus) == 1
    assert any(entry["event"] == "bus change listener failed" for entry in logs)


def test_count_unclaimed_adds_to_the_stats() -> None:
    bus = Bus("pio")
    bus.count_unclaimed(reads=2, writes=5)
    bus.count_unclaimed()
    stats = bus.stats()
    assert (stats.unclaimed_reads, stats.unclaimed_writes) == (2, 5)
