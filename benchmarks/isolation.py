"""The ``isolation`` group: what one jailed worker process per VM (``avmm serve
--isolation process``) costs next to dense mode (``none``: every VM in the daemon's
process) and next to QEMU (one process per VM).

The VMs are made through :class:`avmm.host.Host`, as the daemon makes them (the API adds
the same small cost to both modes). Needs root (the jailer); the workers run as uids
from :data:`UIDS`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import (
    GUEST_MEMORY_MIB,
    IN_PROCESS,
    WHOLE_PROCESS,
    BenchError,
    Figure,
    avmm_config,
    guest_ram_fd,
    in_spin_loop,
    process_memory,
    process_run,
    qemu_argv,
)
from benchmarks.memchild import SPIN_N

HELLO = "console=ttyS0 avmm.test=hello"
HELLO_DONE = b"avmm-testguest: cmdline:"
SPIN = f"avmm.test=count avmm.n={SPIN_N}"
UIDS = (64200, 64299)
#: VMs running at once for the per-VM memory figure.
MEMORY_VMS = 3


@contextlib.asynccontextmanager
async def host_for(process: bool) -> AsyncIterator[Any]:
    """A Host as ``avmm serve`` makes one: every VM in it, or (``process``) each in a
    jailed worker (the caller needs root)."""
    from avmm.host import Host
    from avmm.isolation.jail import UidAllocator
    from avmm.isolation.seccomp import SeccompMode
    from avmm.isolation.worker_vm import ProcessIsolation

    if not process:
        async with Host() as host:
            yield host
        return
    if os.geteuid() != 0:
        raise BenchError("the isolation group needs root (the jailer)")
    with tempfile.TemporaryDirectory(prefix="avmm-bench-jail-", dir="/tmp") as root:
        isolation = ProcessIsolation(jail_root=root, uids=UidAllocator(UIDS),
                                     seccomp=SeccompMode.KILL)
        async with Host(isolation=isolation) as host:
            yield host


async def _until_hello(vm: Any) -> None:
    async with vm.subscribe_console() as output:
        seen = b""
        async for chunk in output:
            seen += chunk
            if HELLO_DONE in seen:
                return
    raise BenchError(f"the hello guest ended without its line: {seen[-200:]!r}")


async def _churn(process: bool, seconds: float) -> float:
    """Hello VMs created, booted (to their cmdline line), exited and removed one after
    another in one Host for ``seconds``: VMs per second."""
    config = avmm_config(HELLO)
    async with host_for(process) as host:
        count = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            vm = await host.create(config)
            await _until_hello(vm)
            await vm.wait()
            await host.remove(vm.id)
            count += 1
    return count / elapsed


async def _start_up(process: bool) -> float:
    """Seconds from ``Host.create`` to the guest's first serial byte."""
    config = avmm_config(HELLO)
    async with host_for(process) as host:
        start = time.perf_counter()
        vm = await host.create(config)
        async with vm.subscribe_console() as output:
            async for _chunk in output:
                break
        first = time.perf_counter() - start
        await vm.wait()
        await host.remove(vm.id)
    return first


def _own_pss(pid: int) -> float:
    """MiB of ``pid``'s proportional set size less guest RAM (Pss - Pss_Shmem, from
    smaps_rollup): pages shared with other processes count in part. The fair measure
    for forked workers, which share the spawner's loaded modules copy-on-write, and the
    same as RSS for a QEMU process alone."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    return (fields["Pss"] - fields["Pss_Shmem"]) / 1024.0


async def _worker_memory() -> float:
    """MiB of PSS, guest RAM excluded, that each VM's worker (and its reaper) takes,
    with :data:`MEMORY_VMS` guests in their ``count`` loop."""
    config = avmm_config(SPIN)
    async with host_for(True) as host:
        vms = [await host.create(config) for _ in range(MEMORY_VMS)]
        total = 0.0
        for vm in vms:
            fd = None
            try:
                with trio.fail_after(60):
                    while fd is None or not in_spin_loop(fd):
                        if fd is None:
                            fd = guest_ram_fd(vm.pid, GUEST_MEMORY_MIB << 20)
                        await trio.sleep(0.02)
            finally:
                if fd is not None:
                    os.close(fd)
            total += _own_pss(vm.pid) + _own_pss(_parent(vm.pid))
        for vm in vms:
            await vm.stop()
    return total / MEMORY_VMS


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def _qemu_own_memory() -> float:
    """QEMU's Pss - Pss_Shmem, with its guest in the same ``count`` loop."""
    return process_memory(qemu_argv(SPIN, memfd=True), "QEMU", _own_pss)


def bench_isolation(runs: int, churn_s: float) -> list[Figure]:
    """Churn and start-up in both modes, and the memory a worker costs, each run paired
    with QEMU running the same guest one process per VM."""
    during = f"one after another for {churn_s:g} s in one Host (as `avmm serve` makes them)"
    churn = {mode: Figure(f"isolation: VM churn, `--isolation {mode}`, hello guest", "VMs/s",
                          "higher", IN_PROCESS,
                          note=f"{during}; QEMU one process per VM")
             for mode in ("process", "none")}
    start_up = {mode: Figure(f"isolation: create → first serial byte, `--isolation {mode}`",
                             "ms", "lower", WHOLE_PROCESS,
                             note="avmm: Host.create to the guest's first serial byte "
                                  "(process: worker started, jailed, VM built); QEMU: "
                                  "process start to its first serial byte")
                for mode in ("process", "none")}
    memory = Figure("isolation: memory per VM in `--isolation process` (worker + its "
                    "reaper, PSS), guest RAM excluded", "MiB", "lower", WHOLE_PROCESS,
                    note=f"{MEMORY_VMS} VMs running `count`; Pss - Pss_Shmem (forked "
                         "workers share the spawner's modules); QEMU: one process per VM")
    qemu_hello = qemu_argv(HELLO)
    for _ in range(runs):
        qemu_rate = _qemu_churn(qemu_hello, churn_s)
        qemu_start = process_run(qemu_hello, expect=HELLO_DONE.decode()).first_byte * 1000
        for mode, process in (("process", True), ("none", False)):
            churn[mode].add(trio.run(_churn, process, churn_s), qemu_rate)
            start_up[mode].add(trio.run(_start_up, process) * 1000, qemu_start)
        memory.add(trio.run(_worker_memory), _qemu_own_memory())
    return [*churn.values(), *start_up.values(), memory]


def _qemu_churn(argv: list[str], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        process_run(argv, expect=HELLO_DONE.decode())
        count += 1
    return count / elapsed
