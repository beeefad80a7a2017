"""The ``fairness`` group, noisy-neighbour part: how much a VM that reads its disk as fast
as it can slows a quiet VM's disk, in one avmm daemon, with every VM in the daemon's
process (``--isolation none``) and each in a jailed worker of its own (``process``).

The quiet VM runs the test guest's ``blk-bench`` at queue depth 1 (random 4 KiB reads)
on its own image; its rate is timed by the guest: ``n`` requests over the TSC ticks
from its first request to its last completion (``cycles=``; time its vCPU spent
descheduled is in it, the TSC runs on), converted with the TSC rate KVM gives a new
vCPU (``KVM_GET_TSC_KHZ``). (Until the control row came, the rate was a difference of
two whole VM runs of 3,300 and 300 requests, as in the rate-limit figures; only the
longer run printed the latency line, about 60 serial bytes at two exits each, which the
difference counted as request time.)

Five neighbours: none (alone); a noisy VM running ``blk-bench`` at queue depth 32 on
its own image, unlimited; the same noisy VM limited to 500 requests per second and a
quarter of a CPU (``cpu_max_percent``: its guest polls for completions, so it spins a
CPU whatever its disk's limit); and the control, no VM at all: a plain process that
spins for the limited VM's quota and sleeps for the rest of its CFS period (2.5 ms of
every 10 ms, :func:`avmm.cgroups.backend.cfs_period_us`). The control takes from the
quiet VM what the host's CPUs cannot give both, whatever a VMM does: the quiet VM
needs more than one CPU on its own, its vCPU spinning (the guest polls) while its I/O
thread serves each request (a plain busy loop on this 2-CPU host takes it to a
quarter of its rate or less). The limited VM's row is to be read against the control's:
what it costs beyond that is a VM's. The fifth neighbour says whether that part is
avmm's: the same limited noisy VM run by QEMU (microvm, KVM, the same guest and image),
its disk throttled to 500 requests/s (``-drive throttling.iops-total=500``) and the same
quota as avmm writes, through :class:`avmm.cgroups.vm_cpu.VmCpu`, on what avmm's limited
VM has it on: its vCPU thread in dense mode, its whole process in process mode. (On
cgroup v2 one process holds VM cgroups of one layout only, threads or worker
processes: this group's limited rows of both modes in one run need cgroup v1, as this
project's machines have.) Goal (issue 15):
with the limits, the quiet VM within 10 % of alone. The quiet VM is avmm's in every
row: these are the daemon's own figures. Dense mode runs with
``avmm serve --isolation none``'s GIL switch interval
(:func:`avmm.threads.share_the_interpreter_between_vms`).

Latency: in the same run the quiet guest times each request (TSC ticks from making it
available to finding it used, ``blk-bench avmm.lat=1``) and prints the median and the
99th percentile, converted to microseconds likewise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from avmm.cgroups.backend import cfs_period_us
from avmm.threads import share_the_interpreter_between_vms
from benchmarks.common import (
    SHARING,
    BenchError,
    Figure,
    avmm_config,
    end_process,
    guest_timed_iops,
    log,
    qemu_argv,
    tsc_khz,
)
from benchmarks.isolation import host_for

__all__ = ["bench_noisy_neighbour"]

IMAGE_MIB = 64
#: Not /dev/shm: a jail makes its own /dev, and a worker sees its disks at their paths.
IMAGES = Path("/tmp")
NOISY_LIMIT = {"ops": {"size": 50, "refill_ms": 100}}  # 500 requests per second
#: The limited noisy VM's CPU quota: blk-bench waits for its requests by polling the used
#: ring in ring 3 (no interrupts, no exits), so a noisy guest whose disk is limited still
#: spins a host CPU; its VM's limits are on both (issue 15: per-VM limits bound its
#: share of the CPU too).
NOISY_CPU_PERCENT = 25
#: QEMU's block throttling for the same 500 requests per second (its bucket holds a tenth
#: of a second's worth by default: 50 requests, as NOISY_LIMIT's).
QEMU_NOISY_THROTTLE = "throttling.iops-total=500"
NEIGHBOURS = ("alone", "next to an unlimited noisy VM", "next to a noisy VM limited to "
              f"500 requests/s and {NOISY_CPU_PERCENT} % of a CPU",
              f"next to a plain process spinning {NOISY_CPU_PERCENT} % of a CPU (no VM; "
              "the control)",
              "next to the same limited noisy VM run by QEMU (`throttling.iops-total=500`, "
              f"a {NOISY_CPU_PERCENT} % quota as avmm's)")
LIMITED, CONTROL, QEMU_LIMITED = 2, 3, 4


def spinner_argv(percent: float) -> list[str]:
    """A process that spins for ``percent`` of each CFS period a VM limited to
    ``percent`` gets, and sleeps for the rest: the CPU the limited noisy VM may take,
    taken by something that is not a VM."""
    period_s = cfs_period_us(percent) / 1e6
    busy_s = period_s * percent / 100
    return [sys.executable, "-c",
            "import time\n"
            "while True:\n"
            "    start = time.perf_counter()\n"
            f"    while time.perf_counter() - start < {busy_s!r}:\n"
            "        pass\n"
            f"    time.sleep({period_s - busy_s!r})\n"]


_LATENCY = re.compile(r"blk-bench latency n=(\d+) p50=(\d+) p99=(\d+) max=(\d+)")


def _cmd(n: int, qd: int, *, latency: bool = False) -> str:
    return (f"avmm.test=blk-bench avmm.rw=read avmm.qd={qd} avmm.n={n} avmm.qsize=128"
            + (" avmm.lat=1" if latency else ""))


class Quiet:
    """One measurement of the quiet VM: its rate as the guest timed it, and the median
    and 99th percentile of its requests' latencies in the guest's TSC ticks."""

    def __init__(self, iops: float, p50_ticks: int, p99_ticks: int) -> None:
        self.iops, self.p50_ticks, self.p99_ticks = iops, p50_ticks, p99_ticks


async def _quiet_run(host: Any, image: Path, n: int, tsc_hz: float) -> Quiet:
    from avmm.config import DiskConfig

    vm = await host.create(avmm_config(_cmd(n, 1, latency=True), disks=[DiskConfig(image)]))
    await vm.wait()
    output = vm.console_backlog().decode(errors="replace")
    await host.remove(vm.id)
    latency = _LATENCY.search(output)
    if f"blk-bench rw=read qd=1 n={n} done" not in output or latency is None:
        raise BenchError(f"the quiet VM's blk-bench failed: {output[-300:]!r}")
    return Quiet(guest_timed_iops(output, tsc_hz, "the quiet VM's blk-bench"),
                 int(latency[2]), int(latency[3]))


async def _quiet_next_to(process: bool, neighbour: int, quiet: Path, noisy: Path,
                         n: int, tsc_hz: float) -> Quiet:
    from avmm.config import DiskConfig, parse_rate_limit

    async with host_for(process) as host:
        noisy_vm = other = qemu_cpu = None  # other: the control's process, or QEMU's
        if neighbour == CONTROL:
            other = subprocess.Popen(spinner_argv(NOISY_CPU_PERCENT),
                                       stdin=subprocess.DEVNULL)
            await trio.sleep(0.3)  # past its start-up
        elif neighbour == QEMU_LIMITED:
            other, qemu_cpu = await _limited_qemu(process, noisy)
        elif neighbour:
            limited = neighbour == LIMITED
            config = avmm_config(_cmd(100_000_000, 32), disks=[DiskConfig(
                noisy, rate_limit=parse_rate_limit(NOISY_LIMIT, "rate_limit")
                if limited else None)])
            if limited:
                config = dataclasses.replace(config, machine=dataclasses.replace(
                    config.machine, cpu_max_percent=NOISY_CPU_PERCENT))
            noisy_vm = await host.create(config)
            await trio.sleep(0.3)  # past its boot: reading at full speed
        try:
            return await _quiet_run(host, quiet, n, tsc_hz)
        finally:
            if noisy_vm is not None:
                await noisy_vm.stop()
            # Shielded: a cgroup left behind would outlive the run (until some avmm's
            # start-up cleanup).
            with trio.CancelScope(shield=True):
                try:
                    if other is not None:
                        end_process(other)
                finally:
                    if qemu_cpu is not None:
                        await trio.to_thread.run_sync(qemu_cpu.release)


def _qemu_noisy_argv(noisy: Path) -> list[str]:
    return [*qemu_argv(_cmd(100_000_000, 32)),
            "-name", "noisy,debug-threads=on",  # names its vCPU thread "CPU 0/KVM"
            "-device", "virtio-blk-device,drive=d0",
            "-drive", f"id=d0,file={noisy},format=raw,if=none,{QEMU_NOISY_THROTTLE}"]


#: How QEMU names its vCPU thread with ``-name ...,debug-threads=on``.
QEMU_VCPU_THREAD = "CPU 0/KVM"


def _qemu_vcpu_thread(pid: int, timeout_s: float = 10.0) -> int:
    """The thread id of QEMU's vCPU (blocking: waits for QEMU to make it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as comm:
                if comm.read().strip() == QEMU_VCPU_THREAD:
                    return int(tid)
        time.sleep(0.01)
    raise BenchError(f"QEMU made no {QEMU_VCPU_THREAD!r} thread within {timeout_s} s")


async def _limited_qemu(process: bool, noisy: Path) -> tuple[subprocess.Popen[bytes], Any]:
    """QEMU running the limited noisy VM, with the limited VM's quota on what avmm's
    limited VM has it on: in process mode QEMU's whole process, as a worker is (its
    cgroup made as the daemon makes a worker's); in dense mode its vCPU thread only, as
    a VM of the daemon's process has its vCPU threads, not its disk's I/O thread nor the
    event loop, in its cgroup. (On cgroup v2 a dense-mode VM cgroup is a threaded one,
    which takes thread ids of processes in its domain: QEMU starts after the cgroup
    exists, in its domain.)"""
    from avmm.cgroups.vm_cpu import CpuLimits, VmCpu

    cpu = VmCpu(f"bench-qemu-{os.getpid()}", CpuLimits(max_percent=NOISY_CPU_PERCENT),
                worker=process)
    await trio.to_thread.run_sync(cpu.prepare)
    qemu = None
    try:
        # Its serial output unread (a pipe left full would stop the guest); QEMU's own
        # messages are few.
        qemu = subprocess.Popen(_qemu_noisy_argv(noisy), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if process:
            await trio.to_thread.run_sync(cpu.place_process, qemu.pid)
        else:
            vcpu = await trio.to_thread.run_sync(_qemu_vcpu_thread, qemu.pid)
            await trio.to_thread.run_sync(cpu.place, [(0, vcpu)])
        await trio.sleep(0.5)  # past its boot: reading at its limit
        if qemu.poll() is not None:
            errors = qemu.stderr.read() if qemu.stderr else b""
            raise BenchError(f"QEMU's noisy VM ended early: {errors[-300:]!r}")
        return qemu, cpu
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                if qemu is not None:
                    end_process(qemu)
            finally:
                await trio.to_thread.run_sync(cpu.release)
        raise


def bench_noisy_neighbour(runs: int, n: int) -> list[Figure]:
    quiet = IMAGES / f"avmm-bench-quiet-{os.getpid()}.img"
    noisy = IMAGES / f"avmm-bench-noisy-{os.getpid()}.img"
    for image in (quiet, noisy):
        with open(image, "wb") as f:
            for _ in range(IMAGE_MIB):
                f.write(os.urandom(1 << 20))
    cases = [(mode, index, text) for mode in ("none", "process")
             for index, text in enumerate(NEIGHBOURS)]
    note = ("one daemon's VMs; the noisy one reads at qd 32; goal: with its limit, within "
            "10 % of alone")
    rates = {(mode, index): Figure(
        f"noisy neighbour: quiet VM's blk 4 KiB reads qd 1, {text}, `--isolation {mode}`",
        "IOPS", "higher", SHARING, note=note + "; timed by the guest (TSC)")
        for mode, index, text in cases}
    latencies = {(mode, index, which): Figure(
        f"noisy neighbour: quiet VM's blk 4 KiB read latency qd 1, {label}, {text}, "
        f"`--isolation {mode}`", "µs", "lower", SHARING,
        note=note + "; the guest's own clock (TSC)")
        for mode, index, text in cases for which, label in (("p50", "median"),
                                                            ("p99", "99th percentile"))}
    ticks_per_us = tsc_khz() / 1000
    # As `avmm serve --isolation none` runs (see avmm.threads); put back for the groups
    # that run after this one.
    interval = share_the_interpreter_between_vms()
    try:
        for _ in range(runs):
            for mode, index, _text in cases:
                quiet_vm = trio.run(_quiet_next_to, mode == "process", index, quiet, noisy,
                                    n, ticks_per_us * 1e6)
                rates[mode, index].avmm.append(quiet_vm.iops)
                latencies[mode, index, "p50"].avmm.append(quiet_vm.p50_ticks / ticks_per_us)
                latencies[mode, index, "p99"].avmm.append(quiet_vm.p99_ticks / ticks_per_us)
        for figure in [*rates.values(), *latencies.values()]:
            log(f"benchmarks: {figure.name}: {figure.avmm}")
    finally:
        sys.setswitchinterval(interval)
        quiet.unlink(missing_ok=True)
        noisy.unlink(missing_ok=True)
    return [*rates.values(), *latencies.values()]
