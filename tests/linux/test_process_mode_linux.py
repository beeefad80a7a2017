"""The minimal Linux kernel in a jailed worker: ``avmm serve --isolation process`` with
its seccomp filters in kill mode (the default), driven through the API only
(``make test-linux``; marker ``linux_boot``).

The machine is the one tests/linux/test_avmm_boot.py boots (2 vCPUs, ACPI, a raw data
disk, an ext4 disk, a NIC on a tap in a netns, virtio-rng), sent to the daemon as JSON;
/init runs tests/linux/run/snapshot-checks, so the guest stops and waits in userspace.
While it waits the test checks the worker: unprivileged, no new privileges, every thread
(event loop, both vCPUs, device I/O) under a seccomp filter. It then types the line the
guest waits for through POST /vms/{id}/console, and guest-checks run in the worker: the
disk read whole, a file written on ext4 (read back on the host), a ping to the tap's host
end, /dev/hwrng read twice, the system call entry jump (tests/linux/syscall_fault.py).
Every line is read from the console stream (GET /vms/{id}/console), the way a client of
the daemon reads it (no serial file). The guest powers off through ACPI S5; no thread
was killed by its filter (that would be the VM's crash, SIGSYS), and deleting the VM
leaves no jail behind.

The boot costs minutes where guest ring 0 is interpreted (kvm_pvm); the time limit is
``AVMM_LINUX_TIMEOUT_S`` (default 1800 s).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from avmm import StopReason
from avmm.host import config_to_dict
from tests.isolation.test_process_mode import UIDS, _status, process_daemon
from tests.linux import syscall_fault
from tests.linux.support import (
    GO,
    HOST_SAID,
    MINIMAL_INITRAMFS,
    MINIMAL_KERNEL,
    MINIMAL_VMLINUX,
    READY,
    TIMEOUT_S,
    WAITING,
    GuestDisks,
    host_end,
    keep,
    linux_config,
    linux_lines,
)
from tests.linux.test_avmm_boot import LinuxRun, check, record
from tests.prerequisites import require
from tests.virtio_guest_support import TapNamespace

pytestmark = [pytest.mark.linux_boot, pytest.mark.kvm, pytest.mark.net]

#: The worker's log line for the boot-time marker (avmm/vm.py), as the daemon relays it.
MARKER_LOGGED = re.compile(r"guest userspace reached.*?boot_time_ms=([\d.]+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _worker_log(log: str, vm_id: str) -> list[str]:
    """The daemon's lines relayed from ``vm_id``'s worker, without colour codes."""
    prefix = f"[worker {vm_id}] "
    return [ANSI.sub("", line) for line in log.splitlines() if line.startswith(prefix)]


def _marker_ms(log: str, vm_id: str) -> float | None:
    for line in _worker_log(log, vm_id):
        if match := MARKER_LOGGED.search(line):
            return float(match[1])
    return None


def _check_worker_while_the_guest_waits(pid: int, vm: dict[str, Any]) -> None:
    """Unprivileged, no_new_privs, and every thread of the worker under its filter
    (``Seccomp: 2``, filter mode), both vCPUs among them."""
    status = _status(pid)
    assert status["NoNewPrivs"] == "1", status
    uids = {int(value) for value in status["Uid"].split()}
    assert len(uids) == 1 and UIDS[0] <= uids.pop() <= UIDS[1], status["Uid"]
    tasks = [int(task) for task in os.listdir(f"/proc/{pid}/task")]
    assert len(vm["vcpu_threads"]) == 2 and set(vm["vcpu_threads"]) <= set(tasks), (
        vm["vcpu_threads"], tasks)
    for task in tasks:
        task_status = _status(pid, task)
        assert task_status["Seccomp"] == "2", (task, task_status.get("Name"))
        assert task_status["NoNewPrivs"] == "1", (task, task_status.get("Name"))


async def test_minimal_kernel_in_a_jailed_worker_with_filters_in_kill_mode(
    tmp_path: Path, figure: Callable[[str, str], None],
) -> None:  # fmt: skip
    require(None if MINIMAL_KERNEL.exists() and MINIMAL_INITRAMFS.exists()
            else "the minimal kernel is missing (make linux-kernel linux-initramfs)")
    require(None if MINIMAL_VMLINUX.exists()
            else "build/linux/vmlinux is missing (make linux-kernel)")
    seed = secrets.randbelow(10**6)
    disks, data = GuestDisks.make(tmp_path)
    started = time.monotonic()
    with TapNamespace() as namespace:
        host_end(namespace)
        config = linux_config(
            MINIMAL_KERNEL, MINIMAL_INITRAMFS, disks, run="snapshot-checks", seed=seed,
            netns=namespace.netns, tap=namespace.tap,
            extra=syscall_fault.cmdline_words(MINIMAL_VMLINUX, opt_in=False))
        # process_daemon: root (else require() skips, or fails under AVMM_REQUIRE_KVM=1)
        # and --isolation process; kill is --seccomp's default, named here all the same.
        async with process_daemon("--seccomp", "kill") as (daemon, api, jail_root):
            vm = await api.create_vm(config_to_dict(config))
            vm_id, pid = vm["id"], vm["pid"]
            assert vm["isolation"] == "process" and pid != daemon.process.pid, vm
            output = bytearray()
            answered = False
            marker_before_waiting: bool | None = None
            # The console as it arrives, for watching a slow boot: tail -f .../serial.log
            with (tmp_path / "serial.log").open("wb") as log, \
                    trio.move_on_after(TIMEOUT_S) as scope:
                # The backlog, then live chunks until the VM stops.
                async with api.console(vm_id) as chunks:
                    async for chunk in chunks:
                        keep(chunk, output, log)
                        if not answered and WAITING.encode() in output:
                            answered = True
                            running = await api.get_vm(vm_id)
                            assert running["state"] == "running", running
                            _check_worker_while_the_guest_waits(pid, running)
                            # The worker logs the marker from the vCPU that wrote it,
                            # seconds of guest time before snapshot-checks waits; its
                            # stderr (relayed by the daemon) and the console are two
                            # channels, so the order is checked here, not at ready.
                            with trio.move_on_after(10):
                                while _marker_ms(daemon.stderr.read_text(), vm_id) is None:
                                    await trio.sleep(0.1)
                            marker_before_waiting = _marker_ms(
                                daemon.stderr.read_text(), vm_id) is not None
                            await api.send_console(vm_id, f"{GO}\n".encode())
            text = output.decode(errors="replace")
            if scope.cancelled_caught:
                state = await api.get_vm(vm_id)
                pytest.fail(f"Linux did not finish within {TIMEOUT_S:.0f} s "
                            f"(AVMM_LINUX_TIMEOUT_S); VM {state['state']} {state['exit']}; "
                            f"last output:\n{text[-4000:]}")
            assert answered, f"Linux never reached {WAITING!r}; last output:\n{text[-4000:]}"
            with trio.fail_after(60):
                while (vm := await api.get_vm(vm_id))["state"] != "stopped":
                    await trio.sleep(0.1)
            total_s = time.monotonic() - started
            daemon_log = daemon.stderr.read_text(errors="replace")
            # A filter's kill is the worker's SIGSYS: the VM's crash, reported as such.
            assert "SIGSYS" not in daemon_log and "Traceback" not in daemon_log, \
                daemon_log[-4000:]
            assert vm["exit"]["reason"] == StopReason.POWEROFF.value, (vm["exit"], text[-4000:])
            assert not (jail_root / vm_id).exists()  # the jail went with the worker
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            await api.delete_vm(vm_id)
            assert vm_id not in {entry["id"] for entry in await api.list_vms()}
            assert not (jail_root / vm_id).exists()

    lines = linux_lines(text)
    assert lines[:3] == [READY, WAITING, HOST_SAID], text[-4000:]
    marker_ms = _marker_ms(daemon_log, vm_id)
    run = LinuxRun(output=text, lines=[READY, *lines[3:]],
                   userspace_s=None if marker_ms is None else marker_ms / 1000,
                   exit_reason=StopReason(vm["exit"]["reason"]),
                   exit_detail=vm["exit"]["detail"], device_status_at_init={},
                   marker_before_ready=marker_before_waiting)
    # Every check's line in order, the ext4 file read back on the host, ACPI power-off,
    # the boot-time marker seen (by the time the guest waited).
    check(run, data, disks.ext4_image, seed, syscall_fault_run=True)
    record(figure, "minimal kernel (--isolation process)", run, total_s)
