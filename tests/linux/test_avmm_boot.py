"""Linux under avmm, all the way to userspace (``make test-linux``; marker ``linux_boot``).

One boot per kernel runs /init's ``guest-checks`` script (tests/linux/run/guest-checks):
two vCPUs, a raw disk read whole and checksummed, a file written on an ext4 image that
the host then reads back with debugfs, the NIC pinging the host end of a tap in a netns,
two reads of 32 bytes from /dev/hwrng (random-looking, and different), and for the
minimal kernel a process that jumps to the kernel's system call entry itself and must
gain nothing (tests/linux/syscall_fault.py). The guest finds its devices through the
DSDT (ACPI is on), reaches userspace (the boot-time marker, before /init's ready line),
prints its lines in the script's order and powers the VM off through ACPI S5.

Each boot costs minutes where guest ring 0 is interpreted (this workplace's KVM), and well
under a second on hardware KVM; so these tests are not part of ``make test``. The time
limit is ``AVMM_LINUX_TIMEOUT_S`` (default 1800 s).

On that KVM (``kvm_pvm``) ``syscall`` from guest ring 3 arrives at the kernel's entry
point still in ring 3, as a user-mode fault at ``entry_SYSCALL_64``; the minimal kernel
carries a small patch (examples/linux/patches/) that runs such a fault as the system call
it was when the command line opts in (the ``compat`` CPU profile does), and says so once
in its log. Debian's kernel has no such patch, so its userspace test cannot run on such a
host; README ("Booting Linux") says what is tested for it there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine
from avmm.cpu_profile import PVM_SYSCALL_FAULT_OPT_IN, host_needs_compat
from avmm.virtio.mmio import DeviceStatus
from tests.linux import syscall_fault
from tests.linux.support import (
    DEBIAN_INITRAMFS,
    HOST_ADDRESS,
    MINIMAL_INITRAMFS,
    MINIMAL_KERNEL,
    MINIMAL_VMLINUX,
    READY,
    TIMEOUT_S,
    GuestDisks,
    host_end,
    keep,
    linux_config,
    linux_lines,
)
from tests.prerequisites import DEBIAN_KERNEL, not_expected_on_this_host, require
from tests.virtio_guest_support import TapNamespace

pytestmark = [pytest.mark.linux_boot, pytest.mark.kvm, pytest.mark.net]

SYSCALL_FIXUP = "avmm: syscall delivered as a user-mode fault"
RUN_INIT = "Run /init as init process"


@dataclasses.dataclass
class LinuxRun:
    output: str
    lines: list[str]
    userspace_s: float | None
    exit_reason: StopReason
    exit_detail: str
    #: Virtio status of each device (by name) when the kernel started /init.
    device_status_at_init: dict[str, int]
    #: Whether avmm had seen the boot-time marker when /init's ready line arrived.
    marker_before_ready: bool | None


async def boot_guest_checks(kernel: Path, initramfs: Path, tmp_path: Path, *, seed: int,
                            extra: str = "") -> tuple[LinuxRun, bytes, Path]:  # fmt: skip
    """Boot ``kernel`` with the disks, NIC and rng and ``extra`` command-line words, run
    guest-checks; return the run, the data disk's contents and the ext4 image."""
    disks, data = GuestDisks.make(tmp_path)
    with TapNamespace() as namespace:
        host_end(namespace)
        config = linux_config(kernel, initramfs, disks, run="guest-checks", seed=seed,
                              netns=namespace.netns, tap=namespace.tap, extra=extra)
        output = bytearray()
        statuses: dict[str, int] = {}
        marker_at_ready: list[bool] = []
        # The console as it arrives, for watching a slow boot: tail -f .../serial.log
        log = (tmp_path / "serial.log").open("wb")
        async with VirtualMachine(config) as vm:
            with trio.move_on_after(TIMEOUT_S) as scope:
                async with trio.open_nursery() as nursery:
                    async def collect() -> None:
                        async for chunk in vm.serial:
                            keep(chunk, output, log)
                            if not statuses and RUN_INIT.encode() in output:
                                statuses.update({slot.device.name: slot.transport.status
                                                 for slot in vm.virtio_slots})
                            # /init writes the marker, then prints ready: avmm must
                            # have logged the marker by the time the line arrives.
                            if not marker_at_ready and READY.encode() in output:
                                marker_at_ready.append(vm.userspace_reached_s is not None)

                    nursery.start_soon(collect)
                    await vm.wait()
                    nursery.cancel_scope.cancel()
            text = output.decode(errors="replace")
            if scope.cancelled_caught:
                pytest.fail(f"Linux did not finish within {TIMEOUT_S:.0f} s "
                            f"(AVMM_LINUX_TIMEOUT_S); last output:\n{text[-4000:]}")
            result = await vm.wait()
            userspace_s = vm.userspace_reached_s
        log.close()
    run = LinuxRun(text, linux_lines(text), userspace_s, result.reason, result.detail,
                   statuses, marker_at_ready[0] if marker_at_ready else None)
    return run, data, disks.ext4_image


def read_back(ext4_image: Path, name: str) -> str:
    """A file from the ext4 image, read on the host with debugfs (no mount needed)."""
    result = subprocess.run(["debugfs", "-R", f"cat /{name}", str(ext4_image)],
                            check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    return result.stdout


def kernel_command_line(output: str) -> str:
    """The command line the kernel says it got (its first "Command line:" line)."""
    match = re.search(r"Command line: ([^\r\n]*)", output)
    assert match, output[-4000:]
    return match[1]


def check(run: LinuxRun, data: bytes, ext4_image: Path, seed: int, *,
          syscall_fault_run: bool) -> None:  # fmt: skip
    tail = run.output[-6000:]
    # Every line guest-checks prints, in its order, and nothing else (a FAILED line or a
    # missing check breaks the sequence). The values come from this run.
    head = [
        re.escape(READY),
        re.escape("avmm-linux: cpus=2"),
        re.escape(f"avmm-linux: data sha256={hashlib.sha256(data).hexdigest()} "
                  f"bytes={len(data)}"),
        re.escape("avmm-linux: ext4 wrote /avmm-check.txt"),
        re.escape(f"avmm-linux: ping {HOST_ADDRESS} ok"),
        r"avmm-linux: net features=[01]{32,}",
        r"avmm-linux: hwrng=virtio_rng\.\d+ [0-9a-f]{64}",
        r"avmm-linux: hwrng=virtio_rng\.\d+ [0-9a-f]{64}",
    ]
    assert len(run.lines) > len(head), tail
    for pattern, line in zip(head, run.lines, strict=False):
        assert re.fullmatch(pattern, line), (pattern, line, tail)
    # Linux's virtio-net took every offload avmm offers (and the ping went through with
    # them): checksums both ways, TSO both ways, mergeable receive buffers.
    bits = next(line for line in run.lines if "net features=" in line).split("=", 1)[1]
    for bit, name in ((0, "CSUM"), (1, "GUEST_CSUM"), (7, "GUEST_TSO4"), (8, "GUEST_TSO6"),
                      (11, "HOST_TSO4"), (12, "HOST_TSO6"), (15, "MRG_RXBUF")):
        assert bits[bit] == "1", (f"VIRTIO_NET_F_{name} not negotiated", bits)
    middle = run.lines[len(head):-1]
    assert all(line.startswith("avmm-linux: syscall-fault ") for line in middle), tail
    assert bool(middle) == syscall_fault_run, tail
    assert run.lines[-1] == "avmm-linux: exit=0", tail

    # The entropy is live: neither read is one repeated byte (all zeroes included), and
    # the two reads differ. Random bytes fail this with odds of about 2**-248.
    hwrng = [line for line in run.lines[:len(head)] if line.startswith("avmm-linux: hwrng=")]
    reads = [bytes.fromhex(line.rsplit(" ", 1)[1]) for line in hwrng]
    assert len(reads) == 2 and len({line.split()[1] for line in hwrng}) == 1, tail  # one device
    for read in reads:
        assert len(set(read)) > 1, (read.hex(), tail)
    assert reads[0] != reads[1], (reads[0].hex(), tail)

    if syscall_fault_run:
        opted_in = PVM_SYSCALL_FAULT_OPT_IN in kernel_command_line(run.output).split()
        # cpu_profile "auto": the opt-in exactly where the host needs it.
        assert opted_in == host_needs_compat(), kernel_command_line(run.output)
        syscall_fault.check(run.lines, opted_in=opted_in)

    assert read_back(ext4_image, "avmm-check.txt") == f"avmm-seed{seed}\n"
    # /init powers off; avmm sees the ACPI S5 write and the VM ends cleanly.
    assert run.exit_reason is StopReason.POWEROFF, (run.exit_reason, run.exit_detail, tail)
    # The boot-time marker arrived, and before the ready line was printed.
    assert run.userspace_s is not None
    assert run.marker_before_ready is True, tail


def record(figure: Callable[[str, str], None], kernel: str, run: LinuxRun,
           total_s: float) -> None:  # fmt: skip
    where = "compat host (ring 0 interpreted)" if host_needs_compat() else "hardware KVM"
    assert run.userspace_s is not None
    figure(f"{kernel} under avmm ({where}) to userspace",
           f"{run.userspace_s:.2f} s (whole guest-checks run {total_s:.1f} s)")


@dataclasses.dataclass
class MinimalBoot:
    run: LinuxRun
    data: bytes
    ext4_image: Path
    seed: int
    total_s: float


@pytest.fixture(scope="module")
def minimal_boot(tmp_path_factory: pytest.TempPathFactory) -> MinimalBoot:
    """One boot of the minimal kernel, shared by the tests below (a boot costs minutes
    here). trio.run directly: pytest-trio's async fixtures cannot be module-scoped."""
    require(None if MINIMAL_KERNEL.exists() and MINIMAL_INITRAMFS.exists()
            else "the minimal kernel is missing (make linux-kernel linux-initramfs)")
    require(None if MINIMAL_VMLINUX.exists()
            else "build/linux/vmlinux is missing (make linux-kernel)")
    seed = secrets.randbelow(10**6)
    # Where /tests/syscall-fault jumps; the opt-in word comes (or not) from cpu_profile.
    extra = syscall_fault.cmdline_words(MINIMAL_VMLINUX, opt_in=False)
    started = time.monotonic()
    run, data, ext4_image = trio.run(
        functools.partial(boot_guest_checks, MINIMAL_KERNEL, MINIMAL_INITRAMFS,
                          tmp_path_factory.mktemp("minimal"), seed=seed, extra=extra))
    return MinimalBoot(run, data, ext4_image, seed, time.monotonic() - started)


def test_minimal_kernel_boots_to_init_with_its_devices(minimal_boot: MinimalBoot) -> None:
    """2 vCPUs up, ACPI tables used, every virtio device found in the DSDT and driven
    (DRIVER_OK) by its Linux driver, /init started."""
    run = minimal_boot.run
    tail = run.output[-6000:]
    for line in ("ACPI: Using ACPI (MADT) for SMP configuration information",
                 "smp: Brought up 1 node, 2 CPUs", "ACPI: Interpreter enabled",
                 "[vda] 8192 512-byte logical blocks", "[vdb] 32768 512-byte logical blocks",
                 RUN_INIT):
        assert line in run.output, (line, tail)
    assert "virtio_mmio.device=" not in run.output  # found through ACPI, not the cmdline
    assert set(run.device_status_at_init) == {"blk0", "blk1", "net0", "rng0"}, tail
    for name, status in run.device_status_at_init.items():
        assert status & DeviceStatus.DRIVER_OK, (name, hex(status), tail)


def test_minimal_kernel_runs_the_guest_checks(minimal_boot: MinimalBoot,
                                             figure: Callable[[str, str], None]) -> None:
    check(minimal_boot.run, minimal_boot.data, minimal_boot.ext4_image, minimal_boot.seed,
          syscall_fault_run=True)
    # The kernel patch acts exactly where the host needs it (and says so once).
    assert (SYSCALL_FIXUP in minimal_boot.run.output) == host_needs_compat()
    record(figure, "minimal kernel", minimal_boot.run, minimal_boot.total_s)


#: Why the Debian kernel's userspace run is not expected on a kvm_pvm host. Not a missing
#: prerequisite CI could install: that KVM delivers `syscall` from ring 3 as a user-mode
#: fault at the kernel's entry point, and Debian's kernel, without the minimal kernel's
#: patch, kills /init at its first system call. What is tested for that kernel there
#: instead: README, "Booting Linux".
DEBIAN_NOT_ON_COMPAT_HOSTS = (
    "Debian kernel to userspace is not expected on a kvm_pvm host: without the minimal "
    "kernel's patch its /init dies at its first system call there; make test checks its "
    "early boot (tests/vm/test_linux_boot.py) and its userspace under QEMU "
    "(tests/vhost/test_backend_linux.py), see README")


def test_debian_kernel_under_avmm(tmp_path: Path, figure: Callable[[str, str], None]) -> None:
    """Where it is expected to run (any host but kvm_pvm), every prerequisite is a
    require(): with AVMM_REQUIRE_KVM=1 (CI) a missing kernel, initramfs, /dev/kvm or
    root fails this test instead of skipping it. On kvm_pvm it is a skip with the reason."""
    if host_needs_compat():
        not_expected_on_this_host(DEBIAN_NOT_ON_COMPAT_HOSTS)
    require(None if DEBIAN_KERNEL.exists() and DEBIAN_INITRAMFS.exists()
            else "the Debian kernel is missing (make debian-kernel linux-debian)")
    seed = secrets.randbelow(10**6)
    started = time.monotonic()
    run, data, ext4_image = trio.run(functools.partial(
        boot_guest_checks, DEBIAN_KERNEL, DEBIAN_INITRAMFS, tmp_path, seed=seed))
    # Debian's kernel is relocated at random (KASLR): no entry address to jump to, and no
    # patch for the syscall fault to test.
    check(run, data, ext4_image, seed, syscall_fault_run=False)
    record(figure, "Debian kernel", run, time.monotonic() - started)
