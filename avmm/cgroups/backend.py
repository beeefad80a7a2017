"""Where a host's cgroup CPU controller is, and how each cgroup version spells a limit.

Two backends with one interface (:class:`CpuBackend`):

- :class:`V2Backend`: the unified hierarchy with the ``cpu`` controller. The vCPU threads
  of several VMs in one process must sit in different cgroups, which cgroup v2 allows only
  inside a *threaded subtree*: the process moves into its owner cgroup (the threaded
  domain), each VM gets a child of ``cgroup.type`` "threaded", and vCPU thread ids go to
  its ``cgroup.threads``. Limits: ``cpu.weight``, ``cpu.max``; usage: ``cpu.stat``.
- :class:`V1Backend`: cgroup v1's ``cpu`` hierarchy (and ``cpuacct``'s, for CPU time,
  whether it is co-mounted as ``cpu,cpuacct`` or mounted on its own). v1 has no
  process-granularity rule: thread ids go to ``tasks``. The v2 weight is written as
  ``cpu.shares`` with systemd's mapping (:func:`weight_to_shares`); the quota as
  ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (the period: :func:`cfs_period_us`).

Layout, the same in both (``<root>`` is the hierarchy's mount, or a cgroup delegated to
this user on v2)::

    <root>/avmm/                       the parent of every avmm owner
    <root>/avmm/pid-<NS>-<PID>-<START>/     one per avmm process (NS: its PID namespace's
                                            inode; START: its start time in clock ticks,
                                            so that a reused PID is not taken for the old
                                            owner)
    <root>/avmm/pid-<NS>-<PID>-<START>/<vm> one per VM with CPU controls

On v2 with process isolation (``avmm serve --isolation process``: each VM in a worker
process of its own) the owner is not a threaded domain but a plain *domain* cgroup that
holds no process, and each VM's cgroup is a domain child holding the whole worker (its
PID in ``cgroup.procs``). Why not the threaded layout: a process can only be moved into
a domain cgroup, never into a threaded one, and a threaded subtree spans one process's
threads. Why the owner holds no process: cgroup v2's no-internal-process rule lets a
non-root cgroup hand ``cpu`` to domain children only while no process sits in it (a
cgroup with processes and ``cpu`` in its ``subtree_control`` becomes a thread root,
whose domain children cannot take processes). The same rule holds on every level from
``<root>`` down, so the daemon stays in the cgroup it was started in (a systemd unit's,
keeping the unit's limits) unless that is ``<root>`` itself (a cgroup delegated to it,
``Delegate=yes``, as systemd advises for delegation): then the daemon and its own
processes (the worker spawner, the jails' reapers) move into a leaf of their own::

    <root>/avmm/pid-<NS>-<PID>-<START>/daemon/  the daemon's processes (delegated <root>)
    <root>/avmm/pid-<NS>-<PID>-<START>/vm-<vm>/ one worker process

Every function here makes blocking syscalls on cgroupfs: call them from a worker thread
(trio.to_thread), never from the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from ..errors import AvmmError

__all__ = [
    "CFS_PERIOD_US",
    "CgroupError",
    "CpuBackend",
    "CpuUsage",
    "V1Backend",
    "V2Backend",
    "cfs_period_us",
    "detect_backend",
    "owner_name",
    "parse_owner_name",
    "quota_us",
    "weight_to_shares",
]

#: The longest CFS period avmm writes (v1 cpu.cfs_period_us, v2 cpu.max's second field):
#: the kernel's default, for quotas under 1 % (:func:`cfs_period_us`).
CFS_PERIOD_US: Final = 100_000
#: The shortest: the kernel hands quota to CPUs in 5 ms slices
#: (sched_cfs_bandwidth_slice_us), so a period much under twice that is enforced
#: coarsely.
CFS_PERIOD_MIN_US: Final = 10_000
#: The kernel's smallest quota (1 ms per period).
_QUOTA_MIN_US: Final = 1000
AVMM_DIR: Final = "avmm"
#: v2, worker layout: the leaf the daemon's processes move to when ``<root>`` is a
#: delegated cgroup (module docstring). VM cgroups are ``vm-*``: never this name.
DAEMON_DIR: Final = "daemon"
#: ``pid-<PID namespace inode>-<PID>-<start time>``: a PID means something only in its
#: namespace, so an owner is judged only by an avmm in the same one (another's, in a
#: container sharing this cgroupfs, may be alive where this process cannot see it).
_OWNER_RE: Final = re.compile(r"pid-(\d{1,20})-(\d{1,10})-(\d{1,20})")


class CgroupError(AvmmError):
    """CPU controls were asked for and this host (or this user) cannot apply them, or a
    cgroup file could not be written. One line, saying what to change."""


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """A VM cgroup's counters: CPU time used and time throttled by its quota."""

    cpu_seconds: float
    throttled_seconds: float


def weight_to_shares(weight: int) -> int:
    """cgroup v2 ``cpu.weight`` (1..10000, default 100) → v1 ``cpu.shares`` as systemd
    converts CPUWeight= to CPUShares= (``weight * 1024 / 100``, clamped to 2..262144):
    the default weight 100 becomes the default 1024 shares and ratios are kept."""
    return max(2, min(262144, weight * 1024 // 100))


def cfs_period_us(max_percent: float) -> int:
    """The CFS period for a quota of ``max_percent``: the shortest of at least
    :data:`CFS_PERIOD_MIN_US` over which the quota is still the kernel's 1 ms or more
    (10 ms from 10 %, 20 ms at 5 %, the kernel's default 100 ms from 1 % down).

    Why short: a thread the quota throttles stops for the rest of the period, whatever
    it holds. In one avmm process (``--isolation none``) a vCPU thread handles its exits
    in Python, holding the interpreter's lock; throttled there, it stalls every VM of the
    process until the next period: up to 90 ms at 10 % over 100 ms (measured: the event
    loop of a daemon whose VM with 10 % made port I/O in a loop stood still for 90 ms,
    4 times in 5 s), at most 9 ms per throttling over 10 ms (the same loop's longest
    stall then 40 ms at 10 %, where an iteration met several, and 15 ms at 25 %). A
    shorter period also spreads a limited VM's CPU time more evenly (no 75 ms pauses for
    a guest at 25 %)."""
    if max_percent <= 0:
        raise ValueError(f"max_percent {max_percent} is not above 0")
    if max_percent <= 1:
        return CFS_PERIOD_US  # (and no division that overflows for a tiny percent)
    shortest_for_the_floor = _QUOTA_MIN_US * 100 / max_percent
    return min(CFS_PERIOD_US, max(CFS_PERIOD_MIN_US, math.ceil(shortest_for_the_floor)))


def quota_us(max_percent: float, period_us: int | None = None) -> int:
    """``cpu_max_percent`` (150 = one and a half CPUs) → microseconds of CPU time per
    ``period_us`` (default :func:`cfs_period_us`; at least the kernel's 1 ms)."""
    if period_us is None:
        period_us = cfs_period_us(max_percent)
    return max(_QUOTA_MIN_US, round(max_percent * period_us / 100))


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat from field 3 on (index 0 is field 3), None if no
    such PID."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return data[data.rindex(b")") + 2:].split()


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (the start time in clock ticks), None if no such PID."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def pid_namespace() -> int:
    """The inode of this process's PID namespace (what ``/proc/self/ns/pid`` names)."""
    return os.stat("/proc/self/ns/pid").st_ino


def owner_name(pid: int | None = None) -> str:
    """The owner cgroup's name for ``pid`` (this process by default; a PID of this
    process's PID namespace)."""
    pid = os.getpid() if pid is None else pid
    start = process_start_ticks(pid)
    if start is None:
        raise CgroupError(f"process {pid} does not exist")
    return f"pid-{pid_namespace()}-{pid}-{start}"


def parse_owner_name(name: str) -> tuple[int, int, int] | None:
    """(PID namespace inode, PID, start time) of an owner cgroup's name, or None."""
    match = _OWNER_RE.fullmatch(name)
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def owner_alive(name: str) -> bool:
    """Whether the avmm process an owner cgroup is named after still runs. A name that
    is not an owner's, or an owner in another PID namespace (whose PIDs this process
    cannot look up), counts as alive: it is not ours to remove."""
    parsed = parse_owner_name(name)
    if parsed is None:
        return True
    namespace, pid, start = parsed
    if namespace != pid_namespace():
        return True
    return process_start_ticks(pid) == start


def write_file(path: Path, value: str) -> None:
    """One write(2) of ``value``: cgroupfs takes one value (one thread id) per write."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _error(f"cannot open {path}", e) from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise _error(f"cannot write {value!r} to {path}", e) from None
    finally:
        os.close(fd)


def append_file(path: Path, value: str) -> None:
    """Like :func:`write_file` without truncating (a thread list: ``tasks``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _error(f"cannot open {path}", e) from None
    try:
        os.write(fd, (value + "\n").encode())
    except OSError as e:
        raise _error(f"cannot write {value!r} to {path}", e) from None
    finally:
        os.close(fd)


def read_text(path: Path) -> str:
    with open(path, encoding="ascii") as file:
        return file.read()


def _error(what: str, error: OSError) -> CgroupError:
    reason = os.strerror(error.errno or 0)
    hint = ""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " (CPU controls need root or a cgroup delegated to this user)"
    return CgroupError(f"{what}: {reason}{hint}")


def read_ids(path: Path) -> list[int]:
    try:
        return [int(line) for line in read_text(path).split()]
    except FileNotFoundError:
        return []


def remove_tree(path: Path, *, move_to: Path | None, thread_file: str,
                timeout_s: float = 2.0) -> None:
    """rmdir ``path`` and the cgroups below it, deepest first. Threads still inside (a
    vCPU thread that has returned but not yet exited) are moved to ``move_to`` first and
    EBUSY is retried for up to ``timeout_s``: an exiting thread leaves its cgroup a moment
    after the task that joined it saw it finish."""
    if not path.is_dir():
        return
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        remove_tree(child, move_to=move_to, thread_file=thread_file, timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        if move_to is not None:
            for tid in read_ids(path / thread_file):
                try:
                    append_file(move_to / thread_file, str(tid))
                except CgroupError:
                    pass  # exited meanwhile (ESRCH)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno == errno.ENOTEMPTY and not _is_cgroupfs(path):
                # A fake tree in a test: its control files are plain files.
                for entry in path.iterdir():
                    if entry.is_file():
                        entry.unlink()
                continue
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _error(f"cannot remove cgroup {path}", e) from None
        time.sleep(0.01)


def _is_cgroupfs(path: Path) -> bool:
    # statfs f_type would be exact; a cgroup directory always has cgroup.procs, and a
    # fake tree's (tests) is a plain file the test wrote.
    return str(path).startswith("/sys/fs/cgroup/")


class CpuBackend(Protocol):
    """One cgroup version's way of doing the same few things (module docstring)."""

    #: "v1" or "v2".
    version: str
    #: ``<root>/avmm``.
    parent: Path
    #: The file thread ids are written to.
    thread_file: str

    def prepare_owner(self, owner: str, *, workers: bool = False) -> Path: ...
    def create_vm(self, owner_dir: Path, name: str, *, workers: bool = False,
                  ) -> list[Path]: ...
    def set_limits(self, dirs: list[Path], weight: int, max_percent: float | None) -> None: ...
    def add_thread(self, dirs: list[Path], tid: int) -> None: ...
    def add_process(self, dirs: list[Path], pid: int) -> None: ...
    def holds_processes(self, owner_dir: Path, *, workers: bool) -> bool: ...
    def threads(self, dirs: list[Path]) -> list[int]: ...
    def usage(self, dirs: list[Path]) -> CpuUsage: ...
    def remove_vm(self, dirs: list[Path]) -> None: ...
    def remove_owner(self, owner_dir: Path) -> None: ...
    def owner_dirs(self) -> list[Path]: ...


class V1Backend:
    """cgroup v1: ``cpu`` (and ``cpuacct``, maybe the same directory) hierarchies."""

    version = "v1"
    thread_file = "tasks"

    def __init__(self, cpu_root: Path, cpuacct_root: Path | None = None) -> None:
        self.cpu_root = cpu_root
        self.parent = cpu_root / AVMM_DIR
        # Separate hierarchies get a twin cgroup each, holding the same threads.
        self.acct_parent = (None if cpuacct_root is None or cpuacct_root == cpu_root
                            else cpuacct_root / AVMM_DIR)
        self._co_mounted = cpuacct_root == cpu_root

    def _parents(self) -> list[Path]:
        return [self.parent] + ([self.acct_parent] if self.acct_parent is not None else [])

    def prepare_owner(self, owner: str, *, workers: bool = False) -> Path:
        # One layout for threads and for worker processes: v1 has no
        # process-granularity or no-internal-process rule.
        for parent in self._parents():
            _mkdir(parent)
            _mkdir(parent / owner)
        return self.parent / owner

    def create_vm(self, owner_dir: Path, name: str, *, workers: bool = False) -> list[Path]:
        dirs = [owner_dir / name]
        if self.acct_parent is not None:
            dirs.append(self.acct_parent / owner_dir.name / name)
        made: list[Path] = []
        try:
            for path in dirs:
                _mkdir(path)
                made.append(path)
        except CgroupError:
            _remove_quietly(made)  # a half-made VM cgroup is nobody's to clean up later
            raise
        return dirs

    def set_limits(self, dirs: list[Path], weight: int, max_percent: float | None) -> None:
        cpu = dirs[0]
        write_file(cpu / "cpu.shares", str(weight_to_shares(weight)))
        if max_percent is None:
            write_file(cpu / "cpu.cfs_quota_us", "-1")
            write_file(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            return
        # Period first: a quota is checked against the period in force. If the quota
        # is then refused (a parent's limit, say), the old period goes back: the old
        # quota over the new period would be neither limit.
        period = cpu / "cpu.cfs_period_us"
        try:
            old_period = period.read_text().strip()
        except OSError:
            old_period = None
        write_file(period, str(cfs_period_us(max_percent)))
        try:
            write_file(cpu / "cpu.cfs_quota_us", str(quota_us(max_percent)))
        except CgroupError:
            if old_period is not None:
                with contextlib.suppress(CgroupError):
                    write_file(period, old_period)
            raise

    def add_thread(self, dirs: list[Path], tid: int) -> None:
        for path in dirs:
            append_file(path / "tasks", str(tid))

    def add_process(self, dirs: list[Path], pid: int) -> None:
        for path in dirs:
            write_file(path / "cgroup.procs", str(pid))

    def holds_processes(self, owner_dir: Path, *, workers: bool) -> bool:
        return False  # the owner never holds the process: it goes with its last VM

    def threads(self, dirs: list[Path]) -> list[int]:
        return read_ids(dirs[0] / "tasks")

    def usage(self, dirs: list[Path]) -> CpuUsage:
        acct = dirs[-1] if (self.acct_parent is not None or self._co_mounted) else None
        used_ns = 0
        if acct is not None:
            try:
                used_ns = int(read_text(acct / "cpuacct.usage").strip() or 0)
            except FileNotFoundError:
                used_ns = 0
        stat = _key_values(dirs[0] / "cpu.stat")
        return CpuUsage(used_ns / 1e9, stat.get("throttled_time", 0) / 1e9)

    def remove_vm(self, dirs: list[Path]) -> None:
        for path in dirs:
            remove_tree(path, move_to=path.parent.parent.parent, thread_file="tasks")

    def remove_owner(self, owner_dir: Path) -> None:
        for parent in self._parents():
            remove_tree(parent / owner_dir.name, move_to=parent.parent, thread_file="tasks")

    def owner_dirs(self) -> list[Path]:
        found: list[Path] = []
        for parent in self._parents():
            if parent.is_dir():
                found.extend(p for p in parent.iterdir() if p.is_dir())
        return found


class V2Backend:
    """cgroup v2 with the ``cpu`` controller: a threaded subtree per avmm process, or
    with ``workers``, a domain cgroup per worker process (module docstring)."""

    version = "v2"
    thread_file = "cgroup.threads"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parent = root / AVMM_DIR

    def prepare_owner(self, owner: str, *, workers: bool = False) -> Path:
        if workers:
            return self._prepare_worker_owner(owner)
        _mkdir(self.parent)
        owner_dir = self.parent / owner
        _mkdir(owner_dir)
        # The whole process moves into its owner cgroup, the threaded domain whose
        # threaded children the VMs' vCPU threads go to (a thread can only move within
        # its process's threaded subtree). It moves first: in a delegated cgroup (its
        # own, not the root) the kernel lets a cgroup hand controllers to its children
        # only once no process is left in it.
        write_file(owner_dir / "cgroup.procs", str(os.getpid()))
        # cpu must be enabled on each level above a VM cgroup: root → avmm → owner.
        _enable_cpu(self.root)
        _enable_cpu(self.parent)
        return owner_dir

    def _prepare_worker_owner(self, owner: str) -> Path:
        _mkdir(self.parent)
        owner_dir = self.parent / owner
        _mkdir(owner_dir)
        if self.delegated():
            # <root> must hand cpu down to domain children, so it may hold no process
            # (the no-internal-process rule): this daemon's move into a leaf beside its
            # VMs. A process of someone else's stays, and enabling cpu below says so.
            daemon = owner_dir / DAEMON_DIR
            _mkdir(daemon)
            for pid in read_ids(self.root / "cgroup.procs"):
                if not _ours(pid):
                    continue
                try:
                    append_file(daemon / "cgroup.procs", str(pid))
                except CgroupError:
                    if process_start_ticks(pid) is not None:
                        raise  # not one that exited meanwhile (ESRCH)
        # cpu on each level above a VM cgroup: root → avmm → owner, none of which holds
        # a process now (a root that is the hierarchy's own may: it is exempt).
        _enable_cpu(self.root)
        _enable_cpu(self.parent)
        _enable_cpu(owner_dir)
        return owner_dir

    def delegated(self) -> bool:
        """Whether ``<root>`` is a cgroup below the hierarchy's root (delegated to this
        user or service): the hierarchy's root is the one cgroup without ``cgroup.type``."""
        return (self.root / "cgroup.type").exists()

    def create_vm(self, owner_dir: Path, name: str, *, workers: bool = False) -> list[Path]:
        path = owner_dir / name
        _mkdir(path)
        if workers:
            # A domain cgroup (the type a new cgroup has): a worker process moves in.
            return [path]
        try:
            write_file(path / "cgroup.type", "threaded")
            # Now that the owner is a threaded domain it may hold the process's other
            # threads and still hand the (threaded) cpu controller to its children.
            _enable_cpu(owner_dir)
        except CgroupError:
            _remove_quietly([path])  # a half-made VM cgroup is nobody's to clean up later
            raise
        return [path]

    def set_limits(self, dirs: list[Path], weight: int, max_percent: float | None) -> None:
        path = dirs[0]
        write_file(path / "cpu.weight", str(weight))
        if max_percent is None:
            write_file(path / "cpu.max", f"max {CFS_PERIOD_US}")
        else:
            write_file(path / "cpu.max", f"{quota_us(max_percent)} {cfs_period_us(max_percent)}")

    def add_thread(self, dirs: list[Path], tid: int) -> None:
        append_file(dirs[0] / "cgroup.threads", str(tid))

    def add_process(self, dirs: list[Path], pid: int) -> None:
        # Only into a domain cgroup (the worker layout's): all its threads move, and
        # those it starts later are born there.
        write_file(dirs[0] / "cgroup.procs", str(pid))

    def holds_processes(self, owner_dir: Path, *, workers: bool) -> bool:
        # Threaded layout: the process itself is in its owner; worker layout: only in
        # a delegated <root>, in the daemon's leaf.
        return not workers or (owner_dir / DAEMON_DIR).is_dir()

    def threads(self, dirs: list[Path]) -> list[int]:
        return read_ids(dirs[0] / "cgroup.threads")

    def usage(self, dirs: list[Path]) -> CpuUsage:
        stat = _key_values(dirs[0] / "cpu.stat")
        return CpuUsage(stat.get("usage_usec", 0) / 1e6, stat.get("throttled_usec", 0) / 1e6)

    def remove_vm(self, dirs: list[Path]) -> None:
        for path in dirs:
            # A threaded VM cgroup's lingering threads go back to their process's owner;
            # a worker's domain cgroup is removed once its process has exited (a
            # process still inside could go nowhere: the owner may hold none).
            threaded = _cgroup_type(path) == "threaded"
            remove_tree(path, move_to=path.parent if threaded else None,
                        thread_file="cgroup.threads")

    def remove_owner(self, owner_dir: Path) -> None:
        # Only a dead owner's (or, worker layout, one holding no process): a live
        # process cannot leave its cgroup empty.
        remove_tree(owner_dir, move_to=None, thread_file="cgroup.threads")

    def owner_dirs(self) -> list[Path]:
        if not self.parent.is_dir():
            return []
        return [p for p in self.parent.iterdir() if p.is_dir()]


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        pass
    except OSError as e:
        raise _error(f"cannot create cgroup {path}", e) from None


def _cgroup_type(path: Path) -> str | None:
    try:
        return read_text(path / "cgroup.type").strip()
    except OSError:
        return None


def _parent_pid(pid: int) -> int | None:
    """Field 4 of /proc/PID/stat, None if no such PID."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _ours(pid: int) -> bool:
    """Whether ``pid`` is this process or one of its descendants (the worker spawner,
    a jail's reaper, a worker without CPU controls)."""
    me = os.getpid()
    seen = 0
    while seen < 64:  # a chain that deep is not one avmm made
        if pid == me:
            return True
        if pid <= 1:
            return False
        parent = _parent_pid(pid)
        if parent is None:
            return False
        pid, seen = parent, seen + 1
    return False


def _enable_cpu(path: Path) -> None:
    control = path / "cgroup.subtree_control"
    try:
        enabled = read_text(control).split()
    except FileNotFoundError:
        enabled = []
    if "cpu" not in enabled:
        write_file(control, "+cpu")


def _key_values(path: Path) -> dict[str, int]:
    try:
        text = read_text(path)
    except FileNotFoundError:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


# --------------------------------------------------------------------------- detection


def _mounts(mounts_file: Path) -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) from /proc/self/mounts."""
    found = []
    for line in read_text(mounts_file).splitlines():
        fields = line.split()
        if len(fields) >= 4:
            point = fields[1].replace("\\040", " ")
            found.append((point, fields[2], fields[3].split(",")))
    return found


def _own_v2_cgroup(cgroup_file: Path) -> str | None:
    for line in read_text(cgroup_file).splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def detect_backend(*, mounts_file: Path = Path("/proc/self/mounts"),
                   cgroup_file: Path = Path("/proc/self/cgroup"),
                   ) -> CpuBackend | str:
    """The backend this process can use, or one line saying why none can.

    cgroup v2 wins where its ``cpu`` controller is available: at the mount's root as
    root, or in a cgroup delegated to this user (systemd ``Delegate=yes``); else cgroup
    v1's ``cpu`` hierarchy, as root.
    """
    try:
        mounts = _mounts(mounts_file)
    except OSError as e:
        return f"cannot read {mounts_file}: {os.strerror(e.errno or 0)}"
    reasons: list[str] = []
    for point, fstype, _options in mounts:
        if fstype != "cgroup2":
            continue
        root = Path(point)
        try:
            controllers = read_text(root / "cgroup.controllers").split()
        except OSError:
            continue
        if "cpu" not in controllers:
            reasons.append(f"cgroup v2 at {point} has no cpu controller "
                           "(it is bound to cgroup v1)")
            continue
        if os.access(root / "cgroup.subtree_control", os.W_OK) and os.access(root, os.W_OK):
            return V2Backend(root)
        own = _own_v2_cgroup(cgroup_file)
        delegated = root / own.lstrip("/") if own else None
        if (delegated is not None and own != "/"
                and os.access(delegated / "cgroup.subtree_control", os.W_OK)
                and os.access(delegated, os.W_OK)):
            return V2Backend(delegated)
        reasons.append(f"cgroup v2 at {point} is not writable by this user and no "
                       "cgroup is delegated to it (run as root, or under systemd with "
                       "Delegate=yes)")
    cpu_root: Path | None = None
    acct_root: Path | None = None
    for point, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        if "cpu" in options and cpu_root is None:
            cpu_root = Path(point)
        if "cpuacct" in options and acct_root is None:
            acct_root = Path(point)
    if cpu_root is not None:
        if os.access(cpu_root, os.W_OK):
            return V1Backend(cpu_root, acct_root)
        reasons.append(f"cgroup v1's cpu hierarchy at {cpu_root} is writable only by root")
    if not reasons:
        reasons.append("no cgroup cpu controller is mounted")
    return "; ".join(reasons)


def _remove_quietly(paths: list[Path]) -> None:
    """rmdir each of ``paths`` (empty cgroups), last made first, ignoring failures: used
    on a failure path, whose own error is the one to report."""
    for path in reversed(paths):
        with contextlib.suppress(OSError):
            os.rmdir(path)
