"""The test guest under QEMU's microvm machine, with TCG and with KVM.

QEMU boots the guest through its PVH note, so these tests check the guest
itself (serial, command line, scenarios, exit codes, mailbox) against a VMM
that is not ours. The guest's contracts are in tests/guest/README.md.

Exit statuses under QEMU (isa-debug-exit maps a written value v to (v << 1) | 1):
    0  clean power-off: the guest pulsed the i8042 reset line and -no-reboot exited
    1  clean power-off without an i8042: the guest fell back to writing 0 to port 0x501
    3  scenario failed (guest exit code 1)
    5  unknown scenario (guest exit code 2)
    7  CPU exception (guest exit code 3)
"""

from __future__ import annotations

import json
import os
import re
import select
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
STATUS_FAILURE = (1 << 1) | 1
STATUS_UNKNOWN_SCENARIO = (2 << 1) | 1
STATUS_EXCEPTION = (3 << 1) | 1

ACCELS = [
    pytest.param("tcg", id="tcg"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
]

# The paravirtual KVM of our development machines interprets guest ring 0, and its
# instruction emulator refuses a ring-0 int3 (KVM_EXIT_INTERNAL_ERROR, emulation
# failure). avmm injects the #BP itself (avmm/kvm/x86/emulation.py); QEMU stops the VM.
KVM_PVM = Path("/sys/module/kvm_pvm").exists()


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


def run_guest(
    elf: Path, accel: str, cmdline: str, *, i8042: bool = True, serial_input: bytes | None = None
) -> tuple[int, list[str]]:
    """Boot the guest to the end; return QEMU's exit status and the serial lines.

    ``serial_input`` is written to the serial port's input (QEMU's stdin) at once,
    before the guest even boots; stdin is then closed.
    """
    result = subprocess.run(
        qemu_argv(elf, accel, cmdline, i8042=i8042),
        input=serial_input,
        stdin=subprocess.DEVNULL if serial_input is None else None,
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


def run_guest_to_pause(
    elf: Path, accel: str, cmdline: str, tmp_path: Path
) -> tuple[str, list[str], list[int]]:
    """Boot the guest with QEMU kept alive once the VM stops; read the mailbox then.

    Returns the final run state (``shutdown`` after a clean power-off; others such as
    ``internal-error`` mean QEMU stopped the VM), the serial lines and the first four
    mailbox words (magic, counter, done, result). A guest that exits through the
    debug-exit port ends QEMU instead, which fails here with "QMP closed".
    """
    qmp_path = tmp_path / "qmp.sock"
    argv = [
        *qemu_argv(elf, accel, cmdline),
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
                while (state := _qmp(stream, "query-status"))["running"]:
                    assert time.monotonic() < deadline, "guest did not stop"
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
    assert len(words) == 4, dump
    return state["status"], stdout.decode(errors="replace").splitlines(), words


@pytest.mark.parametrize("accel", ACCELS)
def test_count_mailbox_after_power_off(test_guest: Path, accel: str, tmp_path: Path) -> None:
    """The host reads magic, counter and done from the mailbox page at 0x200000."""
    n = 5 * (1 << 20) + 12345
    state, lines, words = run_guest_to_pause(
        test_guest, accel, f"avmm.test=count avmm.n={n}", tmp_path
    )
    assert state == "shutdown", lines
    magic, counter, done, result = words
    assert magic == MAILBOX_MAGIC
    assert counter == n
    assert done == 1
    assert result == 0
    assert f"avmm-testguest: count done n={n}" in lines


# ---- int3: breakpoints executed in ring 0 (ring-0 call, #BP hook, frame checks).

INT3_ACCELS = [
    pytest.param("tcg", id="tcg"),
    pytest.param(
        "kvm",
        id="kvm",
        marks=[
            pytest.mark.kvm,
            pytest.mark.xfail(
                KVM_PVM,
                reason="kvm_pvm cannot run a ring-0 int3 and QEMU does not inject the #BP",
                strict=True,
            ),
        ],
    ),
]


@pytest.mark.parametrize("accel", INT3_ACCELS)
@pytest.mark.parametrize("n", [None, 1, 17])
def test_int3_in_ring0_is_counted(
    test_guest: Path, accel: str, n: int | None, tmp_path: Path
) -> None:
    """Every int3 runs the #BP hook once, with the frame the CPU pushes for a trap."""
    cmdline = "avmm.test=int3" + ("" if n is None else f" avmm.n={n}")
    expected = 3 if n is None else n
    state, lines, words = run_guest_to_pause(test_guest, accel, cmdline, tmp_path)
    assert state == "shutdown", lines
    assert lines == [f"avmm-testguest: int3 ok count={expected}"]
    _, counter, done, result = words
    assert (counter, done, result) == (expected, 1, 0)


@pytest.mark.parametrize("accel", ACCELS)
def test_int3_with_no_breakpoints_runs_the_ring0_call(test_guest: Path, accel: str) -> None:
    """avmm.n=0: only the ring-0 call there and back (a ud2 turned into a call).

    This part works on every KVM, kvm_pvm included."""
    status, lines = run_guest(test_guest, accel, "avmm.test=int3 avmm.n=0")
    assert lines == ["avmm-testguest: int3 ok count=0"]
    assert status == STATUS_POWER_OFF


def test_int3_in_ring3_is_a_general_protection_fault(test_guest: Path) -> None:
    """The #BP gate has DPL 0: int3 from ring 3 is #GP naming IDT entry 3.

    The architecture's error code is 3 * 8 + 2 = 0x1a; QEMU 7.2's TCG pushes
    3 * 16 + 2 = 0x32 in 64-bit mode. TCG only: kvm_pvm delivers #BP instead."""
    status, lines = run_guest(test_guest, "tcg", "avmm.test=fault avmm.fault=bp")
    report = r"avmm-testguest: exception 13 rip=0x[0-9a-f]+ err=0x(1a|32)"
    assert re.fullmatch(report, lines[0]), lines
    assert status == STATUS_EXCEPTION


# ---- echo: serial input, polled.


class SerialConsole:
    """QEMU's stdio serial port: send input, wait for whole output lines."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._fd = process.stdout.fileno()
        self._buffer = b""
        self.lines: list[str] = []

    def send(self, data: bytes) -> None:
        self._stdin.write(data)
        self._stdin.flush()

    def read_line(self, timeout: float = TIMEOUT_S) -> str:
        """The next line of output (without its newline); fails on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"no complete line in time; so far {self.lines} + {self._buffer!r}"
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 4096)
                assert chunk, f"QEMU closed its output; so far {self.lines} + {self._buffer!r}"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode(errors="replace")
        self.lines.append(text)
        return text


@pytest.mark.parametrize("accel", ACCELS)
def test_echo_answers_each_line_typed_after_ready(test_guest: Path, accel: str) -> None:
    long_line = bytes(range(0x41, 0x5B)) * 10  # 260 bytes, cut at 200
    exchanges = [
        (b"hello\n", "hello"),
        (b"two words, punct!\r", "two words, punct!"),
        (b"crlf\r\n", "crlf"),  # \r\n is one line end
        (b"\n", ""),
        (b"quit now\n", "quit now"),  # only a line that is exactly "quit" ends it
        (long_line + b"\n", long_line[:200].decode()),
        (b"after the long one\n", "after the long one"),
    ]
    with subprocess.Popen(
        qemu_argv(test_guest, accel, "avmm.test=echo"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        try:
            console = SerialConsole(process)
            assert console.read_line() == "avmm-testguest: echo ready"
            for sent, echoed in exchanges:
                console.send(sent)
                assert console.read_line() == f"avmm-testguest: echo {echoed}", sent
            console.send(b"quit\n")
            assert console.read_line() == "avmm-testguest: echo bye"
            status = process.wait(timeout=TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert status == STATUS_POWER_OFF


def test_echo_keeps_input_sent_before_it_is_ready(test_guest: Path) -> None:
    """Input that reaches the UART while the guest boots is not lost (the guest's
    serial_init leaves the FIFOs alone), and several lines in one write are split."""
    status, lines = run_guest(
        test_guest, "tcg", "avmm.test=echo", serial_input=b"hello\nworld\rquit\n"
    )
    assert lines == [
        "avmm-testguest: echo ready",
        "avmm-testguest: echo hello",
        "avmm-testguest: echo world",
        "avmm-testguest: echo bye",
    ]
    assert status == STATUS_POWER_OFF
