"""What the benchmark figures share: booting the test guest under avmm (in-process or
``avmm up``) and under QEMU microvm, timing, and the per-figure result records."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
TEST_GUEST = REPO / "build" / "guest" / "testguest.elf"
QEMU = "qemu-system-x86_64"
AVMM = Path(sys.executable).parent / "avmm"
GUEST_MEMORY_MIB = 64
TIMEOUT_S = 120


class BenchError(RuntimeError):
    """A run did not do what the figure needs (guest failed, wrong output)."""


# -- results -----------------------------------------------------------------------------


# Scratch files live in RAM where the host has it, so disk speed never enters a figure.
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory under :data:`SHM`, removed with everything in it afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=SHM))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def summary(values: Sequence[float]) -> dict[str, object]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def ratio_summary(avmm: Sequence[float], qemu: Sequence[float]) -> dict[str, object]:
    """avmm/QEMU as the ratio of the two medians (the figure the table shows: the medians
    it shows, divided), with the range of the per-pair ratios (``avmm[i] / qemu[i]``,
    measured back to back) beside it for how much one pair can differ from another. The
    median of the per-pair ratios is not reported: it need not equal the quotient of the
    medians in the same row, which a reader would check first."""
    of_medians = statistics.median(avmm) / statistics.median(qemu)
    pairs = [a / q for a, q in zip(avmm, qemu, strict=True)]
    return {"of_medians": of_medians, "pair_min": min(pairs), "pair_max": max(pairs),
            "pairs": pairs}


#: The parts of the table: what is compared with what. Every figure names one.
PER_OPERATION = "per-operation"
WHOLE_PROCESS = "whole-process"
IN_PROCESS = "in-process"
SHARING = "sharing"
PARTS = {
    PER_OPERATION: "Per operation: the same guest doing the same work in both VMMs; each "
                   "rate or time per item is a run of N operations minus a run of none, so "
                   "start-up and teardown cancel out; a snapshot figure is one save of the "
                   "same paused guest",
    WHOLE_PROCESS: "Whole processes: `avmm up` (a fresh Python process per VM) against "
                   "`qemu-system-x86_64` (a fresh process per VM)",
    IN_PROCESS: "avmm inside a running Python process (a program that keeps avmm loaded, "
                "as `avmm serve` does) against a whole QEMU process per VM: not like for "
                "like, shown for what embedding avmm saves",
    SHARING: "Sharing a host: avmm alone, measured against the goal in each figure's note "
             "(no QEMU column)",
}


@dataclass(frozen=True)
class Goal:
    """A figure's goal, checked on the figures measured: ``of`` is what is compared
    ("ratio": avmm/QEMU, the ratio of medians; "every pair": each pair's avmm/QEMU, for
    a goal met "steadily"; "avmm": avmm's median), ``op`` "≥" or "≤", ``value`` the
    bound."""

    of: str
    op: str
    value: float

    @property
    def text(self) -> str:
        bound = f"{self.value:g}"
        if self.of == "avmm":
            return f"{self.op} {bound}"
        each = " in every pair" if self.of == "every pair" else ""
        return f"avmm/QEMU {self.op} {bound}{each}"

    def met(self, figure: Figure) -> bool:
        if self.of == "avmm":
            values = [statistics.median(figure.avmm)]
        elif self.of == "ratio":
            values = [statistics.median(figure.avmm) / statistics.median(figure.qemu)]
        elif self.of == "every pair":
            values = [a / q for a, q in zip(figure.avmm, figure.qemu, strict=True)]
        else:
            raise ValueError(f"goal of {self.of!r}")
        if self.op == "≥":
            return all(v >= self.value for v in values)
        if self.op == "≤":
            return all(v <= self.value for v in values)
        raise ValueError(f"goal op {self.op!r}")


@dataclass
class Figure:
    """One row of the table: ``avmm[i]`` and ``qemu[i]`` were measured as a pair."""

    name: str
    unit: str
    better: str  # "lower" or "higher" ("closer": to the goal its name states)
    part: str  # a key of PARTS
    avmm: list[float] = field(default_factory=list)
    qemu: list[float] = field(default_factory=list)
    note: str = ""
    #: runs measured again: lost in the noise, or avmm's blk status=255 (benchmarks/run.py).
    retries: int = 0
    #: The goal an issue set for this figure, if any (see :class:`Goal`).
    goal: Goal | None = None

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"figure {self.name!r}: part must be one of {list(PARTS)}")

    def add(self, avmm: float, qemu: float) -> None:
        self.avmm.append(avmm)
        self.qemu.append(qemu)

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"unit": self.unit, "better": self.better,
                                   "part": self.part, "avmm": summary(self.avmm)}
        if self.note:
            data["note"] = self.note
        if self.retries:
            data["retries"] = self.retries
        if self.qemu:
            data["qemu"] = summary(self.qemu)
            data["ratio"] = ratio_summary(self.avmm, self.qemu)
        if self.goal is not None:
            data["goal"] = {"text": self.goal.text, "met": self.goal.met(self)}
        return data


def quiet_logging() -> None:
    """Warnings and errors only: avmm's info lines would otherwise go to stdout."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# -- measuring ---------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


NOISE_ATTEMPTS = 5


def per_unit(loaded: Callable[[], float], empty: Callable[[], float], n: int, what: str,
             figure: Figure) -> float:
    """Seconds per item from a run of n items minus a run of none. A pair whose
    difference is lost in the boot-time noise is measured again (counted in the figure's
    ``retries``), never turned into a figure."""
    for _ in range(NOISE_ATTEMPTS):
        total_s, baseline_s = loaded(), empty()
        if total_s > baseline_s:
            return (total_s - baseline_s) / n
        figure.retries += 1
        log(f"benchmarks: {what}: n={n} took {total_s:.4f} s, n=0 {baseline_s:.4f} s; again")
    raise BenchError(f"{what}: n={n} never measurably slower than n=0; raise n")


#: blk-bench's last line: its own TSC count from its first request to its last completion.
BLK_CYCLES = re.compile(r"blk-bench rw=\w+ qd=\d+ n=(\d+) done cycles=(\d+)")


def guest_timed_iops(output: str, tsc_hz: float, what: str) -> float:
    """Requests per second as the guest timed them (no boot or teardown in it)."""
    match = BLK_CYCLES.search(output)
    if match is None or int(match.group(2)) == 0:
        raise BenchError(f"{what}: no cycle count in the guest's output: {output[-300:]!r}")
    return int(match.group(1)) * tsc_hz / int(match.group(2))


def tsc_khz() -> int:
    """The TSC rate (kHz) KVM gives a new vCPU here: what the guest's ticks count."""
    from avmm.kvm.system import Kvm

    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                return vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()


#: Runs one VM with the test guest's command line to the end: (wall seconds, output).
Side = Callable[[str], tuple[float, str]]


def checked(side: Side, cmdline: str, expect: str, what: str) -> float:
    seconds, output = side(cmdline)
    if expect not in output:
        raise BenchError(f"{what}: no {expect!r} in the guest's output: {output!r}")
    return seconds


# -- avmm ----------------------------------------------------------------------------------


def avmm_config(cmdline: str, *, disks: Sequence[Path | object] = (), nets: Sequence[object] = (),
                rng: bool = False, memory_mib: int = GUEST_MEMORY_MIB,
                name: str | None = None) -> object:
    """A VmConfig for the test guest; ``disks`` are image paths or ``DiskConfig``s (for
    vhost-user), ``nets`` ``NetConfig``s, ``rng`` adds a virtio-rng device."""
    from avmm.config import (
        BootConfig,
        DiskConfig,
        MachineConfig,
        RngConfig,
        SerialConfig,
        VmConfig,
    )

    machine = MachineConfig(vcpus=1, memory_mib=memory_mib)
    # The test guest finds virtio devices only on its command line, which avmm fills in
    # when ACPI is off (once the machine has such a switch).
    if "acpi" in {f.name for f in dataclasses.fields(MachineConfig)}:
        machine = dataclasses.replace(machine, acpi=False)  # type: ignore[call-arg]
    return VmConfig(
        machine=machine,
        boot=BootConfig(kernel=TEST_GUEST, initrd=None, cmdline=cmdline),
        serial=SerialConfig(mode="none", path=None),
        source="benchmark",
        name=name,
        disks=tuple(d if isinstance(d, DiskConfig) else DiskConfig(Path(d))  # type: ignore[arg-type]
                    for d in disks),
        nets=tuple(nets),  # type: ignore[arg-type]
        rng=RngConfig() if rng else None,
    )


@dataclass
class AvmmRun:
    seconds: float          # VirtualMachine() → the VM stopped and was released
    first_byte: float       # VirtualMachine() → first serial byte
    output: str
    exits: dict[str, int]


async def avmm_run(cmdline: str, *, disks: Sequence[Path | object] = (),
                   nets: Sequence[object] = (), rng: bool = False,
                   expect: str = "") -> AvmmRun:
    """Boot the test guest in this trio program and run it to the end."""
    from avmm import StopReason, VirtualMachine

    config = avmm_config(cmdline, disks=disks, nets=nets, rng=rng)
    output = bytearray()
    first = 0.0
    start = time.perf_counter()
    async with VirtualMachine(config) as vm:  # type: ignore[arg-type]
        async for chunk in vm.serial:
            if not output:
                first = time.perf_counter() - start
            output += chunk
        result = await vm.wait()
        exits = vm.vcpu_exit_counts()
    seconds = time.perf_counter() - start
    text = output.decode(errors="replace")
    if result.reason is not StopReason.RESET or (expect and expect not in text):
        raise BenchError(f"avmm: {cmdline!r} ended with {result}; output: {text!r}")
    return AvmmRun(seconds, first, text, exits)


def avmm_run_sync(cmdline: str, **kwargs: object) -> AvmmRun:
    return trio.run(lambda: avmm_run(cmdline, **kwargs))  # type: ignore[arg-type]


# -- QEMU ----------------------------------------------------------------------------------


#: QEMU's CPU model with KVM: the host's, less IA32_ARCH_CAPABILITIES. On AMD hosts
#: with kvm_pvm, QEMU 7.2 offers that MSR from KVM's feature list, KVM then refuses to
#: have it set and QEMU aborts before the guest's first instruction ("failed to set MSR
#: 0x10a"). The test guest never reads it.
QEMU_KVM_CPU = "host,-arch-capabilities"


def qemu_argv(cmdline: str, *, disks: Sequence[Path] = (), memfd: bool = False,
              memory_mib: int = GUEST_MEMORY_MIB, devices: Sequence[str] = ()) -> list[str]:
    """``qemu-system-x86_64 -M microvm -accel kvm -cpu host`` with the test guest, as in
    tests/test_guest_qemu.py; virtio devices need ``acpi=off`` and modern transports.
    ``memfd``: guest RAM in a shared memfd (what a vhost-user back-end needs to map it);
    ``devices``: more arguments (``-device``, ``-chardev``, ``-netdev``)."""
    machine = "microvm,accel=kvm,acpi=off"
    argv = [QEMU, "-cpu", QEMU_KVM_CPU, "-m", str(memory_mib), "-smp", "1", "-nographic",
            "-nodefaults", "-no-reboot", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0x501,iosize=2", "-device", "i8042",
            "-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(TEST_GUEST), "-append", cmdline]
    if memfd:
        machine += ",memory-backend=mem"
        argv += ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"]
    for i, disk in enumerate(disks):
        # Defaults (page cache, thread pool): on tmpfs there is no O_DIRECT anyway.
        argv += ["-device", f"virtio-blk-device,drive=d{i}",
                 "-drive", f"id=d{i},file={disk},format=raw,if=none"]
    argv += devices
    return [argv[0], "-M", machine, *argv[1:]]


def avmm_up_argv(config: Path) -> list[str]:
    """``avmm up CONFIG``: one VM in a fresh process, as a user starts one."""
    return [str(AVMM), "up", str(config)]


@dataclass
class ProcessRun:
    seconds: float      # fork → exit
    first_byte: float   # fork → first byte on stdout (the serial port)
    output: str


def process_run(argv: Sequence[str], *, expect: str = "") -> ProcessRun:
    """Run a VMM process to the end, timing the first stdout byte and the exit."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None
    first = os.read(process.stdout.fileno(), 1)
    first_byte = time.perf_counter() - start
    rest, err = process.communicate(timeout=TIMEOUT_S)
    seconds = time.perf_counter() - start
    text = (first + rest).decode(errors="replace")
    if process.returncode != 0 or (expect and expect not in text):
        raise BenchError(f"{argv[0]} exited {process.returncode}; output: {text!r}; "
                         f"stderr: {err.decode(errors='replace')!r}")
    return ProcessRun(seconds, first_byte, text)


def qemu_run(cmdline: str, *, disks: Sequence[Path] = (), expect: str = "",
             memfd: bool = False, devices: Sequence[str] = (),
             prefix: Sequence[str] = ()) -> ProcessRun:
    """Run QEMU with the test guest to the end; ``prefix`` goes in front of the command
    (``ip netns exec NS`` for a tap in a network namespace)."""
    return process_run([*prefix, *qemu_argv(cmdline, disks=disks, memfd=memfd, devices=devices)],
                       expect=expect)


# -- a VMM process's memory and its guest's progress ---------------------------------------


def status_of(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0])
    return fields


def guest_ram_fd(pid: int, size: int) -> int | None:
    """An fd (ours, to close) on process ``pid``'s guest RAM: its memfd of ``size`` bytes.
    Both VMMs keep guest RAM in one (avmm always, QEMU with memory-backend-memfd)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if not os.readlink(entry).startswith("/memfd:"):
                    continue
                fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
                if os.fstat(fd).st_size == size:
                    return fd
                os.close(fd)
    return None


def in_spin_loop(fd: int) -> bool:
    from benchmarks.memchild import MAILBOX_ADDRESS, MAILBOX_MAGIC

    """Whether the test guest whose RAM is ``fd`` reached its ``count`` loop (the mailbox
    holds its magic and a counter above 0). Guest RAM from 0 is the memfd from 0."""
    words = os.pread(fd, 16, MAILBOX_ADDRESS)
    return (len(words) == 16 and int.from_bytes(words[:8], "little") == MAILBOX_MAGIC
            and int.from_bytes(words[8:], "little") > 0)


@contextlib.contextmanager
def serving(argv: Sequence[str], sock: Path, what: str) -> Iterator[Path]:
    """A back-end process (``argv``) that listens on the unix socket ``sock``: yields
    ``sock`` once it exists, and stops the process (and removes the socket) after."""
    process = subprocess.Popen(list(argv), cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{what} never listened on {sock}: {stderr_of(process)!r}")
            time.sleep(0.005)
        yield sock
    finally:
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        sock.unlink(missing_ok=True)


def stderr_of(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.kill()
    return process.communicate()[1].decode(errors="replace")


def process_memory(argv: list[str], what: str,
                   read: Callable[[int], T] = status_of) -> T:  # type: ignore[assignment]
    """/proc/PID/status (kB fields) of a VMM process running the test guest's ``count``
    loop (``argv``), read once the guest is in its loop, which the process's guest RAM
    memfd shows: the same check for both VMMs, and nothing added to either (no QMP).
    ``read(pid)`` says what is kept (default: /proc/PID/status's kB fields)."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    fd = None
    try:
        deadline = time.monotonic() + 60
        while fd is None or not in_spin_loop(fd):
            if process.poll() is not None:
                raise BenchError(f"{what} exited {process.returncode} before its guest's "
                                 f"loop: {stderr_of(process)!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: the guest never reached its loop")
            if fd is None:
                fd = guest_ram_fd(process.pid, GUEST_MEMORY_MIB << 20)
            time.sleep(0.02)
        return read(process.pid)
    finally:
        if fd is not None:
            os.close(fd)
        end_process(process)


def end_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` if it runs (kill it if it does not end within 30 s) and
    collect it."""
    if process.poll() is None:
        process.terminate()
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
