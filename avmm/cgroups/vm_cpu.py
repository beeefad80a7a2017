"""A VM's CPU controls: its cgroup (weight, quota), its vCPU threads' affinity, and the
clean-up of cgroups that a crashed avmm left behind.

Nothing is created for a VM that asks for nothing. Every method that touches cgroupfs or
sets an affinity is blocking: call it from a worker thread (trio.to_thread).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from .backend import (
    CFS_PERIOD_US,
    CgroupError,
    CpuBackend,
    CpuUsage,
    cfs_period_us,
    detect_backend,
    owner_alive,
    owner_name,
    quota_us,
    weight_to_shares,
)
from .cpulist import format_cpu_list

log = structlog.get_logger(__name__)

__all__ = ["CpuLimits", "HostCgroups", "StartGate", "VmCpu", "cleanup_stale", "host_cgroups",
           "limits_from_machine"]

DEFAULT_WEIGHT = 100


@dataclass(frozen=True, slots=True)
class CpuLimits:
    """What a VM asked for (None: not asked)."""

    weight: int | None = None
    max_percent: float | None = None
    #: Host CPUs for every vCPU thread.
    affinity: tuple[int, ...] | None = None
    #: Host CPUs per vCPU (index = vCPU id), over ``affinity`` for that vCPU.
    vcpu_affinity: tuple[tuple[int, ...], ...] | None = None

    @property
    def needs_cgroup(self) -> bool:
        return self.weight is not None or self.max_percent is not None

    @property
    def any(self) -> bool:
        return self.needs_cgroup or self.affinity is not None or self.vcpu_affinity is not None

    def affinity_of(self, vcpu: int) -> tuple[int, ...] | None:
        if self.vcpu_affinity is not None and vcpu < len(self.vcpu_affinity):
            return self.vcpu_affinity[vcpu]
        return self.affinity


def limits_from_machine(machine: Any) -> CpuLimits:
    """The CPU controls a ``[machine]`` config (avmm.config.MachineConfig) asks for."""
    return CpuLimits(weight=machine.cpu_weight, max_percent=machine.cpu_max_percent,
                     affinity=machine.cpu_affinity, vcpu_affinity=machine.vcpu_affinity)


class HostCgroups:
    """This process's share of the host's cgroup tree: the backend (found once) and its
    owner cgroup, made when the first VM needs one."""

    def __init__(self, backend: CpuBackend | str) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._owner: Path | None = None
        #: The owner's layout: VMs in worker processes, or vCPU threads of this one.
        self._workers = False
        self._vms = 0

    def require(self) -> CpuBackend:
        if isinstance(self.backend, str):
            raise CgroupError(f"cpu_weight/cpu_max_percent cannot be applied on this host: "
                              f"{self.backend}")
        return self.backend

    def create_vm(self, name: str, *, worker: bool = False) -> list[Path]:
        """Make a VM's cgroup, ``name`` or, if a VM of this process has that one, the
        first free ``name.N`` (two VMs may share a name; never a cgroup). ``worker``:
        for a whole worker process (process isolation), not for threads of this one."""
        backend = self.require()
        with self._lock:
            if self._owner is None:
                self._owner = backend.prepare_owner(owner_name(), workers=worker)
                self._workers = worker
            elif worker != self._workers and backend.version == "v2":
                # A threaded domain cannot have domain children holding processes, nor
                # can a domain owner without the process have threaded ones.
                raise CgroupError("on cgroup v2 one avmm process runs the VMs with CPU "
                                  "controls either in its own threads or in worker "
                                  "processes, not both")
            unique = name
            for number in itertools.count(2):
                if not (self._owner / unique).exists():
                    break
                unique = f"{name}.{number}"
            dirs = backend.create_vm(self._owner, unique, workers=worker)
            self._vms += 1
            return dirs

    def remove_vm(self, dirs: list[Path]) -> None:
        backend = self.require()
        with self._lock:
            try:
                backend.remove_vm(dirs)
            finally:
                self._vms -= 1
                if (self._vms == 0 and self._owner is not None
                        and not backend.holds_processes(self._owner,
                                                        workers=self._workers)):
                    # An owner holding this process (v2's threaded domain, or the
                    # daemon's leaf in a delegated cgroup) goes once the process has.
                    try:
                        backend.remove_owner(self._owner)
                        self._owner = None
                    except CgroupError as e:
                        log.warning("cannot remove the owner cgroup", error=str(e))

    def cleanup_stale(self) -> list[Path]:
        """Remove the owner cgroups of avmm processes that are gone (a crash, a kill -9):
        returns what was removed. Best effort: an owner that cannot be removed is logged."""
        if isinstance(self.backend, str):
            return []
        removed: list[Path] = []
        try:
            owners = self.backend.owner_dirs()
        except OSError as e:
            log.warning("cannot list the avmm cgroups", error=os.strerror(e.errno or 0))
            return []
        for owner_dir in owners:
            if owner_alive(owner_dir.name):
                continue
            try:
                self.backend.remove_owner(owner_dir)
                removed.append(owner_dir)
            except CgroupError as e:
                log.warning("cannot remove a stale avmm cgroup", path=str(owner_dir),
                            error=str(e))
        if removed:
            log.info("removed stale avmm cgroups", paths=[str(p) for p in removed])
        return removed


_host: HostCgroups | None = None
_host_lock = threading.Lock()


def host_cgroups() -> HostCgroups:
    """The process-wide :class:`HostCgroups` (detected on first use)."""
    global _host
    with _host_lock:
        if _host is None:
            _host = HostCgroups(detect_backend())
        return _host


def cleanup_stale() -> list[Path]:
    """What ``avmm serve`` and ``avmm up`` run at start (blocking; see HostCgroups)."""
    return host_cgroups().cleanup_stale()


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class VmCpu:
    """One VM's CPU controls. ``limits`` are what is in force; the cgroup exists from
    :meth:`prepare` (or the first :meth:`update` that needs one) to :meth:`release`."""

    def __init__(self, vm_name: str, limits: CpuLimits,
                 host: HostCgroups | None = None, *, worker: bool = False) -> None:
        self.vm_name = vm_name
        self.limits = limits
        #: The VM runs in a worker process of its own (process isolation): its cgroup
        #: takes that whole process (:meth:`place_process`), never single threads.
        self.worker = worker
        self._host = host
        self._lock = threading.Lock()
        self._dirs: list[Path] | None = None
        self._tids: dict[int, int] = {}  # vcpu id -> host thread id
        self._released = False
        self._last = CpuUsage(0.0, 0.0)

    @property
    def host(self) -> HostCgroups:
        if self._host is None:
            self._host = host_cgroups()
        return self._host

    @property
    def cgroup(self) -> Path | None:
        return None if self._dirs is None else self._dirs[0]

    @property
    def backend_version(self) -> str | None:
        return None if self._dirs is None else self.host.require().version

    def prepare(self) -> None:
        """Before the vCPUs run: make the cgroup and write the limits (if any are asked),
        so that a host that cannot apply them refuses the VM before it starts."""
        if self.limits.needs_cgroup:
            self._ensure_cgroup()

    def _ensure_cgroup(self) -> list[Path]:
        with self._lock:
            if self._dirs is None:
                if self._released:
                    raise CgroupError(f"VM {self.vm_name!r} has stopped")
                name = "vm-" + _NAME_UNSAFE.sub("_", self.vm_name)[:64]
                dirs = self.host.create_vm(name, worker=self.worker)
                try:
                    backend = self.host.require()
                    backend.set_limits(dirs, self.limits.weight or DEFAULT_WEIGHT,
                                       self.limits.max_percent)
                    # A worker's threads move with their process (place_process).
                    for tid in () if self.worker else self._tids.values():
                        backend.add_thread(dirs, tid)
                except BaseException:
                    self.host.remove_vm(dirs)
                    raise
                self._dirs = dirs
                log.info("vm cgroup created", vm=self.vm_name, cgroup=str(dirs[0]),
                         weight=self.limits.weight, max_percent=self.limits.max_percent)
            return self._dirs

    def place(self, tids: Sequence[tuple[int, int]]) -> None:
        """Put vCPU threads ``(vcpu id, tid)`` in the VM's cgroup and set their affinity
        (before the guest runs on them). A worker's are in it with their process
        already (:meth:`place_process`): only their affinity is set."""
        with self._lock:
            self._tids.update(dict(tids))
            dirs = self._dirs
        if dirs is not None and not self.worker:
            backend = self.host.require()
            for _vcpu, tid in tids:
                backend.add_thread(dirs, tid)
        for vcpu, tid in tids:
            cpus = self.limits.affinity_of(vcpu)
            if cpus is not None:
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError as e:
                    raise CgroupError(f"cannot pin vCPU {vcpu} (thread {tid}) to host CPUs "
                                      f"{format_cpu_list(cpus)}: {os.strerror(e.errno or 0)}"
                                      ) from None

    def place_process(self, pid: int) -> None:
        """Put every thread of process ``pid`` (the VM's worker; a VmCpu made with
        ``worker``) in the VM's cgroup, if it has one: the threads it starts later
        follow their parent thread there. On v1 its ``cgroup.procs`` in each hierarchy;
        on v2 the VM's domain cgroup (see avmm.cgroups.backend for the layout)."""
        if not self.worker:
            raise ValueError("place_process is for the VmCpu of a worker's VM")
        with self._lock:
            dirs = self._dirs
        if dirs is None:
            return
        self.host.require().add_process(dirs, pid)

    def forget_threads(self) -> None:
        with self._lock:
            self._tids.clear()

    def update(self, *, weight: int | None = None, max_percent: float | None = None,
               clear_max: bool = False) -> CpuLimits:
        """Change the weight and/or the quota at run time (``clear_max``: no quota)."""
        limits = self.limits
        if weight is not None:
            limits = replace(limits, weight=weight)
        if max_percent is not None:
            limits = replace(limits, max_percent=max_percent)
        elif clear_max:
            limits = replace(limits, max_percent=None)
        if not limits.needs_cgroup and self._dirs is None:
            self.limits = limits
            return limits
        dirs = self._ensure_cgroup() if self._dirs is None else self._dirs
        self.host.require().set_limits(dirs, limits.weight or DEFAULT_WEIGHT,
                                       limits.max_percent)
        self.limits = limits
        log.info("vm cpu limits changed", vm=self.vm_name, weight=limits.weight,
                 max_percent=limits.max_percent)
        return limits

    def usage(self, tids: Sequence[int] | None = None) -> CpuUsage:
        """CPU time and throttled time of the VM's cgroup; without one, the CPU time of
        its live vCPU threads (``tids``, by default those placed; from
        /proc/self/task/TID/schedstat) and no throttling. Never
        goes back: once the cgroup or the threads are gone, the last value read stays."""
        dirs = self._dirs
        current: CpuUsage | None = None
        if dirs is not None:
            try:
                current = self.host.require().usage(dirs)
            except (OSError, CgroupError):
                current = None
        else:
            total = 0
            for tid in list(self._tids.values()) if tids is None else tids:
                try:
                    # /proc/TID: the thread may be another process's (a VM's worker).
                    with open(f"/proc/{tid}/schedstat", encoding="ascii") as f:
                        total += int(f.read().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
            current = CpuUsage(total / 1e9, 0.0)
        with self._lock:
            last = self._last
            if current is not None:
                last = CpuUsage(max(last.cpu_seconds, current.cpu_seconds),
                                max(last.throttled_seconds, current.throttled_seconds))
                self._last = last
            return last

    def release(self) -> None:
        """Remove the VM's cgroup (idempotent). After the vCPU threads have returned."""
        if self._dirs is not None:
            self.usage()  # the final counts, kept for the API once the cgroup is gone
        with self._lock:
            dirs, self._dirs = self._dirs, None
            self._released = True
        if dirs is not None:
            self.host.remove_vm(dirs)
            log.info("vm cgroup removed", vm=self.vm_name, cgroup=str(dirs[0]))

    def describe(self) -> dict[str, Any]:
        """The effective limits, as the API shows them."""
        limits = self.limits
        return {
            "weight": limits.weight if limits.weight is not None else DEFAULT_WEIGHT,
            "max_percent": limits.max_percent,
            "affinity": None if limits.affinity is None else format_cpu_list(limits.affinity),
            "vcpu_affinity": None if limits.vcpu_affinity is None else [
                format_cpu_list(cpus) for cpus in limits.vcpu_affinity],
            "cgroup": None if self._dirs is None else str(self._dirs[0]),
            "cgroup_version": self.backend_version,
            # What the kernel was given, in its own units.
            "cpu_shares": (weight_to_shares(limits.weight or DEFAULT_WEIGHT)
                           if self.backend_version == "v1" else None),
            "quota_us": None if limits.max_percent is None else quota_us(limits.max_percent),
            "period_us": (CFS_PERIOD_US if limits.max_percent is None
                          else cfs_period_us(limits.max_percent)),
        }


class StartGate:
    """Where a VM's vCPU threads wait before their first KVM_RUN until the event loop
    has placed them (cgroup, affinity): a vCPU thread may not open files (its seccomp
    filter), so a worker thread does the placing while the vCPU threads wait here.

    ``on_all_arrived`` runs on the last thread to arrive (it must only hand the news to
    the event loop). :meth:`open` lets them all go; it is called whatever happens.
    """

    def __init__(self, count: int, on_all_arrived: Callable[[], None]) -> None:
        self._condition = threading.Condition()
        self._count = count
        self._on_all_arrived = on_all_arrived
        self._arrived: list[tuple[int, int]] = []
        self._open = False

    @property
    def arrived(self) -> list[tuple[int, int]]:
        with self._condition:
            return list(self._arrived)

    def arrive(self, vcpu_id: int, tid: int) -> None:
        with self._condition:
            self._arrived.append((vcpu_id, tid))
            if len(self._arrived) == self._count:
                self._on_all_arrived()
            while not self._open:
                self._condition.wait()

    def open(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()
