"""avmm's minimal guest kernel (``make linux-kernel``: tinyconfig + examples/linux/microvm.config)
with its busybox initramfs (``make linux-initramfs``), booted by QEMU under TCG.

These check the kernel itself, independent of avmm: that ``bzImage`` boots through the
Linux boot protocol and ``vmlinux`` through its PVH note (``-M microvm``), that /init
reaches its ready marker (contract in tests/linux/init), and that the guest finds a
virtio-blk device on the virtio-mmio bus both ways avmm can describe one: on the kernel
command line (``virtio_mmio.device=``, microvm with ``acpi=off`` adds it; this needs
VIRTIO_MMIO_CMDLINE_DEVICES) and in the ACPI DSDT (``LNRO0005``, microvm with ACPI on).

QEMU's TCG delivers ``syscall`` correctly, so here the kernel's kvm_pvm quirk patch acts
only when a process jumps to the system call entry itself: with and without its opt-in,
that process must gain nothing (tests/linux/syscall_fault.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.linux import syscall_fault
from tests.linux.support import linux_lines
from tests.prerequisites import BUILD, require

pytestmark = pytest.mark.qemu

KERNEL_DIR = BUILD / "linux"
BZIMAGE = KERNEL_DIR / "bzImage"
VMLINUX = KERNEL_DIR / "vmlinux"
INITRAMFS = KERNEL_DIR / "initramfs.cpio"
QEMU = "qemu-system-x86_64"
# Userspace is reached in ~1 s under TCG here; leave room for slow, loaded hosts.
TIMEOUT_S = 60
READY = "avmm-linux: ready"
# The kernel's last words after /init's `poweroff -f`. With ACPI it powers the machine off
# and QEMU exits; without (microvm,acpi=off) it can only halt and QEMU keeps running, so
# the runner stops QEMU when it sees either.
POWER_DOWN = "reboot: Power down"
HALTED = "reboot: System halted"


def _missing(path: Path, target: str) -> str | None:
    return None if path.exists() else f"{path} is missing (make {target} builds it)"


@pytest.fixture
def initramfs() -> Path:
    require(_missing(INITRAMFS, "linux-initramfs"))
    return INITRAMFS


@pytest.fixture
def bzimage() -> Path:
    require(_missing(BZIMAGE, "linux-kernel"))
    return BZIMAGE


@pytest.fixture
def vmlinux() -> Path:
    require(_missing(VMLINUX, "linux-kernel"))
    return VMLINUX


class Boot:
    """One QEMU run: the guest's ``avmm-linux:`` lines, seconds to ready, how it ended."""

    def __init__(self, output: str, ready_s: float, total_s: float, exited: bool, status: int):
        self.output = output
        self.lines = linux_lines(output)
        self.ready_s = ready_s
        self.total_s = total_s
        self.exited = exited  # QEMU exited by itself (the guest powered it off)
        self.status = status


def boot(machine: str, kernel: Path, initrd: Path, run: str, devices: Sequence[str] = (),
         extra: str = "") -> Boot:  # fmt: skip
    cmdline = f"console=ttyS0 panic=-1 reboot=t quiet avmm.run={run} {extra}".rstrip()
    if machine.startswith("microvm"):
        # microvm has no HPET or ACPI PM timer, so the kernel calibrates the TSC against
        # the PIT, which fails when TCG runs slowly (a loaded host); with ACPI on, the
        # kernel then hangs setting up the timer (seen in ~10% of boots with 2 QEMUs per
        # core). Under TCG the TSC is the host's; its exact rate does not matter here.
        cmdline += " tsc_early_khz=2000000"
    argv = [
        QEMU, "-M", f"{machine},accel=tcg", "-cpu", "max", "-m", "256", "-smp", "1",
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        *devices,
    ]  # fmt: skip
    start = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    chunks: list[str] = []
    ready_at: list[float] = []
    powered_down = threading.Event()
    halted = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            if not ready_at and READY in line:
                ready_at.append(time.monotonic() - start)
            chunks.append(line)
            if POWER_DOWN in line:
                powered_down.set()
            elif HALTED in line:
                halted.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    exited = False
    try:
        deadline = start + TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                exited = True
                break
            if halted.is_set():
                break
            if powered_down.wait(0.05):
                # Give QEMU a moment to exit by itself (it does where ACPI can power off).
                try:
                    process.wait(timeout=2)
                    exited = True
                except subprocess.TimeoutExpired:
                    pass
                break
        else:
            pytest.fail(f"QEMU ran past {TIMEOUT_S} s; output:\n{''.join(chunks)[-4000:]}")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=5)
        assert process.stdout is not None
        process.stdout.close()
    output = "".join(chunks)
    assert ready_at, f"the guest never reached /init's ready marker; output:\n{output[-4000:]}"
    return Boot(output, ready_at[0], time.monotonic() - start, exited, process.returncode)


def virtio_blk(image: Path) -> list[str]:
    """A read-only virtio-blk device on microvm's virtio-mmio bus (modern, not legacy)."""
    return [
        "-global", "virtio-mmio.force-legacy=false",
        "-drive", f"id=d0,file={image},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=d0",
    ]  # fmt: skip


def disk(tmp_path: Path) -> tuple[Path, str]:
    image = tmp_path / "disk.img"
    data = os.urandom(4 << 20)
    image.write_bytes(data)
    return image, f"avmm-linux: vda sha256={hashlib.sha256(data).hexdigest()} bytes={len(data)}"


def record(figure: Callable[[str, str], None], name: str, run: Boot) -> None:
    figure(f"minimal kernel ({name}, QEMU TCG) to /init ready",
           f"{run.ready_s:.2f} s (whole run {run.total_s:.2f} s)")  # fmt: skip


@pytest.mark.parametrize(
    ("machine", "image"),
    [
        pytest.param("microvm,acpi=off", "bzimage", id="bzImage-cmdline-devices"),
        pytest.param("microvm,acpi=off", "vmlinux", id="vmlinux-pvh-cmdline-devices"),
        pytest.param("microvm,acpi=on", "vmlinux", id="vmlinux-pvh-acpi-devices"),
    ],
)
def test_minimal_kernel_reads_a_virtio_mmio_disk(
    machine: str, image: str, initramfs: Path, tmp_path: Path,
    request: pytest.FixtureRequest, figure: Callable[[str, str], None],
) -> None:  # fmt: skip
    kernel = request.getfixturevalue(image)
    path, expected = disk(tmp_path)
    run = boot(machine, kernel, initramfs, "blk-read", virtio_blk(path))
    assert run.lines == [READY, expected, "avmm-linux: exit=0"], run.output[-4000:]
    if "acpi=on" in machine:
        # Powered off through ACPI (the hardware-reduced sleep register): QEMU exits.
        assert run.exited and run.status == 0, run.output[-4000:]
    else:
        assert HALTED in run.output, run.output[-4000:]
    record(figure, f"{image}, {machine}, blk-read 4 MiB", run)


def test_minimal_kernel_boots_a_pc(bzimage: Path, initramfs: Path,
                                   figure: Callable[[str, str], None]) -> None:  # fmt: skip
    """The bzImage on QEMU's default PC machine (SeaBIOS, ACPI, no PCI driver in the
    kernel): /init runs and ACPI powers the machine off."""
    run = boot("pc", bzimage, initramfs, "none")
    assert run.lines == [READY, "avmm-linux: no test none"], run.output[-4000:]
    assert run.exited and run.status == 0, run.output[-4000:]
    record(figure, "bzImage, pc", run)


@pytest.mark.parametrize("opt_in", [True, False], ids=["opted-in", "not-opted-in"])
def test_a_process_jumping_to_the_syscall_entry_gains_nothing(
    opt_in: bool, vmlinux: Path, initramfs: Path,
) -> None:  # fmt: skip
    """/tests/syscall-fault: an ordinary system call works; a jump to entry_SYSCALL_64
    with IOPL 3 (and NT, AC, DF, IF clear) in R11 never yields IOPL 3 or IF clear (its
    `outb` is killed); without the opt-in the patch does nothing (the jump is a SIGSEGV),
    with it the jump is a getpid only when RCX follows a real `syscall` instruction."""
    words = syscall_fault.cmdline_words(vmlinux, opt_in=opt_in)
    run = boot("microvm,acpi=on", vmlinux, initramfs, "syscall-fault", extra=words)
    tail = run.output[-4000:]
    assert run.lines[0] == READY and run.lines[-1] == "avmm-linux: exit=0", tail
    syscall_fault.check(run.lines, opted_in=opt_in)
    # Three cases, each reported by its own lines and nothing else in between.
    assert len(run.lines) == 2 + 3 + (1 if opt_in else 0), tail
    assert run.exited and run.status == 0, tail
