"""QEMU's isa-debug-exit semantics: writing v ends the VM with (v << 1) | 1."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avmm.bus import Bus
from avmm.devices import DEBUG_EXIT_DEFAULT_PORT, DEBUG_EXIT_PORT_COUNT, DebugExit
from avmm.devices.debug_exit import exit_status


def _mapped() -> tuple[Bus, list[int]]:
    statuses: list[int] = []
    bus = Bus("pio")
    bus.insert(
        DebugExit(on_exit=statuses.append),
        DEBUG_EXIT_DEFAULT_PORT,
        DEBUG_EXIT_PORT_COUNT,
        name="debug-exit",
    )
    return bus, statuses


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00", 1),
        (b"\x01", 3),
        (b"\x10", 0x21),
        (b"\xff", 0x1FF),
        (b"\x34\x12", (0x1234 << 1) | 1),
        (b"\xff\xff", 0x1FFFF),
        (b"\x78\x56\x34\x12", (0x12345678 << 1) | 1),
        (b"\xff\xff\xff\xff", 0x1_FFFF_FFFF),
    ],
)
def test_write_of_each_width_at_the_base_port(data: bytes, status: int) -> None:
    bus, statuses = _mapped()
    assert bus.write(DEBUG_EXIT_DEFAULT_PORT, data) is True
    assert statuses == [status]


@given(value=st.integers(0, 0xFFFF_FFFF), size=st.sampled_from([1, 2, 4]))
def test_status_is_value_shifted_with_low_bit_set(value: int, size: int) -> None:
    value &= (1 << (8 * size)) - 1
    statuses: list[int] = []
    DebugExit(on_exit=statuses.append).write(0, value.to_bytes(size, "little"))
    assert statuses == [exit_status(value)] == [(value << 1) | 1]
    assert statuses[0] & 1


def test_status_is_not_reduced_mod_256() -> None:
    # A shell would see QEMU's exit((0x80 << 1) | 1) as 1; the device reports it whole.
    assert exit_status(0x80) == 0x101


def test_offset_inside_the_range_is_ignored_like_qemu() -> None:
    bus, statuses = _mapped()
    assert bus.write(DEBUG_EXIT_DEFAULT_PORT + 1, b"\x02") is True
    assert statuses == [5]


def test_reads_return_zero() -> None:
    bus, statuses = _mapped()
    assert bus.read(DEBUG_EXIT_DEFAULT_PORT, 1) == b"\x00"
    assert bus.read(DEBUG_EXIT_DEFAULT_PORT, 4) == bytes(4)
    assert statuses == []
