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

import os
import re
import select
import subprocess
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from virtio_guest_support import (
    EthernetEchoer,
    TapNamespace,
    blk_pattern,
    echoing_tap,
    expected_pattern,
    parse_result_lines,
    qemu_tap_netdev,
)

from benchmarks import qmp
from benchmarks.common import QEMU_KVM_CPU
from tests.prerequisites import net_problem, require

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


def qemu_argv(
    elf: Path,
    accel: str,
    cmdline: str,
    *,
    i8042: bool = True,
    machine: str = "",
    extra: Sequence[str] = (),
    cpus: int = 1,
) -> list[str]:
    """QEMU's command line; ``machine`` adds ``-M`` options (``,acpi=off``), ``extra``
    goes at the end (devices), ``cpus`` is ``-smp``."""
    argv = [
        QEMU,
        "-M", f"microvm,accel={accel}{machine}",
        "-m", "64",
        "-smp", str(cpus),
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
        argv += ["-cpu", QEMU_KVM_CPU]
    if i8042:
        # microvm has no i8042 of its own; with one, the guest's power-off exits 0.
        argv += ["-device", "i8042"]
    return [*argv, *extra]


def run_guest(
    elf: Path,
    accel: str,
    cmdline: str,
    *,
    i8042: bool = True,
    serial_input: bytes | None = None,
    machine: str = "",
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
    cpus: int = 1,
) -> tuple[int, list[str]]:
    """Boot the guest to the end; return QEMU's exit status and the serial lines.

    ``serial_input`` is written to the serial port's input (QEMU's stdin) at once,
    before the guest even boots; stdin is then closed. ``prefix`` runs QEMU under
    another command (``ip netns exec NS``); ``machine``, ``extra`` and ``cpus`` go to
    :func:`qemu_argv`.
    """
    argv = qemu_argv(elf, accel, cmdline, i8042=i8042, machine=machine, extra=extra,
                     cpus=cpus)
    result = subprocess.run(
        [*prefix, *argv],
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


# smp: the guest starts its APs itself (INIT, SIPI, SIPI). TCG takes any count; this
# workplace's KVM at most 2 vCPUs.
@pytest.mark.parametrize(
    ("accel", "cpus"),
    [
        pytest.param("tcg", 1, id="tcg-1"),
        pytest.param("tcg", 2, id="tcg-2"),
        pytest.param("tcg", 4, id="tcg-4"),
        pytest.param("kvm", 2, id="kvm-2", marks=pytest.mark.kvm),
    ],
)
def test_smp_every_cpu_reports_in(test_guest: Path, accel: str, cpus: int) -> None:
    status, lines = run_guest(test_guest, accel, "avmm.test=smp", cpus=cpus)
    ids = ",".join(str(i) for i in range(cpus))
    assert lines == [f"avmm-testguest: smp cpus={cpus} reported={cpus} apic_ids={ids}"], lines
    assert status == STATUS_POWER_OFF


def test_smp_missing_cpu_fails_after_the_timeout(test_guest: Path) -> None:
    # avmm.cpus=3 claims a CPU that does not exist: nothing answers at APIC ID 2.
    status, lines = run_guest(test_guest, "tcg", "avmm.test=smp avmm.cpus=3", cpus=2)
    assert lines == [
        "avmm-testguest: smp cpus=3 reported=2 apic_ids=0,1",
        "avmm-testguest: smp FAIL (2 of 3 CPUs reported in within 5000 ms)",
    ], lines
    assert status == STATUS_FAILURE


def run_guest_to_pause(
    elf: Path,
    accel: str,
    cmdline: str,
    tmp_path: Path,
    *,
    words: int = 4,
    machine: str = "",
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> tuple[str, list[str], list[int]]:
    """Boot the guest with QEMU kept alive once the VM stops; read the mailbox then.

    Returns the final run state (``shutdown`` after a clean power-off; others such as
    ``internal-error`` or ``io-error`` mean QEMU stopped the VM), the serial lines and
    the first ``words`` mailbox words (magic, counter, done, result, then the reserved
    words and the scratch area from word 8). A guest that exits through the debug-exit
    port ends QEMU instead, which fails here with "QMP closed". ``machine``, ``extra``
    and ``prefix`` are as for :func:`run_guest`.
    """
    qmp_path = tmp_path / "qmp.sock"
    argv = [
        *prefix,
        *qemu_argv(elf, accel, cmdline, machine=machine, extra=extra),
        # Stay around after the guest powers off so that its memory can be read.
        "-action", "shutdown=pause",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        try:
            with qmp.connect(qmp_path, process, timeout_s=TIMEOUT_S, poll_s=0.05) as monitor:
                deadline = time.monotonic() + TIMEOUT_S
                while (state := monitor.command("query-status"))["running"]:
                    assert time.monotonic() < deadline, "guest did not stop"
                    time.sleep(0.05)
                dump = monitor.command(
                    "human-monitor-command",
                    **{"command-line": f"xp /{words}gx {MAILBOX_GPA:#x}"},
                )
                monitor.command("quit")
            stdout, _ = process.communicate(timeout=TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    values = [int(w, 16) for w in re.findall(r"0x([0-9a-f]{16})", dump)]
    assert len(values) == words, dump
    return state["status"], stdout.decode(errors="replace").splitlines(), values


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


# ---- virtio: the guest's polling drivers against QEMU's virtio-mmio devices.
#
# microvm puts virtio_mmio.device=<size>@<base>:<irq> words on the command line only
# with acpi=off, and its virtio-mmio transports are legacy (version 1) unless
# virtio-mmio.force-legacy=false: the guest drives modern (version 2) devices only.

VIRTIO_MACHINE = ",acpi=off"
MODERN_MMIO = ["-global", "virtio-mmio.force-legacy=false"]
GUEST_MAC = "52:54:00:12:34:56"


def blk_drive(index: int, image: Path, options: str = "", device_options: str = "") -> list[str]:
    """A virtio-blk device for ``image``; ``options`` are extra ``-drive`` options,
    ``device_options`` extra ``-device`` ones."""
    return [
        "-device", f"virtio-blk-device,drive=d{index}{device_options}",
        "-drive", f"id=d{index},file={image},format=raw,if=none{options}",
    ]  # fmt: skip


def blk_args(*images: Path, options: str = "") -> list[str]:
    """Modern virtio-mmio transports and one virtio-blk device per image, in order."""
    args = [*MODERN_MMIO]
    for i, image in enumerate(images):
        args += blk_drive(i, image, options)
    return args


def random_image(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def run_virtio(
    elf: Path, accel: str, cmdline: str, extra: Sequence[str], **kwargs: Any
) -> tuple[int, list[str]]:
    return run_guest(elf, accel, cmdline, machine=VIRTIO_MACHINE, extra=extra, **kwargs)


def test_host_helpers_pattern_and_result_lines() -> None:
    """The pattern's first words (README.md quotes them) and the line parser."""
    assert blk_pattern(1, 0)[:16].hex() == "f465b9a16a9e786e67ec8e65a18debbe"
    assert expected_pattern(3, 2, start=5) == blk_pattern(3, 5) + blk_pattern(3, 6)
    output = (
        "avmm-testguest: blk0 sectors=8192 crc32=5189d674\n"
        "avmm-testguest: blk1 readonly write=ioerr\n"
        "avmm-testguest: hello\n"
        "avmm-testguest: rng0 00ff\n"
    )
    assert parse_result_lines(output) == {
        "blk0": {"sectors": "8192", "crc32": "5189d674"},
        "blk1": {"readonly": True, "write": "ioerr"},
        "rng0": {"00ff": True},
    }


def test_virtio_mmio_words_appear_only_with_acpi_off(test_guest: Path, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 1 << 16)
    devices = [*blk_args(image), "-device", "virtio-rng-device"]
    _, lines = run_virtio(test_guest, "tcg", "avmm.test=hello", devices)
    # Highest transport first, in the order of the -device options.
    assert lines[1] == (
        "avmm-testguest: cmdline: avmm.test=hello "
        "virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11"
    )
    _, lines = run_guest(test_guest, "tcg", "avmm.test=hello", extra=devices)
    assert lines[1] == "avmm-testguest: cmdline: avmm.test=hello"


def test_virtio_legacy_transport_is_skipped(test_guest: Path, tmp_path: Path) -> None:
    """QEMU's default virtio-mmio transport is the legacy one (version 1)."""
    image = random_image(tmp_path / "disk.img", 1 << 16)
    status, lines = run_virtio(test_guest, "tcg", "avmm.test=blk-crc", blk_drive(0, image))
    assert lines == [
        "avmm-testguest: virtio@0xfeb00e00 legacy device, skipped",
        "avmm-testguest: no virtio-blk device",
    ]
    assert status == STATUS_FAILURE


@pytest.mark.parametrize(
    ("scenario", "line"),
    [
        ("blk-crc", "no virtio-blk device"),
        ("blk-write", "no virtio-blk device"),
        ("blk-io", "no virtio-blk device"),
        ("blk-hostile avmm.hostile=loop", "no virtio-blk device"),
        ("net-echo", "no virtio-net device"),
        ("rng", "no virtio-rng device"),
    ],
)
def test_virtio_scenario_without_its_device_fails_clearly(
    test_guest: Path, scenario: str, line: str
) -> None:
    status, lines = run_virtio(test_guest, "tcg", f"avmm.test={scenario}", MODERN_MMIO)
    assert lines == [f"avmm-testguest: {line}"]
    assert status == STATUS_FAILURE


@pytest.mark.parametrize("accel", ACCELS)
def test_blk_crc_matches_zlib_and_lands_in_the_mailbox(
    test_guest: Path, accel: str, tmp_path: Path
) -> None:
    image = random_image(tmp_path / "disk.img", 4 << 20)
    crc = zlib.crc32(image.read_bytes())
    state, lines, words = run_guest_to_pause(
        test_guest, accel, "avmm.test=blk-crc", tmp_path,
        words=11, machine=VIRTIO_MACHINE, extra=blk_args(image),
    )  # fmt: skip
    assert state == "shutdown", lines
    assert lines == [f"avmm-testguest: blk0 sectors=8192 crc32={crc:08x}"]
    _, counter, done, result = words[:4]
    assert (counter, done, result) == (8192, 1, 0)
    assert words[8:11] == [1, 8192, crc]  # scratch: devices, sectors, crc of blk0


@pytest.mark.parametrize(
    "options",
    [
        "",
        "avmm.indirect=1",
        "avmm.req=7 avmm.qsize=4",
        "avmm.indirect=1 avmm.req=3 avmm.qsize=4",
        "avmm.seg=1000 avmm.qsize=32",
        "avmm.indirect=1 avmm.seg=4096",
    ],
)
def test_blk_crc_of_two_disks(test_guest: Path, tmp_path: Path, options: str) -> None:
    """Two disks, numbered in command-line order; one not a multiple of the request size;
    with indirect descriptors, odd request sizes, tiny queues, data split into segments
    (1000 bytes: segments that are not whole sectors)."""
    images = [
        random_image(tmp_path / "a.img", 2 << 20),
        random_image(tmp_path / "b.img", (1 << 20) + 3 * 512),
    ]
    status, lines = run_virtio(test_guest, "tcg", f"avmm.test=blk-crc {options}", blk_args(*images))
    assert lines == [
        f"avmm-testguest: blk{i} sectors={image.stat().st_size // 512} "
        f"crc32={zlib.crc32(image.read_bytes()):08x}"
        for i, image in enumerate(images)
    ]
    assert status == STATUS_POWER_OFF


@pytest.mark.parametrize(
    ("accel", "size"),
    [
        pytest.param("tcg", 4 << 20, id="tcg"),
        pytest.param("kvm", 1 << 20, id="kvm", marks=pytest.mark.kvm),
    ],
)
def test_blk_write_leaves_the_pattern_on_the_host_image(
    test_guest: Path, accel: str, size: int, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(size))
    seed = int.from_bytes(os.urandom(8), "little")
    sectors = size // 512
    status, lines = run_virtio(
        test_guest, accel, f"avmm.test=blk-write avmm.seed={seed}", blk_args(image)
    )
    assert lines == [f"avmm-testguest: blk0 written={sectors} verify=ok"]
    assert status == STATUS_POWER_OFF
    assert image.read_bytes() == expected_pattern(seed, sectors)


def test_blk_write_on_a_readonly_disk_gets_ioerr_and_changes_nothing(
    test_guest: Path, tmp_path: Path
) -> None:
    writable = tmp_path / "rw.img"
    writable.write_bytes(bytes(64 << 10))
    readonly = random_image(tmp_path / "ro.img", 1 << 20)
    before = readonly.read_bytes()
    devices = [*blk_args(writable), *blk_drive(1, readonly, ",readonly=on")]
    status, lines = run_virtio(test_guest, "tcg", "avmm.test=blk-write", devices)
    assert lines == [
        "avmm-testguest: blk0 written=128 verify=ok",
        "avmm-testguest: blk1 readonly write=ioerr",
    ]
    assert status == STATUS_POWER_OFF
    assert readonly.read_bytes() == before
    assert writable.read_bytes() == expected_pattern(1, 128)


def test_blk_write_without_flush_says_so(test_guest: Path, tmp_path: Path) -> None:
    """QEMU offers VIRTIO_BLK_F_FLUSH only with a write cache (or config-wce)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 << 10))
    devices = [*MODERN_MMIO, *blk_drive(0, image, ",cache=writethrough", ",config-wce=off")]
    status, lines = run_virtio(test_guest, "tcg", "avmm.test=blk-write avmm.seed=9", devices)
    assert lines == [
        "avmm-testguest: blk0 flush=skipped (VIRTIO_BLK_F_FLUSH not offered)",
        "avmm-testguest: blk0 written=128 verify=ok",
    ]
    assert status == STATUS_POWER_OFF
    assert image.read_bytes() == expected_pattern(9, 128)


def test_blk_indirect_needs_the_feature(test_guest: Path, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 64 << 10)
    devices = [*MODERN_MMIO, *blk_drive(0, image, device_options=",indirect_desc=off")]
    status, lines = run_virtio(test_guest, "tcg", "avmm.test=blk-crc avmm.indirect=1", devices)
    assert lines == ["avmm-testguest: blk0 does not offer VIRTIO_F_INDIRECT_DESC"]
    assert status == STATUS_FAILURE


def test_blk_io_writes_sector_by_sector(test_guest: Path, tmp_path: Path) -> None:
    image = random_image(tmp_path / "disk.img", 64 << 10)
    rest = image.read_bytes()[16 * 512 :]
    status, lines = run_virtio(test_guest, "tcg", "avmm.test=blk-io avmm.n=16", blk_args(image))
    assert lines == ["avmm-testguest: blk0 status=ok sector=16"]
    assert status == STATUS_POWER_OFF
    assert image.read_bytes() == expected_pattern(7, 16) + rest


def _require_root_for_mounts() -> None:
    require(None if os.geteuid() == 0 else "mounting a tmpfs needs root")


def _on_a_full_filesystem(tmp_path: Path) -> tuple[list[str], Path]:
    """A command prefix that runs QEMU in a private mount namespace with a 64 KiB tmpfs
    on ``tmp_path / "small"`` holding a 4 MiB sparse image (QEMU is exec'd with the
    rest of the command line). Needs root: require() fails the test in CI without it."""
    _require_root_for_mounts()
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    image = mountpoint / "sparse.img"
    script = (
        f'mount -t tmpfs -o size=64k avmm-full {mountpoint} && truncate -s 4M {image} && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"], image


def test_blk_io_on_a_full_filesystem_reports_ioerr_with_werror_report(
    test_guest: Path, tmp_path: Path
) -> None:
    prefix, image = _on_a_full_filesystem(tmp_path)
    status, lines = run_virtio(
        test_guest, "tcg", "avmm.test=blk-io avmm.n=8192",
        blk_args(image, options=",werror=report"), prefix=prefix,
    )  # fmt: skip
    match = re.fullmatch(r"avmm-testguest: blk0 status=ioerr sector=(\d+)", lines[-1])
    assert match, lines
    assert 0 < int(match.group(1)) < 8192
    assert status == STATUS_POWER_OFF


def test_blk_io_on_a_full_filesystem_stops_qemu_by_default(
    test_guest: Path, tmp_path: Path
) -> None:
    """QEMU's default werror=enospc stops the VM (run state io-error) instead of
    completing the request: the guest never sees the error."""
    prefix, image = _on_a_full_filesystem(tmp_path)
    state, lines, words = run_guest_to_pause(
        test_guest, "tcg", "avmm.test=blk-io avmm.n=8192", tmp_path,
        machine=VIRTIO_MACHINE, extra=blk_args(image), prefix=prefix,
    )  # fmt: skip
    assert state == "io-error", lines
    assert lines == []
    _, counter, done, _ = words
    assert 0 < counter < 8192  # the sectors written before the file system filled up
    assert done == 0


@pytest.mark.parametrize(
    ("hostility", "outcome"),
    [
        # QEMU: "Incorrect order for descriptors" (the loop comes back to the
        # device-readable header after the writable status byte), then NEEDS_RESET.
        ("loop", ["avmm-testguest: blk0 needs_reset=1"]),
        # QEMU: "virtio-blk request outhdr too short", then NEEDS_RESET.
        ("len", ["avmm-testguest: blk0 needs_reset=1"]),
        # QEMU maps a descriptor into unassigned guest-physical space through its bounce
        # buffer like MMIO: the read "succeeds" (the data goes nowhere), no NEEDS_RESET.
        (
            "oob",
            [
                "avmm-testguest: blk0 needs_reset=0",
                "avmm-testguest: blk0 hostile request completed status=ok",
            ],
        ),
    ],
)
def test_blk_hostile_request_then_reset_and_recover(
    test_guest: Path, tmp_path: Path, hostility: str, outcome: list[str]
) -> None:
    image = random_image(tmp_path / "disk.img", 64 << 10)
    status, lines = run_virtio(
        test_guest, "tcg", f"avmm.test=blk-hostile avmm.hostile={hostility}", blk_args(image)
    )
    assert lines == [*outcome, "avmm-testguest: blk0 recovered=ok"]
    assert status == STATUS_POWER_OFF


@pytest.mark.parametrize("accel", ACCELS)
def test_rng_prints_32_random_bytes(test_guest: Path, accel: str) -> None:
    seen = []
    for _ in range(2):
        status, lines = run_virtio(
            test_guest, accel, "avmm.test=rng", [*MODERN_MMIO, "-device", "virtio-rng-device"]
        )
        assert len(lines) == 1 and re.fullmatch(r"avmm-testguest: rng0 [0-9a-f]{64}", lines[0])
        assert status == STATUS_POWER_OFF
        data = lines[0].split()[-1]
        assert data != "0" * 64
        seen.append(data)
    assert seen[0] != seen[1]


# ---- net-echo: a tap in a private network namespace, an echoer on it, QEMU inside.


@pytest.fixture
def echoing_namespace() -> Iterator[tuple[TapNamespace, EthernetEchoer]]:
    """A tap (up) in a fresh network namespace with an echoer on it; QEMU has to run in
    the namespace (``namespace.command_prefix()``)."""
    require(net_problem())
    with echoing_tap(lifetime=TIMEOUT_S) as (namespace, echoer):
        yield namespace, echoer


def net_args(namespace: TapNamespace) -> list[str]:
    return [
        *MODERN_MMIO,
        "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
        "-netdev", qemu_tap_netdev(namespace.tap),
    ]  # fmt: skip


# QEMU 7.2 leaves num_buffers 0 in received headers when VIRTIO_NET_F_MRG_RXBUF is not
# negotiated; the spec (5.1.6.4.2) says the device MUST set it to 1. The guest is strict
# unless told otherwise (see the test below).
LAX = "avmm.lax_num_buffers=1"


@pytest.mark.parametrize(
    ("accel", "options"),
    [
        pytest.param("tcg", f"avmm.size=64 {LAX}", id="tcg-64"),
        pytest.param("tcg", f"avmm.size=1514 {LAX}", id="tcg-1514"),
        pytest.param("tcg", "avmm.size=1514 avmm.mrg=1", id="tcg-1514-mrg"),
        # A frame spread over 16 buffers of 100 bytes (num_buffers > 1).
        pytest.param("tcg", "avmm.size=1514 avmm.mrg=1 avmm.rxbuf=100", id="tcg-1514-mrg-split"),
        pytest.param("kvm", f"avmm.size=1514 {LAX}", id="kvm-1514", marks=pytest.mark.kvm),
    ],
)
def test_net_echo_through_a_tap(
    test_guest: Path,
    echoing_namespace: tuple[TapNamespace, EthernetEchoer],
    accel: str,
    options: str,
) -> None:
    namespace, echoer = echoing_namespace
    status, lines = run_virtio(
        test_guest, accel, f"avmm.test=net-echo avmm.n=20 {options}", net_args(namespace),
        prefix=namespace.command_prefix(),
    )  # fmt: skip
    assert lines == [f"avmm-testguest: net0 mac={GUEST_MAC}", "avmm-testguest: net0 echoed=20"]
    assert status == STATUS_POWER_OFF
    assert echoer.echoed >= 20


def test_net_echo_strict_header_check_catches_qemu_num_buffers_0(
    test_guest: Path, echoing_namespace: tuple[TapNamespace, EthernetEchoer]
) -> None:
    namespace, _ = echoing_namespace
    status, lines = run_virtio(
        test_guest, "tcg", "avmm.test=net-echo avmm.n=1", net_args(namespace),
        prefix=namespace.command_prefix(),
    )  # fmt: skip
    assert lines == [
        f"avmm-testguest: net0 mac={GUEST_MAC}",
        "avmm-testguest: net0 bad receive header num_buffers=0 (expected 1)",
    ]
    assert status == STATUS_FAILURE
