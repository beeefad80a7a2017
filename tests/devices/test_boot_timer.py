"""The boot-time marker port: one call for the first marker byte, nothing else counts."""

from __future__ import annotations

from avmm.devices.boot_timer import BOOT_MARKER, BootTimer


def test_first_marker_write_is_reported_once() -> None:
    calls: list[None] = []
    timer = BootTimer(on_marker=lambda: calls.append(None))
    timer.write(0, bytes([BOOT_MARKER]))
    timer.write(0, bytes([BOOT_MARKER]))
    assert len(calls) == 1
    assert timer.reached


def test_other_values_and_widths_are_ignored() -> None:
    calls: list[None] = []
    timer = BootTimer(on_marker=lambda: calls.append(None))
    timer.write(0, bytes([BOOT_MARKER - 1]))
    timer.write(0, BOOT_MARKER.to_bytes(2, "little"))
    timer.write(0, b"")
    assert calls == []
    assert not timer.reached
    assert timer.read(0, 1) == b"\x00"
