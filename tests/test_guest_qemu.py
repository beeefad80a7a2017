"""The test guest under QEMU's microvm machine, with TCG and with KVM.

QEMU boots the guest through its PVH note, so these tests check the guest
itself (serial, command line, scenarios, exit codes, mailbox) against a VMM
that is not ours. The guest's contracts are in tests/guest/README.md.

Exit statuses under QEMU (isa-debug-exit maps a written value v to (v << 1) | 1):
    0  clean power-off: the guest pulsed the i8042 reset line and -no-reboot exited
    1  clean power-off without an i8042: the guest fell back to writing 0 to port 0x501
    5  unknown scenario (guest exit code 2)
    7  CPU exception (guest exit code 3)
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, TextIO

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

QEMU = "qemu-system-x86_64"
TIMEOUT_S = 60
MAILBOX_GPA = 0x200000
MAILBOX_MAGIC = 0x584F424C49414D41  # "AMAILBOX"

STATUS_POWER_OFF = 0
STATUS_POWER_OFF_NO_I8042 = 1
STATUS_UNKNOWN_SCENARIO = (2 << 1) | 1
STATUS_EXCEPTION = (3 << 1) | 1

ACCELS = [
    pytest.param("tcg", id="tcg"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
]


def qemu_argv(elf: Path, accel: str, cmdline: str, *, i8042: bool = True) -> list[str]:
    argv = [
        QEMU,
        "-M", f"microvm,accel={accel}",
        "-m", "64",
        "-smp", "1",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0x501,iosize=2",
        "-kernel", str(elf),
        "-append", cmdline,
    ]  # fmt: skip
    if accel == "kvm":
        # The default CPU model asks for features this host's KVM lacks (warnings).
        argv += ["-cpu", "host"]
    if i8042:
        # microvm has no i8042 of its own; with one, the guest's power-off exits 0.
        argv += ["-device", "i8042"]
    return argv


def run_guest(elf: Path, accel: str, cmdline: str, *, i8042: bool = True) -> tuple[int, list[str]]:
    """Boot the guest to the end; return QEMU's exit status and the serial lines."""
    result = subprocess.run(
        qemu_argv(elf, accel, cmdline, i8042=i8042),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    stdout = result.stdout.decode(errors="replace")
    assert "avmm-testguest" in stdout, f"no guest output; stderr: {result.stderr!r}"
    return result.returncode, stdout.splitlines()


@pytest.mark.parametrize("accel", ACCELS)
def test_hello_prints_greeting_and_exact_cmdline(test_guest: Path, accel: str) -> None:
    cmdline = 'avmm.test=hello  extra=words with,punct "quoted value" avmm.n=42 last'
    status, lines = run_guest(test_guest, accel, cmdline)
    assert lines[:2] == [
        "avmm-testguest: hello",
        f"avmm-testguest: cmdline: {cmdline}",
    ], lines
    assert status == STATUS_POWER_OFF


def test_hello_is_the_default_scenario(test_guest: Path) -> None:
    status, lines = run_guest(test_guest, "tcg", "nothing=here")
    assert lines[:2] == ["avmm-testguest: hello", "avmm-testguest: cmdline: nothing=here"]
    assert status == STATUS_POWER_OFF


def test_power_off_falls_back_to_debug_exit_without_i8042(test_guest: Path) -> None:
    status, lines = run_guest(test_guest, "tcg", "avmm.test=hello", i8042=False)
    assert lines[0] == "avmm-testguest: hello"
    assert status == STATUS_POWER_OFF_NO_I8042


@pytest.mark.parametrize(
    ("accel", "n"),
    [
        pytest.param("tcg", 3_000_000, id="tcg"),
        pytest.param("kvm", 100_000_000, id="kvm", marks=pytest.mark.kvm),
    ],
)
def test_count_reports_done(test_guest: Path, accel: str, n: int) -> None:
    status, lines = run_guest(test_guest, accel, f"avmm.test=count avmm.n={n}")
    assert f"avmm-testguest: count done n={n}" in lines
    assert status == STATUS_POWER_OFF


def test_unknown_scenario_exits_with_status_2(test_guest: Path) -> None:
    status, lines = run_guest(test_guest, "tcg", "avmm.test=no-such-thing")
    assert lines == ["avmm-testguest: unknown scenario no-such-thing"]
    assert status == STATUS_UNKNOWN_SCENARIO


@pytest.mark.parametrize("accel", ACCELS)
def test_ring3_exception_is_reported(test_guest: Path, accel: str) -> None:
    status, lines = run_guest(test_guest, accel, "avmm.test=fault avmm.fault=ud")
    assert re.fullmatch(r"avmm-testguest: exception 6 rip=0x[0-9a-f]+ err=0x0", lines[0]), lines
    # The exception came from ring 3 (CS RPL 3), not from the ring-0 setup.
    assert "cs=0x23 " in lines[1], lines
    assert status == STATUS_EXCEPTION


def _qmp(stream: TextIO, command: str, **arguments: object) -> Any:
    message: dict[str, object] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    stream.write(json.dumps(message) + "\n")
    stream.flush()
    while True:
        line = stream.readline()
        assert line, f"QMP closed while waiting for {command}"
        reply = json.loads(line)
        if "event" in reply:
            continue
        assert "return" in reply, reply
        return reply["return"]


def _connect(path: Path, process: subprocess.Popen[bytes]) -> socket.socket:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            assert process.poll() is None, "QEMU exited before QMP came up"
            assert time.monotonic() < deadline, "QMP socket never came up"
            time.sleep(0.05)


@pytest.mark.parametrize("accel", ACCELS)
def test_count_mailbox_after_power_off(test_guest: Path, accel: str, tmp_path: Path) -> None:
    """The host reads magic, counter and done from the mailbox page at 0x200000."""
    n = 5 * (1 << 20) + 12345
    qmp_path = tmp_path / "qmp.sock"
    argv = [
        *qemu_argv(test_guest, accel, f"avmm.test=count avmm.n={n}"),
        # Stay around after the guest powers off so that its memory can be read.
        "-action", "shutdown=pause",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        try:
            with _connect(qmp_path, process) as sock, sock.makefile("rw") as stream:
                json.loads(stream.readline())  # greeting
                _qmp(stream, "qmp_capabilities")
                deadline = time.monotonic() + TIMEOUT_S
                while _qmp(stream, "query-status")["status"] != "shutdown":
                    assert time.monotonic() < deadline, "guest did not power off"
                    time.sleep(0.05)
                dump = _qmp(
                    stream, "human-monitor-command", **{"command-line": f"xp /4gx {MAILBOX_GPA:#x}"}
                )
                _qmp(stream, "quit")
            stdout, _ = process.communicate(timeout=TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    words = [int(w, 16) for w in re.findall(r"0x([0-9a-f]{16})", dump)]
    magic, counter, done, result = words
    assert magic == MAILBOX_MAGIC
    assert counter == n
    assert done == 1
    assert result == 0
    assert f"avmm-testguest: count done n={n}" in stdout.decode(errors="replace")
