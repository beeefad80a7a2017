"""The reset-only i8042 at ports 0x60..0x64."""

from __future__ import annotations

from structlog.testing import capture_logs

from avmm.bus import Bus
from avmm.devices import I8042, I8042_BASE_PORT, I8042_PORT_COUNT

DATA_PORT = 0x60
COMMAND_PORT = 0x64


def _mapped() -> tuple[Bus, list[str]]:
    resets: list[str] = []
    bus = Bus("pio")
    device = I8042(on_reset=lambda: resets.append("reset"))
    bus.insert(device, I8042_BASE_PORT, I8042_PORT_COUNT, name="i8042")
    return bus, resets


def test_mapping_covers_data_and_command_ports() -> None:
    assert (I8042_BASE_PORT, I8042_PORT_COUNT) == (0x60, 5)
    bus, _ = _mapped()
    assert bus.lookup(DATA_PORT) is not None
    assert bus.lookup(COMMAND_PORT) is not None
    assert bus.lookup(0x65) is None


def test_status_and_data_read_zero() -> None:
    bus, _ = _mapped()
    assert bus.read(COMMAND_PORT, 1) == b"\x00"  # no output byte, input buffer empty
    assert bus.read(DATA_PORT, 1) == b"\x00"
    assert bus.read(0x61, 1) == b"\x00"
    assert bus.read(DATA_PORT, 4) == bytes(4)


def test_pulse_reset_command_calls_on_reset() -> None:
    bus, resets = _mapped()
    assert bus.write(COMMAND_PORT, b"\xfe") is True
    assert resets == ["reset"]
    assert bus.write(COMMAND_PORT, b"\xfe") is True
    assert resets == ["reset", "reset"]


def test_other_writes_are_ignored_and_logged_at_debug() -> None:
    bus, resets = _mapped()
    with capture_logs() as logs:
        assert bus.write(COMMAND_PORT, b"\xaa") is True  # self-test
        assert bus.write(COMMAND_PORT, b"\xad") is True  # disable keyboard
        assert bus.write(DATA_PORT, b"\xfe") is True  # 0xFE on the data port is no reset
        assert bus.write(0x61, b"\x03") is True
    assert resets == []
    assert [entry["log_level"] for entry in logs] == ["debug"] * 4
    assert logs[0]["command"] == "0xaa"


def test_reset_in_a_wide_write_at_the_command_offset() -> None:
    resets: list[str] = []
    device = I8042(on_reset=lambda: resets.append("reset"))
    device.write(3, b"\x00\xfe")  # offset 3 ignored, offset 4 = command 0xFE
    assert resets == ["reset"]
