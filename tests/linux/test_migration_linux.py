"""The minimal Linux kernel live-migrated in userspace to a VM in another process, where
the guest checks then run (``make test-linux``; marker ``linux_boot``).

The kernel boots as in tests/linux/test_avmm_boot.py (2 vCPUs, ACPI, a raw data disk, an
ext4 disk, a NIC on a tap in a netns, virtio-rng), with /init running
tests/linux/run/snapshot-checks (guest-checks at a point the host chooses): it says it
waits for the host and reads a line from the console. Once the waiting line is out, a NEW
Python process listens (``VirtualMachine.receive("unix:...")``) and this process migrates
the running VM there (``await vm.migrate(...)``); the source must end ``migrated``. The
destination types the line; everything guest-checks does (read the data disk whole,
write a file on ext4, ping the host end of the tap, read /dev/hwrng twice) thus happens
on the destination, whose serial output must carry every line in order, and which must
power off through ACPI S5. The host then reads the ext4 file back.

The destination is another "host" as far as the network goes: its config (given to
``receive``, the same machine and devices) has a tap of its own, in a namespace of its
own with the same host address, as a destination host's own back-end would be; the
disks are the same files (shared storage, as a migration between hosts needs).

Each boot costs minutes where guest ring 0 is interpreted (kvm_pvm); the time limit is
``AVMM_LINUX_TIMEOUT_S`` (default 1800 s) for the boot and for the run on the
destination.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine
from avmm.config import VmConfig
from tests.linux.support import (
    HOST_SAID,
    KERNEL_BANNER,
    MINIMAL_INITRAMFS,
    MINIMAL_KERNEL,
    READY,
    TIMEOUT_S,
    WAITING,
    GuestDisks,
    answer_and_collect,
    boot_until_waiting,
    host_end,
    linux_config,
    linux_lines,
)
from tests.linux.test_avmm_boot import LinuxRun, check
from tests.prerequisites import require
from tests.virtio_guest_support import TapNamespace

pytestmark = [pytest.mark.linux_boot, pytest.mark.kvm, pytest.mark.net]

REPO = Path(__file__).resolve().parents[2]
RESULT = "avmm-migration-linux-result: "
LISTENING = "avmm-migration-linux-listening"


@dataclasses.dataclass(frozen=True)
class Setup:
    """What both processes build their VM config from."""

    disks: GuestDisks
    seed: int

    def config(self, netns: str, tap: str) -> VmConfig:
        return linux_config(MINIMAL_KERNEL, MINIMAL_INITRAMFS, self.disks,
                            run="snapshot-checks", seed=self.seed, netns=netns, tap=tap)


def prepare(tmp_path: Path) -> tuple[Setup, bytes]:
    disks, data = GuestDisks.make(tmp_path)
    return Setup(disks, secrets.randbelow(10**6)), data


# -- the destination (a new process) -------------------------------------------------------


async def _receive_and_finish(listen: str, config: VmConfig, log_path: Path,
                              ) -> dict[str, object]:
    """Listen, say so, receive; once the guest runs here, type the line it waits for and
    collect the serial output until the VM ends."""
    output = bytearray()
    with open(log_path, "wb") as log:
        async with VirtualMachine.receive(listen, config=config) as vm:
            print(LISTENING, flush=True)
            timed_out = False
            # The source boots Linux before it migrates: minutes on kvm_pvm.
            with trio.move_on_after(2 * TIMEOUT_S) as scope:
                while vm.migration is None or vm.migration.state != "completed":
                    if vm.exit is not None:
                        break
                    await trio.sleep(0.05)
                # Read the serial port from the hand-over on (the guest sits in its read
                # until the line comes, so nothing is missed): the port is the built
                # machine's, which an incoming VM has only once it received.
                await answer_and_collect(vm, output, log)
            if scope.cancelled_caught:
                timed_out = True
                vm.stop("test timed out")
            result = await vm.wait()
            progress = vm.migration
    return {"output": output.decode(errors="replace"), "reason": result.reason.name,
            "detail": result.detail, "timed_out": timed_out,
            "migration": progress.as_dict() if progress is not None else None}


def receive_main() -> None:
    """``python -c 'from tests.linux.test_migration_linux import receive_main;
    receive_main()' LISTEN LOG NETNS TAP DATA EXT4 SEED``: the destination process."""
    listen, log_path, netns, tap, data, ext4, seed = sys.argv[1:8]
    config = Setup(GuestDisks(Path(data), Path(ext4)), int(seed)).config(netns, tap)
    result = trio.run(_receive_and_finish, listen, config, Path(log_path))
    print(RESULT + json.dumps(result), flush=True)


# -- the source (this process) -------------------------------------------------------------


@dataclasses.dataclass
class Source:
    output: str
    userspace_s: float | None
    marker_before_ready: bool | None
    reason: StopReason
    migration: object


async def boot_and_migrate(setup: Setup, namespace: TapNamespace, to: str,
                           log_path: Path) -> Source:
    """Boot the minimal kernel to snapshot-checks' waiting line, then migrate it."""
    output = bytearray()
    with open(log_path, "wb") as log:
        async with VirtualMachine(setup.config(namespace.netns, namespace.tap)) as vm:
            reached, marker = await boot_until_waiting(vm, output, log)
            if not reached:
                pytest.fail(f"Linux never reached {WAITING!r} (exit {vm.exit}); last "
                            f"output:\n{output.decode(errors='replace')[-4000:]}")
            userspace_s = vm.userspace_reached_s
            progress = await vm.migrate(to)
            result = await vm.wait()
    return Source(output.decode(errors="replace"), userspace_s, marker, result.reason,
                  progress)


def wait_for_line(path: Path, line: str, process: subprocess.Popen[bytes], err: Path) -> None:
    deadline = time.monotonic() + 300
    while line not in path.read_text(errors="replace").splitlines():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the destination never said {line!r} (exit {process.poll()}):\n"
                        f"{err.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


def test_minimal_kernel_migrated_in_userspace_runs_the_guest_checks_on_the_destination(
        tmp_path: Path) -> None:
    require(None if MINIMAL_KERNEL.exists() and MINIMAL_INITRAMFS.exists()
            else "the minimal kernel is missing (make linux-kernel linux-initramfs)")
    setup, data = prepare(tmp_path)
    sock = tmp_path / "migrate.sock"
    with TapNamespace() as here, TapNamespace() as there:
        host_end(here)
        host_end(there)
        code = "from tests.linux.test_migration_linux import receive_main; receive_main()"
        # Files, not pipes: nobody reads a pipe while this process boots Linux for
        # minutes, and a full one would stall the destination mid-migration.
        out_path, err_path = tmp_path / "destination.out", tmp_path / "destination.err"
        with open(out_path, "wb") as out_file, open(err_path, "wb") as err_file:
            destination = subprocess.Popen(
                [sys.executable, "-c", code, f"unix:{sock}", str(tmp_path / "serial-after.log"),
                 there.netns, there.tap, str(setup.disks.data_image),
                 str(setup.disks.ext4_image), str(setup.seed)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file)
        try:
            wait_for_line(out_path, LISTENING, destination, err_path)
            source = trio.run(functools.partial(boot_and_migrate, setup, here,
                                                f"unix:{sock}", tmp_path / "serial-before.log"))
            destination.wait(timeout=TIMEOUT_S + 300)
        finally:
            if destination.poll() is None:
                destination.kill()
                destination.wait()
    out = out_path.read_text(errors="replace")
    err = err_path.read_text(errors="replace")
    results = [json.loads(line[len(RESULT):]) for line in out.splitlines()
               if line.startswith(RESULT)]
    assert results, f"the destination exited {destination.returncode}:\n{out[-3000:]}\n" \
                    f"{err[-3000:]}"
    received = results[0]
    text = str(received["output"])
    # The source handed over and stopped; the destination took the guest.
    assert source.reason is StopReason.MIGRATED, source.reason
    assert getattr(source.migration, "state", None) == "completed", source.migration
    assert not received["timed_out"], (f"migrated Linux did not finish within "
                                       f"{TIMEOUT_S:.0f} s (AVMM_LINUX_TIMEOUT_S):\n"
                                       f"{text[-4000:]}")
    # Before the migration the guest reached userspace and ran nothing of the checks.
    assert linux_lines(source.output) == [READY, WAITING], source.output[-4000:]
    assert source.userspace_s is not None
    # On the destination the guest goes on from its read, without booting again: the
    # host's line, then guest-checks.
    after = linux_lines(text)
    assert KERNEL_BANNER in source.output
    assert KERNEL_BANNER not in text and READY not in text, text[-4000:]
    assert after[:1] == [HOST_SAID], text[-4000:]
    run = LinuxRun(output=text, lines=[READY, *after[1:]], userspace_s=source.userspace_s,
                   exit_reason=StopReason[str(received["reason"])],
                   exit_detail=str(received["detail"]), device_status_at_init={},
                   marker_before_ready=source.marker_before_ready)
    # Every check's line in order, from the destination; the ext4 file read back on the
    # host; ACPI power-off; the boot-time marker (first boot) before the ready line.
    check(run, data, setup.disks.ext4_image, setup.seed, syscall_fault_run=False)
