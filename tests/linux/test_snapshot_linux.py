"""The minimal Linux kernel snapshotted in userspace and restored in a new process, where
the guest checks then run (``make test-linux``; marker ``linux_boot``).

The kernel boots as in tests/linux/test_avmm_boot.py (2 vCPUs, ACPI, a raw data disk, an
ext4 disk, a NIC on a tap in a netns, virtio-rng), with /init running
tests/linux/run/snapshot-checks: it says it waits for the host, reads a line from the
console, then runs guest-checks. Once the waiting line is out, this process pauses the VM,
snapshots it and stops it. A NEW Python process restores the snapshot
(``VirtualMachine.restore``) and types the line; everything guest-checks does (read the
data disk whole, write a file on ext4, ping the host end of the tap, read /dev/hwrng
twice) thus happens in the restored VM, whose serial output must carry every line in
order, and which must power off through ACPI S5. The host then reads the ext4 file back.

Each boot costs minutes where guest ring 0 is interpreted (kvm_pvm); the time limit is
``AVMM_LINUX_TIMEOUT_S`` (default 1800 s) for each of the two VMs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from avmm import StopReason, VirtualMachine
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
RESULT = "avmm-snapshot-linux-result: "


@dataclasses.dataclass
class FirstBoot:
    output: str
    userspace_s: float | None
    #: Whether avmm had seen the boot-time marker when /init's ready line arrived.
    marker_before_ready: bool | None


async def boot_and_snapshot(tmp_path: Path, namespace: TapNamespace, seed: int,
                            snapshot: Path) -> tuple[FirstBoot, bytes, Path]:
    """Boot the minimal kernel to snapshot-checks' waiting line, pause, snapshot, stop."""
    disks, data = GuestDisks.make(tmp_path)
    config = linux_config(MINIMAL_KERNEL, MINIMAL_INITRAMFS, disks, run="snapshot-checks",
                          seed=seed, netns=namespace.netns, tap=namespace.tap)
    output = bytearray()
    with (tmp_path / "serial-before.log").open("wb") as log:
        async with VirtualMachine(config) as vm:
            reached, marker = await boot_until_waiting(vm, output, log)
            if not reached:
                pytest.fail(f"Linux never reached {WAITING!r} (exit {vm.exit}); last "
                            f"output:\n{output.decode(errors='replace')[-4000:]}")
            await vm.pause()
            await vm.snapshot(snapshot)
            userspace_s = vm.userspace_reached_s
            vm.stop("snapshot taken")
            await vm.wait()
    first = FirstBoot(output.decode(errors="replace"), userspace_s, marker)
    return first, data, disks.ext4_image


async def _restore_and_finish(snapshot: Path, log_path: Path) -> dict[str, object]:
    """In the new process: restore, type the line the guest waits for, collect the
    serial output until the VM ends."""
    output = bytearray()
    with open(log_path, "wb") as log:
        async with VirtualMachine.restore(snapshot) as vm:
            with trio.move_on_after(TIMEOUT_S) as scope:
                await answer_and_collect(vm, output, log)
            if scope.cancelled_caught:
                vm.stop("test timed out")
            result = await vm.wait()
    return {"output": output.decode(errors="replace"), "reason": result.reason.name,
            "detail": result.detail, "timed_out": scope.cancelled_caught}


def restore_main() -> None:
    """``python -c 'from tests.linux.test_snapshot_linux import restore_main;
    restore_main()' SNAPSHOT LOG``: the restoring process."""
    snapshot, log_path = Path(sys.argv[1]), Path(sys.argv[2])
    result = trio.run(_restore_and_finish, snapshot, log_path)
    print(RESULT + json.dumps(result), flush=True)


def restore_in_new_process(snapshot: Path, log_path: Path) -> dict[str, object]:
    code = "from tests.linux.test_snapshot_linux import restore_main; restore_main()"
    process = subprocess.run([sys.executable, "-c", code, str(snapshot), str(log_path)],
                             cwd=REPO, capture_output=True, text=True,
                             timeout=TIMEOUT_S + 300, check=False)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT):
            result: dict[str, object] = json.loads(line[len(RESULT):])
            return result
    pytest.fail(f"the restoring process exited {process.returncode} without a result:\n"
                f"{process.stdout[-3000:]}\n{process.stderr[-3000:]}")


def test_minimal_kernel_snapshotted_in_userspace_runs_the_guest_checks_after_restore(
        tmp_path: Path) -> None:
    require(None if MINIMAL_KERNEL.exists() and MINIMAL_INITRAMFS.exists()
            else "the minimal kernel is missing (make linux-kernel linux-initramfs)")
    seed = secrets.randbelow(10**6)
    snapshot = tmp_path / "snapshot"
    with TapNamespace() as namespace:
        host_end(namespace)
        first, data, ext4_image = trio.run(functools.partial(
            boot_and_snapshot, tmp_path, namespace, seed, snapshot))
        # Before the snapshot the guest reached userspace and ran nothing of the checks.
        before = linux_lines(first.output)
        assert before == [READY, WAITING], first.output[-4000:]
        assert first.userspace_s is not None
        restored = restore_in_new_process(snapshot, tmp_path / "serial-after.log")
    text = str(restored["output"])
    assert not restored["timed_out"], (f"restored Linux did not finish within "
                                       f"{TIMEOUT_S:.0f} s (AVMM_LINUX_TIMEOUT_S):\n"
                                       f"{text[-4000:]}")
    after = linux_lines(text)
    # The restored guest goes on from its read, without booting again: the host's line,
    # then guest-checks.
    assert KERNEL_BANNER in first.output
    assert KERNEL_BANNER not in text and READY not in text, text[-4000:]
    assert after[:1] == [HOST_SAID], text[-4000:]
    run = LinuxRun(output=text, lines=[READY, *after[1:]], userspace_s=first.userspace_s,
                   exit_reason=StopReason[str(restored["reason"])],
                   exit_detail=str(restored["detail"]), device_status_at_init={},
                   marker_before_ready=first.marker_before_ready)
    # Every check's line in order, from the restored VM; the ext4 file read back on the
    # host; ACPI power-off; the boot-time marker (first boot) before the ready line.
    check(run, data, ext4_image, seed, syscall_fault_run=False)
