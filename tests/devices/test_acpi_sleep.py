"""ACPI power-off through the hardware-reduced sleep control register."""

from __future__ import annotations

from avmm.arch.x86.acpi import S5_SLEEP_TYPE
from avmm.devices.acpi_sleep import SLP_EN, AcpiSleep, sleep_control_value


def make() -> tuple[AcpiSleep, list[None]]:
    calls: list[None] = []
    return AcpiSleep(soft_off_type=S5_SLEEP_TYPE, on_poweroff=lambda: calls.append(None)), calls


def test_s5_with_slp_en_powers_off() -> None:
    device, calls = make()
    device.write(1, b"\x80")  # Linux first clears WAK_STS in the status register
    assert calls == []
    device.write(0, bytes([sleep_control_value(S5_SLEEP_TYPE)]))
    assert calls == [None]


def test_other_writes_are_ignored() -> None:
    device, calls = make()
    device.write(0, bytes([sleep_control_value(S5_SLEEP_TYPE) & ~SLP_EN]))  # no SLP_EN
    device.write(0, bytes([sleep_control_value(3)]))  # S3: not offered
    device.write(0, bytes([sleep_control_value(S5_SLEEP_TYPE), 0]))  # a 2-byte write
    assert calls == []
    assert device.read(0, 1) == b"\x00" and device.read(1, 1) == b"\x00"
