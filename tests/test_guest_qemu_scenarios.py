"""The test guest's ``console`` and ``high-mem`` scenarios under QEMU microvm: its
virtio-console driver is checked against QEMU's virtio-serial, and its page tables
against QEMU's RAM above 4 GiB, so that avmm's tests of the same scenarios do not only
agree with avmm."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.test_guest_qemu import ACCELS, MODERN_MMIO, STATUS_FAILURE, qemu_argv
from tests.vm.guest_report import guest_report

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

TIMEOUT_S = 60


def console_lines(inputs: list[str]) -> str:
    lines = ["hello", *(f"echo {line}" for line in inputs), "bye"]
    return "".join(f"avmm-testguest: console {line}\n" for line in lines)


@pytest.mark.parametrize("accel", ACCELS)
def test_console_scenario_against_qemus_virtio_serial(test_guest: Path, accel: str,
                                                      tmp_path: Path) -> None:
    """QEMU's virtconsole on stdin/stdout is port 0 of a virtio-serial device; the
    guest does not negotiate MULTIPORT, so port 0's queues are 0 and 1 as on avmm."""
    serial = tmp_path / "serial.txt"
    argv = qemu_argv(test_guest, accel, "avmm.test=console", machine=",acpi=off", extra=[
        *MODERN_MMIO, "-device", "virtio-serial-device",
        "-chardev", "stdio,id=c0,signal=off", "-device", "virtconsole,chardev=c0"])
    # The console takes stdio; the UART goes to a file instead.
    argv[argv.index("-serial") + 1] = f"file:{serial}"
    nographic = argv.index("-nographic")  # it would put the UART on stdio too
    argv[nographic:nographic + 1] = ["-display", "none"]
    inputs = ["from qemu", "after a CRLF"]
    result = subprocess.run(argv, input=f"{inputs[0]}\r\n{inputs[1]}\nquit\n".encode(),
                            capture_output=True, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, (result.stderr, serial.read_text())
    assert result.stdout.decode() == console_lines(inputs)
    assert guest_report(serial.read_text(), "console0")["echoed"] == str(len(inputs))


@pytest.mark.parametrize("address", [0x1_0000_0000, 0x1_1FF0_0000])
def test_high_mem_scenario_under_qemu(test_guest: Path, address: int) -> None:
    """-m 3584M: microvm puts 3 GiB below the 32-bit hole and 512 MiB from 4 GiB."""
    argv = qemu_argv(test_guest, "tcg", f"avmm.test=high-mem avmm.addr={address:#x}")
    argv[argv.index("-m") + 1] = "3584M"
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=TIMEOUT_S, check=False)
    output = result.stdout.decode()
    assert result.returncode == 0, (output, result.stderr)
    report = guest_report(output, "high-mem")
    assert report["addr"] == f"{address:#x}" and report["verify"] == "ok"


def test_high_mem_scenario_fails_where_there_is_no_ram(test_guest: Path) -> None:
    argv = qemu_argv(test_guest, "tcg", "avmm.test=high-mem avmm.size=512")
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=TIMEOUT_S, check=False)
    assert result.returncode == STATUS_FAILURE
    assert "high-mem verify=FAIL offset=0x0" in result.stdout.decode()
