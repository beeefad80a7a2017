"""The daemon's side of a VM in a jailed worker process (``avmm serve --isolation
process``): :class:`WorkerVm` behaves as :class:`avmm.host.HostedVm` does for the
management API, and does it by talking to :mod:`avmm.isolation.worker` over the private
channel.

What the worker says is untrusted: it runs the guest's device models, so a guest that
took it over speaks through it. Everything it sends is checked for type and size, the
daemon's own facts (the VM's id, its isolation, its worker's PID) are never taken from
it, and a worker that breaks the protocol is killed (its VM ends as a crash). A worker
that dies (SIGKILL, SIGSYS from its seccomp filter, a crash of Python) ends its VM with
reason ``crash`` and the cause in the detail; the daemon and the other VMs go on.

What the jail keeps from the worker is brought by the daemon: CPU controls (it owns the
VM's cgroup), a restore's snapshot (its directory's fd, closed before the guest runs), a
migration's connection (a connected or listening socket; for an incoming VM given no
config, the connection the daemon accepted and the stream's header and CONFIG frame it
read to plan the jail, which the worker reads again), a snapshot's two files (the
daemon makes the directory and the files, the worker only writes into them: a directory
fd would let a process walk out of its jail), the serial/console output file and the
console socket (opened and bound here through the path policy with none mode's checks,
their fds handed over; the daemon removes the socket's file when the worker ends, as a
VM of none mode does when it stops), the NICs' taps (opened here, each in its network
namespace, as none mode opens them: the jail has no /dev/net/tun, the worker neither
CAP_NET_ADMIN nor a network namespace of the taps'), the daemon-wide rate-limit groups
the VM's devices name (a descriptor of each group's shared memory, see
:mod:`avmm.ratelimit._shared`: the worker's devices and every other VM's in the group
take from the same buckets).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import itertools
import os
import re
import signal
import stat
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from ..cgroups import CgroupError, CpuLimits, CpuUsage, VmCpu, limits_from_machine
from ..cgroups.backend import owner_name
from ..cgroups.vm_cpu import DEFAULT_WEIGHT
from ..config import VmConfig
from ..cpu_profile import resolve_cpu_profile
from ..errors import AvmmError, ConfigError, VmStartError, VmStateError
from ..host import ConsoleHub, ConsoleSubscription, config_to_dict, cpu_change
from ..lifecycle import HOST_FAILURE_STATUS, DeviceMetrics, StopReason, VmExit, VmMetrics, VmState
from ..migration.errors import MigrationError
from ..migration.progress import MigrationProgress, MigrationState
from ..paths import BoundSocket, NewPath, PathPolicy
from ..ratelimit import SharedGroups
from ..state import PartialSnapshot, SnapshotError, SnapshotInfo
from ..state.vm_state import SNAPSHOT_SECTIONS
from ..vm import (
    CONSOLE_STEP,
    SERIAL_STEP,
    OpenedSnapshot,
    open_snapshot,
    open_tap,
    step_failed,
    tap_step,
)
from .channel import Channel, ChannelClosed, ChannelError, close_fds, socketpair
from .jail import (
    JailError,
    JailSpec,
    UidAllocator,
    file_size_limit,
    plan_jail,
    prepare_jail_dir,
    remove_jail,
    runtime_binds,
)
from .seccomp import SeccompMode
from .spawner import WORKER_MODULE, Spawner, SpawnerError

log = structlog.get_logger(__name__)

#: How long a worker may take from its start to a running VM (imports, jail, build).
START_TIMEOUT_S = 60.0
#: How long a worker asked to stop may take before it is killed.
STOP_TIMEOUT_S = 30.0
#: How long a request may wait for the worker's answer before the worker is taken to be
#: broken (killed; its VM a crash).
CALL_TIMEOUT_S = 30.0
#: A snapshot's write in the worker may take this long, plus
#: :data:`SNAPSHOT_TIMEOUT_S_PER_64_MIB` for each 64 MiB of guest RAM (see
#: :func:`snapshot_timeout_s`); past it the snapshot fails and the worker is left alone.
SNAPSHOT_TIMEOUT_BASE_S = 30.0
SNAPSHOT_TIMEOUT_S_PER_64_MIB = 1.0
#: GET and /metrics wait this long for a worker's fresh status, then show the last one.
REFRESH_TIMEOUT_S = 1.0
#: What the daemon shows of a worker's migration (the worker's own report): the engine's
#: progress fields and states, nothing else.
MIGRATION_KEYS = frozenset(field.name for field in dataclasses.fields(MigrationProgress))
MIGRATION_STATES = frozenset(typing.get_args(MigrationState))
#: A migration out of a worker that ``migrate`` waits for ends within this, or counts
#: as failed (the worker's report is all the daemon has).
MIGRATE_WAIT_S = 3600.0
#: The most files and directories of its own a VM in a worker is given (its bind fds
#: travel in the start message).
MAX_BIND_FDS = 56
#: A worker's log line is cut to this many characters on the daemon's stderr.
LOG_LINE_MAX = 4000


@dataclasses.dataclass
class ProcessIsolation:
    """``avmm serve --isolation process`` and its jail settings: one fixed uid/gid for
    every worker, or one per VM from ``uids`` (uid = gid)."""

    jail_root: str = "/srv/avmm/jail"
    uid: int | None = None
    gid: int | None = None
    uids: UidAllocator | None = None
    seccomp: SeccompMode = SeccompMode.KILL
    log_level: str = "warning"
    log_format: str = "console"
    #: Workers forked from the spawner, which has the VMM's modules loaded (start-up in
    #: tens of ms; they share its address-space layout), or each a fresh interpreter.
    fork_workers: bool = True
    #: The worker program (tests give another; see avmm.isolation.spawner).
    worker_module: str = WORKER_MODULE
    module_path: str | None = None
    #: Started by the Host that uses these settings (see avmm.isolation.spawner).
    spawner: Spawner | None = None
    #: Each worker's RLIMIT_FSIZE, bytes; None: from its VM (see
    #: avmm.isolation.jail.file_size_limit). Tests force a small one.
    max_file_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.uids is None and (self.uid is None or self.gid is None):
            raise JailError("process isolation needs --jail-uid and --jail-gid, or "
                            "--jail-uid-range")

    async def take_ids(self) -> tuple[int, int]:
        if self.uids is not None:
            # In a thread: each id is looked up through NSS as it is handed out (a
            # directory service may take its time; see UidAllocator). By the spawner,
            # when there is one: the daemon's seccomp filter is made for avmm's own
            # calls, not for whatever NSS module the host configures (sssd, LDAP,
            # systemd's userdb: readlinkat, prctl, ... would kill the daemon).
            spawner = self.spawner
            lookup = None
            if self.uids.looks_up and spawner is not None:
                def lookup(number: int) -> bool:
                    return trio.from_thread.run(spawner.names_id, number)
            uid = await trio.to_thread.run_sync(self.uids.allocate, lookup)
            return uid, uid
        assert self.uid is not None and self.gid is not None
        return self.uid, self.gid

    def give_back_ids(self, uid: int) -> None:
        if self.uids is not None:
            self.uids.release(uid)


class _RemoteConfigError(ConfigError):
    """A ConfigError the worker raised: its line as it was (not prefixed again)."""

    def __init__(self, message: str, key: str | None) -> None:
        AvmmError.__init__(self, message)
        self.path = None
        self.key = key
        self.reason = message


class _RemoteStartError(VmStartError):
    def __init__(self, message: str, step: str, bad_input: bool) -> None:
        AvmmError.__init__(self, message)
        self.vm = ""
        self.step = step
        self.error = _RemoteConfigError(message, None) if bad_input else None


def remote_error(payload: object) -> AvmmError:
    """The worker's error as the daemon raises it (the API maps the type to a status)."""
    if not isinstance(payload, dict):
        return AvmmError("the VM's worker answered with a malformed error")
    kind = payload.get("type")
    message = str(payload.get("message", ""))[:2000] or "the VM's worker failed"
    key = payload.get("key") if isinstance(payload.get("key"), str) else None
    if kind == "VmStateError":
        return VmStateError(message)
    if kind in ("ConfigError", "HostFileError", "PathNotAllowedError", "HttpError"):
        return _RemoteConfigError(message, key)
    if kind == "VmStartError":
        step = payload.get("step")
        return _RemoteStartError(message, step if isinstance(step, str) else "starting",
                                 payload.get("bad_input") is True)
    if kind == "LimitTargetError":
        from ..ratelimit import LimitTargetError

        status = payload.get("status")
        return LimitTargetError(message, key=key or "",
                                status=status if status in (400, 404) else 400)
    if kind == "CgroupError":
        from ..cgroups.backend import CgroupError

        return CgroupError(message)
    if kind in ("SnapshotError", "StateCompatibilityError"):
        return SnapshotError(message)
    return AvmmError(message)


def snapshot_timeout_s(memory_mib: int) -> float:
    """How long a worker may take to write a snapshot of a guest with ``memory_mib``
    MiB of RAM (it reads and writes all of it, where the guest touched it)."""
    return SNAPSHOT_TIMEOUT_BASE_S + memory_mib / 64 * SNAPSHOT_TIMEOUT_S_PER_64_MIB


class WorkerVm:
    """One VM in a worker process (see the module docstring); made by
    :meth:`avmm.host.Host.create` when the host has process isolation."""

    isolation = "process"

    def __init__(self, vm_id: str, config: VmConfig | None, *, start: bool,
                 paths: PathPolicy | None, isolation: ProcessIsolation,
                 restore: RestoreRequest | None = None,
                 incoming: IncomingRequest | None = None,
                 rate_limit_groups: SharedGroups | None = None) -> None:
        self.id = vm_id
        self.name = vm_id
        self.created_at = time.time()
        self._group_fds: dict[str, int] = {}
        #: None only for an incoming VM given no config, until the daemon has read the
        #: stream's (see _take_source).
        self._config: VmConfig | None = None
        self._cpu = VmCpu(vm_id, CpuLimits(), worker=True)
        self._incoming = incoming
        if config is not None:
            self._configure(config)
        elif incoming is None or not incoming.streamed:
            raise VmStateError("a VM in a worker needs a config")
        self._start = start
        self._restore = restore
        self._incoming = incoming
        self._paths = paths
        self._isolation = isolation
        #: The output file, console socket and taps the daemon opened for the worker, by
        #: config key (see _open_outputs); once handed over, only the console socket
        #: stays (its file is removed when the worker has ended).
        self._outputs: dict[str, int | BoundSocket] = {}
        self._status: dict[str, Any] | None = None
        self._console = ConsoleHub()
        self._channel: Channel | None = None
        #: The process the spawner started (the jail's reaper) and the jailed worker
        #: under it, as this host numbers them.
        self._reaper: int | None = None
        self._pid: int | None = None
        #: The read end of the worker's stderr (see _relay_log).
        self._log_fd: int | None = None
        #: Held while a PID of the worker's is written anywhere (its cgroup): the
        #: spawner keeps the worker's processes unreaped, their PIDs theirs, until
        #: _reap lets them go under it (``_pids_held`` false from then on).
        self._pid_lock = trio.Lock()
        self._pids_held = True
        #: The worker's uid and gid while it runs.
        self._ids: tuple[int, int] | None = None
        #: The worker's thread ids: its PID namespace's → the host's (see refresh).
        self._host_tids: dict[int, int] = {}
        self._requests = itertools.count(1)
        #: The last request id handed out: an answer to an earlier one that is no
        #: longer pending (given up on: timed out, cancelled) is dropped, not taken for
        #: a broken protocol; nothing is kept per request given up on.
        self._last_request = 0
        self._pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        #: A snapshot is being written: resume and a second snapshot are refused.
        self._snapshotting = False
        self._tasks: trio.Nursery | None = None
        self._stop_requested: str | None = None
        self._stopping = False
        self._exit: VmExit | None = None
        self._done = trio.Event()
        #: Set once the worker has said how its VM ended, or has died.
        self._ended = trio.Event()
        #: An incoming VM given no config, until its worker runs: the daemon's wait for
        #: the source and its config (cancelled by a stop), and its migration as the
        #: API shows it meanwhile.
        self._waiting = trio.CancelScope()
        self._local_migration: dict[str, Any] | None = None
        if incoming is not None and incoming.streamed:
            self._local_migration = MigrationProgress(
                state="incoming", address=str(incoming.listener.address)).as_dict()
        #: The worker has started its VM (see _run).
        self._worker_started = False
        self._log = log.bind(vm=vm_id)
        #: A descriptor of each daemon-wide group the VM names, taken now, last (nothing
        #: after it may fail; a group deleted before the worker starts stays the VM's,
        #: as in none mode); handed over and closed in _spawn, or closed in _run.
        self._group_fds = ({} if config is None
                           else _daemon_group_fds(config, rate_limit_groups))

    def _configure(self, config: VmConfig) -> None:
        """Take ``config`` as the VM's: given, or read from an incoming stream by the
        daemon. Its jail is planned from it.

        :raises ConfigError: a streamed config names a daemon-wide rate-limit group.
        """
        if self._config is None and self._incoming is not None and self._incoming.streamed:
            _refuse_daemon_groups(config)
        if config.machine.cpu_profile == "auto":
            # Resolved here: the worker's jail has no /sys to tell it (the config shown
            # is the one the VM runs with).
            machine = dataclasses.replace(config.machine,
                                          cpu_profile=resolve_cpu_profile("auto"))
            config = dataclasses.replace(config, machine=machine)
        self._config = config
        self.name = config.name or self.id
        # The daemon applies the CPU controls (the worker's jail holds no cgroup tree):
        # the worker builds its VM without them.
        self._cpu = VmCpu(self.id, limits_from_machine(config.machine), worker=True)

    @property
    def _known_config(self) -> VmConfig:
        if self._config is None:
            raise VmStateError(f"VM {self.id!r} has no config yet (its migration stream "
                               "has not brought it)")
        return self._config

    def __repr__(self) -> str:
        return f"<WorkerVm {self.id} {self.name!r} {self.state.value}>"

    @classmethod
    async def restoring(cls, vm_id: str, path: str | os.PathLike[str], *, start: bool,
                        copy_memory: bool, vhost_user: dict[str, str], paths: PathPolicy,
                        adjust_config: Callable[[VmConfig], VmConfig] | None,
                        isolation: ProcessIsolation) -> WorkerVm:
        """A VM to restore from the snapshot directory ``path`` in a worker (see
        :meth:`avmm.host.Host.restore`): the daemon opens and checks the snapshot
        (paths through ``paths``), plans the jail from the config it holds, and hands
        the directory's fd to the worker, whose jail does not hold it.

        :raises SnapshotError, PathNotAllowedError, ConfigError: as Host.restore.
        """
        def check() -> OpenedSnapshot:
            for name, socket_path in vhost_user.items():
                paths.check(Path(socket_path), f"vhost_user.{name}", "socket")
            return open_snapshot(Path(path), paths, vhost_user or None)

        opened = await trio.to_thread.run_sync(check)
        opened.snapshot.close()  # the worker opens the memory file itself
        try:
            config = opened.config
            if adjust_config is not None:
                config = adjust_config(config)
            return cls(vm_id, config, start=start, paths=paths, isolation=isolation,
                       restore=RestoreRequest(os.fspath(path), opened.dirfd, copy_memory,
                                              dict(vhost_user)))
        except BaseException:
            os.close(opened.dirfd)
            raise

    @classmethod
    async def receiving(cls, vm_id: str, listen: str, *, config: VmConfig | None,
                        start: bool, paths: PathPolicy, accept_timeout_s: float | None,
                        isolation: ProcessIsolation) -> WorkerVm:
        """A VM that comes in by live migration into a worker (see
        :meth:`avmm.host.Host.receive`); the daemon listens (``unix:`` through
        ``paths``). Its jail is planned from its config: given ``config``, the daemon
        hands the listening socket to the worker at once. Without one, the VM is
        ``incoming`` while the daemon itself accepts the source and reads the stream's
        header and CONFIG frame (see :meth:`_take_source`), then plans the jail from
        that config and hands the worker the connection and the bytes it read, which
        the worker's destination reads again first (the stream's SHA-256 covers them).

        :raises ConfigError: ``config`` names what a worker cannot have (400).
        :raises MigrationError: ``listen`` cannot be listened on.
        """
        from ..migration.transport import listen as listen_on
        from ..migration.transport import parse_address

        address = parse_address(listen, listen=True)
        listener = await trio.to_thread.run_sync(lambda: listen_on(
            address, paths, accept_timeout_s=accept_timeout_s))
        try:
            return cls(vm_id, config, start=start, paths=paths, isolation=isolation,
                       incoming=IncomingRequest(listen, listener, accept_timeout_s,
                                                streamed=config is None))
        except BaseException:
            listener.close()
            raise

    # -- what HostedVm shows --------------------------------------------------------------

    @property
    def config(self) -> VmConfig | None:
        """The VM's config (None while an incoming VM given none waits for its stream's)."""
        return self._config

    @property
    def pid(self) -> int | None:
        """The worker's PID (as this host sees it), once it runs."""
        return self._pid

    @property
    def state(self) -> VmState:
        if self._done.is_set():
            return VmState.STOPPED
        if self._status is None:
            # An incoming VM given no config is incoming until its worker says otherwise.
            return VmState.STARTING if self._local_migration is None else VmState.INCOMING
        state = VmState(self._status["vm"]["state"])
        # Ended in the worker, but not yet here (its process is being reaped): as
        # HostedVm, "stopped" is shown only with the exit.
        return VmState.STOPPING if state is VmState.STOPPED else state

    @property
    def exit(self) -> VmExit | None:
        return self._exit if self._done.is_set() else None

    @property
    def uptime_s(self) -> float | None:
        value = None if self._status is None else self._status["vm"].get("uptime_s")
        return float(value) if isinstance(value, int | float) else None

    @property
    def migration(self) -> dict[str, Any] | None:
        """The worker's report of its VM's latest migration (checked, see
        :func:`sanitize_status`), or None; the daemon's own while an incoming VM given no
        config has no worker yet."""
        if self._status is None:
            return self._local_migration
        return self._status["vm"].get("migration")

    @property
    def migrating(self) -> bool:
        migration = self.migration
        return migration is not None and migration.get("state") not in (
            "completed", "failed", "unconfirmed", None) and not self._done.is_set()

    def metrics(self) -> VmMetrics:
        if self._status is None:
            return VmMetrics(state=self.state, vcpu_exits={}, devices={})
        metrics = self._status["metrics"]
        return VmMetrics(state=self.state, vcpu_exits=dict(metrics["vcpu_exits"]),
                         devices={name: DeviceMetrics(**counters)
                                  for name, counters in metrics["devices"].items()})

    def rate_limit_waits(self) -> list[tuple[str, str, float]]:
        if self._status is None:
            return []
        return [(device, kind, float(seconds))
                for device, kind, seconds in self._status["rate_limit_waits"]]

    def to_dict(self) -> dict[str, Any]:
        """The API's view: the daemon's own facts (id, name, config, CPU controls, PID)
        and what only the worker knows, as :func:`sanitize_status` kept it."""
        known = self._status["vm"] if self._status is not None else {}
        result = self.exit
        config = None if self._config is None else config_to_dict(self._config)
        limits = self._cpu.limits  # as in force (PATCH /vms/{id} changes them here)
        if config is not None:
            machine = {key: value for key, value in config["machine"].items()
                       if key not in ("cpu_weight", "cpu_max_percent", "cpu_affinity",
                                      "vcpu_affinity")}
            config["machine"] = {**machine, **_without_none({
                "cpu_weight": limits.weight, "cpu_max_percent": limits.max_percent,
                "cpu_affinity": None if limits.affinity is None else list(limits.affinity),
                "vcpu_affinity": None if limits.vcpu_affinity is None
                else [list(cpus) for cpus in limits.vcpu_affinity]})}
        threads = known.get("vcpu_threads", [])
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "isolation": self.isolation,
            "pid": self._pid,
            "created_at": self.created_at,
            "uptime_s": known.get("uptime_s"),
            "exit": None if result is None else {
                "reason": result.reason.value, "exit_status": result.exit_status,
                "detail": result.detail},
            "config": config,
            "migration": self.migration,
            # The worker numbers its threads in its own PID namespace: the host's here.
            "vcpu_threads": [self._host_tids[tid] for tid in threads
                             if tid in self._host_tids] if result is None else [],
            "cpu": self._cpu.describe(),
            "rate_limits": known.get("rate_limits"),
        }

    def console_backlog(self) -> bytes:
        return self._console.backlog()

    def subscribe_console(self) -> ConsoleSubscription:
        return self._console.subscribe()

    # -- operations -----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Ask the worker for its status now (GET shows it as it is)."""
        if self._live():
            # A worker that ends meanwhile (or does not answer): what is known stands.
            with trio.move_on_after(REFRESH_TIMEOUT_S), contextlib.suppress(AvmmError):
                await self._call("describe")
            # Under the lock: _reap may let the PID go meanwhile, and a reused PID's
            # threads are not this VM's.
            async with self._pid_lock:
                if self._pid is not None and self._pids_held:
                    self._host_tids = await trio.to_thread.run_sync(_host_thread_ids,
                                                                    self._pid)
        await trio.lowlevel.checkpoint()

    async def pause(self) -> None:
        await self._call("pause")

    async def resume(self) -> None:
        if self._snapshotting:
            raise VmStateError(f"VM {self.id!r} is being snapshotted; resume it once the "
                               "snapshot is written")
        await self._call("resume")

    async def send_console(self, data: bytes) -> None:
        if not self._live():
            raise VmStateError(f"VM {self.id!r} is {self.state.value}; its console takes "
                               "no input")
        for start in range(0, len(data), 64 * 1024):
            piece = data[start:start + 64 * 1024]
            await self._call("console_input", data=base64.b64encode(piece).decode())

    async def update_limits(self, update: Any) -> None:
        """PATCH /vms/{id}: the CPU controls here (the daemon owns the VM's cgroup), the
        rate limits in the worker; every change checked before any is made."""
        if self.state in (VmState.STARTING, VmState.STOPPING, VmState.STOPPED):
            raise VmStateError(f"VM {self.id!r} is {self.state.value}; its limits can be "
                               "changed while it exists and runs (or is paused)")
        cpu = None if update.machine is None else cpu_change(update.machine)
        source = {key: value for key, value in (update.source or {}).items()
                  if key != "machine"}
        before = self._cpu.limits
        if cpu:
            # First, as in none mode: the one change the host can still refuse.
            await self.set_cpu_limits(**cpu)
        if source:
            try:
                # The worker checks every device change before it makes any.
                await self._call("update_limits", limits=source)
            except AvmmError:
                if cpu:  # nothing changed, then: the CPU limits as they were
                    await self.set_cpu_limits(weight=before.weight or DEFAULT_WEIGHT,
                                              max_percent=before.max_percent,
                                              clear_max_percent=before.max_percent is None)
                raise

    async def cpu_usage(self) -> CpuUsage | None:
        """CPU time of the VM (its cgroup's, or its vCPU threads')."""
        tids = self.to_dict()["vcpu_threads"]
        return await trio.to_thread.run_sync(lambda: self._cpu.usage(tids))

    async def set_cpu_limits(self, *, weight: int | None = None,
                             max_percent: float | None = None,
                             clear_max_percent: bool = False) -> CpuLimits:
        def change(pid: int) -> CpuLimits:
            limits = self._cpu.update(weight=weight, max_percent=max_percent,
                                      clear_max=clear_max_percent)
            self._cpu.place_process(pid)  # a cgroup made just now
            return limits

        async with self._pid_lock:
            # Under the lock, with the PID still held by the spawner: it names the
            # worker, alive or a zombie, never a process that took its number since.
            if not self._live() or self._pid is None or not self._pids_held:
                raise VmStateError(f"VM {self.id!r} is {self.state.value}")
            return await trio.to_thread.run_sync(change, self._pid)

    async def snapshot(self, path: str | os.PathLike[str], *,
                       paths: PathPolicy | None = None) -> SnapshotInfo:
        """As :meth:`avmm.host.HostedVm.snapshot`, without ever handing the worker a
        directory (openat with ".." would walk out of its jail): the daemon checks
        ``path`` through ``paths``, makes the temporary directory and the two files in
        it (:class:`~avmm.state.PartialSnapshot`) and hands the worker the two open
        files only; the worker's VM writes into them; the daemon then fsyncs them and
        renames the directory into place. On any failure (the worker's error, its
        death, :func:`snapshot_timeout_s` passed, a cancellation) the directory and its
        files are removed; the VM stays paused (a worker that is late is left alone).

        :raises VmStateError: the VM is not paused, is being migrated, or another
            snapshot of it is being written.
        :raises PathNotAllowedError: ``path`` lies outside the allowed directories.
        :raises HostFileError: its parent cannot be used, or ``path`` exists.
        :raises SnapshotError: the snapshot could not be written (nothing is left).
        """
        self._check_snapshot_state()
        policy = paths if paths is not None else PathPolicy()
        target: NewPath = await trio.to_thread.run_sync(policy.new_path, Path(path), "path")
        try:
            # Checked again: the VM may have been resumed while the path was looked at.
            self._check_snapshot_state()
            self._snapshotting = True
            try:
                return await self._snapshot_into_worker(target)
            finally:
                self._snapshotting = False
        finally:
            target.close()

    def _check_snapshot_state(self) -> None:
        if self.migrating:
            raise VmStateError(f"VM {self.id!r} is being migrated; snapshot it once the "
                               "migration has ended")
        if self._snapshotting:
            raise VmStateError(f"VM {self.id!r} is already being snapshotted")
        state = self.state
        if state is not VmState.PAUSED:
            raise VmStateError(f"VM {self.id!r} is {state.value}; pause it before taking "
                               "a snapshot")

    async def _snapshot_into_worker(self, target: NewPath) -> SnapshotInfo:
        started = time.monotonic()
        directory = Path(os.path.abspath(target.path))
        # In the directory new_path opened (its fd), whatever happens to the path.
        partial = await trio.to_thread.run_sync(_begin_snapshot, directory, target.dirfd)
        try:
            files = partial.files
            assert files is not None
            memory_mib = self._known_config.machine.memory_mib
            limit = snapshot_timeout_s(memory_mib)
            try:
                result = await self._call(
                    "snapshot", fds=(files.state_fd, files.memory_fd), path=str(directory),
                    timeout_s=limit, late=lambda: SnapshotError(
                        f"{directory}: the VM's worker did not write the snapshot within "
                        f"{limit:g} s; nothing was kept"))
            except VmStateError:
                if self._live() and not self._ended.is_set():
                    raise  # the worker's own answer (say, it is no longer paused)
                raise SnapshotError(f"{directory}: the VM's worker ended before the "
                                    "snapshot was written; nothing was kept") from None
            if _snapshot_bytes(result, memory_mib) is None:
                raise SnapshotError(f"{directory}: the VM's worker answered the snapshot "
                                    "request with nonsense; nothing was kept")
            bytes_state, bytes_memory = await trio.to_thread.run_sync(
                _commit_snapshot, partial, memory_mib << 20,
                limiter=_snapshot_copies())
        finally:
            # Removed unless it was renamed into place (also when cancelled: shielded).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial.__exit__, None, None, None)
        info = SnapshotInfo(path=directory, bytes_state=bytes_state,
                            bytes_memory=bytes_memory, duration_s=time.monotonic() - started)
        self._log.info("vm snapshotted", path=str(directory), bytes_state=bytes_state,
                       bytes_memory=bytes_memory, duration_ms=round(info.duration_s * 1000, 1))
        return info

    async def start_migration(self, to: str, *, downtime_ms: int = 300,
                              paths: PathPolicy | None = None) -> None:
        """As :meth:`avmm.host.HostedVm.start_migration`. The worker makes no IP
        sockets (its filter) and its jail holds no destination's socket: the daemon
        connects (``unix:`` through ``paths``) and hands the connection over; the
        worker's VM migrates over it and, once handed over, stops (``migrated``).

        :raises VmStateError: the VM is not running (or already migrating).
        :raises MigrationError: ``to`` is malformed, or cannot be connected to.
        """
        from ..migration.transport import connect, parse_address

        if self.state is not VmState.RUNNING or self.migrating:
            raise VmStateError(f"VM {self.id!r} is {self.state.value}"
                               f"{' and migrating' if self.migrating else ''}; only a "
                               "running VM can be migrated")
        address = parse_address(to)
        with trio.fail_after(30):
            stream = await connect(address, paths)
        try:
            await self._call("migrate", fds=(stream.socket.fileno(),), to=to,
                             downtime_ms=downtime_ms)
        finally:
            await stream.aclose()  # the worker has its own copy

    async def migrate(self, to: str, *, downtime_ms: int = 300,
                      paths: PathPolicy | None = None) -> dict[str, Any]:
        await self.start_migration(to, downtime_ms=downtime_ms, paths=paths)
        with trio.move_on_after(MIGRATE_WAIT_S):
            while self.migrating:
                await trio.sleep(0.05)
                await self.refresh()
        result = self.migration
        if result is None or result.get("state") == "failed":
            raise MigrationError(f"VM {self.id!r}: migration to {to} failed: "
                                 f"{(result or {}).get('error')}")
        return result

    def request_stop(self, detail: str = "stopped by the host") -> None:
        if self._done.is_set() or self._stopping:
            return
        if self._tasks is None:
            self._stop_requested = detail
            self._waiting.cancel()  # an incoming VM whose source has not come (yet)
            return
        self._stopping = True
        self._tasks.start_soon(self._stop, detail)

    async def stop(self, detail: str = "stopped by the host") -> VmExit:
        self.request_stop(detail)
        return await self.wait()

    async def wait(self) -> VmExit:
        await self._done.wait()
        assert self._exit is not None
        return self._exit

    # -- the channel ------------------------------------------------------------------------

    def _live(self) -> bool:
        return self._channel is not None and not self._done.is_set()

    async def _call(self, op: str, *, fds: tuple[int, ...] = (),
                    timeout_s: float = CALL_TIMEOUT_S,
                    late: Callable[[], AvmmError] | None = None, **fields: Any) -> Any:
        """Request ``op`` and wait for its answer; its result (the VM's status) updates
        what this VM shows. No answer within ``timeout_s``: the worker is killed, or,
        given ``late``, left alone and ``late()`` raised (its answer, if it comes, is
        dropped)."""
        if not self._live():
            raise VmStateError(f"VM {self.id!r} is {self.state.value}")
        assert self._channel is not None
        request_id = self._last_request = next(self._requests)
        done = trio.Event()
        slot: list[Any] = []
        self._pending[request_id] = (done, slot)
        limit = timeout_s
        try:
            await self._channel.send({"id": request_id, "op": op, **fields}, fds)
            with trio.move_on_after(limit) as waited:
                await done.wait()
        except ChannelError:
            raise VmStateError(f"VM {self.id!r}: its worker has ended") from None
        finally:
            self._pending.pop(request_id, None)
        if waited.cancelled_caught:
            if late is not None:
                self._log.warning("the worker did not answer in time", op=op,
                                  timeout_s=limit)
                raise late()
            self._log.warning("the worker did not answer in time; killing it", op=op)
            await self._kill()
            raise VmStateError(f"VM {self.id!r}: its worker did not answer {op} within "
                               f"{limit:g} s and was stopped")
        if not slot:
            raise VmStateError(f"VM {self.id!r}: its worker ended before it answered")
        reply = slot[0]
        if "error" in reply:
            raise remote_error(reply["error"])
        result = reply.get("result")
        try:
            self._take_status(result)
        except (ChannelError, KeyError, TypeError) as e:
            await self._kill()  # a worker that answers nonsense is not trusted further
            raise VmStateError(f"VM {self.id!r}: its worker broke the protocol") from e
        return result

    async def _stop(self, detail: str) -> None:
        with trio.move_on_after(STOP_TIMEOUT_S):
            with contextlib.suppress(AvmmError):  # it may have ended meanwhile
                await self._call("stop", detail=detail)
            await self._ended.wait()
            return
        self._log.warning("the worker did not stop in time; killing it")
        await self._kill()

    def _release_cpu(self) -> None:
        try:
            self._cpu.release()
        except (CgroupError, OSError) as e:
            self._log.warning("could not remove the VM's cgroup", reason=str(e))

    async def _kill(self) -> None:
        # The reaper, the spawner's own child (signalled through its pidfd, never by a
        # number that may have been reused): the jailed worker dies with it (its
        # parent-death signal), and with that everything in its PID namespace.
        spawner = self._isolation.spawner
        with trio.CancelScope(shield=True):
            if self._reaper is not None and spawner is not None:
                await spawner.kill(self._reaper)

    def _take_status(self, status: object) -> None:
        """A status from the worker, checked and cut down before it is believed (see
        :func:`sanitize_status`)."""
        if status is None:
            return
        try:
            self._status = sanitize_status(status)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ChannelError(f"the worker sent a malformed status ({str(e)[:200]})"
                               ) from None

    def _event(self, message: dict[str, Any]) -> None:
        if "id" in message:
            entry = self._pending.get(message["id"]) \
                if isinstance(message["id"], int) else None
            if entry is None:
                if isinstance(message["id"], int) and 0 < message["id"] <= \
                        self._last_request:
                    return  # a request given up on: its late answer is dropped
                raise ChannelError("the worker answered a request nobody made")
            done, slot = entry
            slot.append(message)
            done.set()
            return
        event = message.get("event")
        if event == "console":
            data = message.get("data")
            if not isinstance(data, str):
                raise ChannelError("a console event without data")
            try:
                self._console.feed(base64.b64decode(data, validate=True))
            except binascii.Error:
                raise ChannelError("a console event that is not base64") from None
        elif event in ("status", "exited"):
            self._take_status(message.get("status"))
            if event == "exited":
                self._exit = self._exit_from_status()
        else:
            raise ChannelError(f"an unknown event {str(event)[:40]!r} from the worker")

    def _exit_from_status(self) -> VmExit:
        assert self._status is not None
        data = self._status["vm"].get("exit")
        if data is None:
            raise ChannelError("the worker's final status has no exit")
        return VmExit(StopReason(data["reason"]), data["exit_status"], data["detail"])

    # -- the task that owns the worker ------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                   ) -> None:
        """Start the worker, wait until its VM runs (``started``), then follow it until
        it has exited; the jail and the uid are released at the end, however it ends.

        An incoming VM given no config is ``started`` at once (state incoming, as in
        none mode): the daemon first takes its source and the stream's config
        (:meth:`_take_source`); what fails from there (no source, a bad stream, a
        worker that cannot start) is its exit (reason error, a detail saying why),
        never an error raised to :meth:`avmm.host.Host.receive`."""
        try:
            if self._incoming is None or not self._incoming.streamed:
                await self._run_worker(task_status)
                return
            task_status.started()
            try:
                if await self._take_source():
                    await self._run_worker(trio.TASK_STATUS_IGNORED)
            except (AvmmError, OSError) as e:
                await self._incoming_failed(str(e) or type(e).__name__)
            except Exception as e:  # a bug, or input nobody foresaw: this VM's end only
                self._log.exception("the incoming VM failed unexpectedly")
                await self._incoming_failed(f"{type(e).__name__}: {e}")
        finally:
            if self._incoming is not None:
                self._let_go_of_source()
            if self._exit is None:
                self._exit = VmExit(StopReason.ERROR, HOST_FAILURE_STATUS,
                                    "the worker ended without a status"
                                    if self._worker_started else "the VM did not start")
            for done, _slot in self._pending.values():
                done.set()
            self._console.end()
            # Also when it never started: a stop or DELETE that came meanwhile waits here.
            self._done.set()

    async def _take_source(self) -> bool:
        """An incoming VM given no config: accept its source (within the accept
        timeout) and read the stream's header and CONFIG frame as strictly as the
        destination does, bounded in size and time (it is hostile input), then take
        that config as the VM's, to plan its jail from (as a given one). False if the
        VM was stopped meanwhile (its exit recorded).

        :raises MigrationError, ConfigError: no source came, or its opening or config
            is refused (the source was told why).
        """
        from ..migration.destination import receive_opening

        incoming = self._incoming
        assert incoming is not None
        with self._waiting:
            incoming.opening = await receive_opening(
                incoming.listener,
                path_check=None if self._paths is None else self._paths.check)
        if self._waiting.cancelled_caught:
            # As a destination of none mode stopped before its hand-over.
            self._exit = VmExit(StopReason.STOPPED, 0,
                                self._stop_requested or "stopped by the host")
            self._set_local_migration_failed("the VM was stopped before the hand-over")
            return False
        self._log.info("migration incoming; the daemon read its config",
                       listen=str(incoming.listener.address))
        self._configure(incoming.opening.config)
        return True

    async def _incoming_failed(self, why: str) -> None:
        """An incoming VM given no config that ends before its worker has its VM (the
        worker, if one was started, is gone): the source is told why, and the VM shows
        the exit and migration a destination of none mode would."""
        from ..migration.destination import refuse

        self._log.warning("incoming migration failed; nothing runs here", error=why)
        if self._incoming is not None and self._incoming.opening is not None:
            # (A failure to read the opening was told by receive_opening itself.)
            await refuse(self._incoming.opening.stream, why)
        self._set_local_migration_failed(why)
        if self._exit is None:
            self._exit = VmExit(StopReason.ERROR, HOST_FAILURE_STATUS,
                                f"incoming migration failed: {why}")

    def _set_local_migration_failed(self, why: str) -> None:
        if self._local_migration is not None and self._status is None:
            self._local_migration = {**self._local_migration, "state": "failed",
                                     "error": why}

    def _let_go_of_source(self) -> None:
        """Close the daemon's listener and its copy of an accepted connection (the
        worker has its own, or never will): a unix socket's file goes, and a source
        sees the stream end when the worker's copy goes too."""
        incoming, self._incoming = self._incoming, None
        if incoming is None:
            return
        incoming.listener.close()
        if incoming.opening is not None:
            # Closing a trio socket only closes this process's fd (no shutdown).
            incoming.opening.stream.socket.close()

    async def _run_worker(self, task_status: trio.TaskStatus[None]) -> None:
        """The worker's whole life (see :meth:`_run`): raises what keeps it from
        starting, before ``started``."""
        isolation = self._isolation
        config = self._known_config
        uid: int | None = None
        spec: JailSpec | None = None
        streamed = self._incoming is not None and self._incoming.streamed
        try:
            # In the try: no uid left (every one taken) still releases the fds below.
            uid, gid = await isolation.take_ids()
            self._ids = (uid, gid)
            max_file_bytes = isolation.max_file_bytes
            if max_file_bytes is None:
                max_file_bytes = file_size_limit(
                    config, await trio.to_thread.run_sync(_disk_sizes, config))
            # A streamed VM's kernel and initrd are never read (RAM comes by the
            # stream), and need not exist here: as in none mode, they are not bound.
            spec = plan_jail(config, self.id, jail_root=isolation.jail_root,
                             uid=uid, gid=gid, max_file_bytes=max_file_bytes,
                             boot_files=not streamed)
            self._outputs = await trio.to_thread.run_sync(
                _open_outputs, self.name, config, self._paths)
            await trio.to_thread.run_sync(functools.partial(
                prepare_jail_dir, spec, owner=owner_name()))
            try:
                await self._spawn(spec)
                with trio.move_on_after(START_TIMEOUT_S) as waited:
                    await self._first_message()
                if waited.cancelled_caught:
                    raise VmStartError(self.id, "starting the worker process",
                                       f"no answer within {START_TIMEOUT_S:g} s")
            except BaseException:
                await self._kill()
                raise
            if streamed:
                # The worker has the connection: a source must see the stream end when
                # the worker's copy goes.
                self._let_go_of_source()
            resume_failed: AvmmError | None = None
            async with trio.open_nursery() as nursery:
                self._tasks = nursery
                nursery.start_soon(self._follow_then_end, nursery.cancel_scope)
                nursery.start_soon(self._relay_log)
                if self._start and self._incoming is None and not streamed:
                    # Built paused (see _place); it runs from here.
                    try:
                        await self._call("resume")
                    except AvmmError as e:
                        resume_failed = e
                        await self._kill()
                if resume_failed is None:
                    self._worker_started = True
                    task_status.started()
                    if self._stop_requested is not None:
                        self.request_stop(self._stop_requested)
            if resume_failed is not None:
                raise VmStartError(self.id, "starting the guest", str(resume_failed))
        finally:
            self._tasks = None
            if self._group_fds:  # never handed over
                close_fds(list(self._group_fds.values()))
                self._group_fds = {}
            if self._restore is not None:
                os.close(self._restore.dir_fd)
                self._restore = None
            if self._incoming is not None and not streamed:
                self._let_go_of_source()
            await self._reap()
            if self._outputs:
                # The console socket's file goes once nothing listens on it any more,
                # as a VM of none mode removes it when it stops.
                outputs, self._outputs = self._outputs, {}
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_close_outputs, outputs)
            if self._channel is not None:
                self._channel.close()
            if self._log_fd is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._relay_log()  # what it logged before it ended
                os.close(self._log_fd)
                self._log_fd = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._release_cpu)
            if spec is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_remove_quietly, spec.root)
            if uid is not None:
                isolation.give_back_ids(uid)
            self._ids = None

    async def _spawn(self, spec: JailSpec) -> None:
        spawner = self._isolation.spawner
        if spawner is None:
            raise VmStateError("process isolation is not running (its Host is not "
                               "entered)")
        ours, theirs = socketpair()
        # The spawner keeps a copy of each tap and puts it back as it is now once the
        # worker has ended (a worker could make it persistent, or its own).
        taps = [(fd, self._config.nets[int(match.group(1))].netns)
                for key, fd in self._outputs.items()
                if (match := re.fullmatch(r"net\[([0-9]+)\]\.tap", key)) is not None
                and isinstance(fd, int)]
        try:
            self._reaper, self._log_fd = await spawner.spawn(theirs.fileno(), taps)
        except SpawnerError as e:
            ours.close()
            raise VmStartError(self.id, "starting the worker process", str(e)) from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._channel = Channel(ours)
        # The jailer's order: the VM's cgroup before anything of the VM is built. The
        # process just started waits for its start message (sent below) before it forks
        # the jailed process and builds the VM, so every process and thread of the VM
        # is born in the cgroup. Unreaped until _reap lets it go, its PID is its own.
        async with self._pid_lock:
            try:
                await trio.to_thread.run_sync(self._place_early, self._reaper)
            except (CgroupError, OSError) as e:
                raise VmStartError(self.id, "placing the worker in the VM's cgroup",
                                   str(e)) from None
        isolation = self._isolation
        config = worker_config(self._known_config)
        restore = self._restore
        # What the VM's config names is bound from fds opened here, through the path
        # policy: a component swapped for a symlink after the check changes nothing.
        sources = await trio.to_thread.run_sync(_open_bind_sources, spec, self._paths)
        incoming = self._incoming
        opening = None if incoming is None else incoming.opening
        outputs = self._outputs
        groups = self._group_fds
        fds = [*(() if restore is None else (restore.dir_fd,)),
               # The accepted connection (the daemon read its opening), or the listener.
               *(() if incoming is None else (incoming.listener.fileno() if opening is None
                                              else opening.stream.socket.fileno(),)),
               *(output.socket.fileno() if isinstance(output, BoundSocket) else output
                 for output in outputs.values()),
               *groups.values(),
               *sources.values()]
        try:
            await self._channel.send({
                "op": "start", "vm_id": self.id,
                "config": config_to_dict(config),
                "start": self._start, "seccomp": isolation.seccomp.value,
                "jail": spec.to_dict(), "bind_fds": list(sources),
                "outputs": list(outputs), "rate_limit_groups": list(groups),
                "restore": None if restore is None else {
                    "path": restore.path, "copy_memory": restore.copy_memory,
                    "vhost_user": dict(restore.vhost_user)},
                "incoming": None if incoming is None else {
                    "listen": incoming.listen,
                    "accept_timeout_s": incoming.accept_timeout_s} if opening is None else {
                    # Where the daemon listened (a TCP port 0 made real), and what it
                    # read of the stream: the worker's destination reads it again first.
                    "listen": str(incoming.listener.address),
                    "accept_timeout_s": None,
                    "received": base64.b64encode(opening.received).decode()},
                "log_level": isolation.log_level, "log_format": isolation.log_format,
            }, fds)
        finally:
            close_fds(list(sources.values()))
            # The worker has its own descriptions of the groups' memory now (or never
            # will): the daemon keeps its own.
            self._group_fds = {}
            close_fds(list(groups.values()))
            # The worker has its own copies now (or never will); the console socket's
            # BoundSocket stays, to remove its file when the worker has ended. (A tap the
            # daemon created goes when the worker has ended: the spawner's copy is the
            # last, see avmm.isolation.taps.)
            for key, output in list(outputs.items()):
                if isinstance(output, BoundSocket):
                    output.socket.close()
                else:
                    os.close(output)
                    del outputs[key]
            if restore is not None:
                # The worker has its own copy now (or never will): this one goes.
                os.close(restore.dir_fd)
                self._restore = None

    async def _first_message(self) -> None:
        assert self._channel is not None
        try:
            message = await self._channel.receive()
        except ChannelError:
            code = await self._reap()
            raise VmStartError(self.id, "starting the worker process",
                               f"it ended before the VM ran ({_describe_status(code)})"
                               ) from None
        if message.get("event") == "failed":
            raise remote_error(message.get("error"))
        if message.get("event") != "started":
            raise VmStartError(self.id, "starting the worker process",
                               "it broke the protocol")
        self._take_status(message.get("status"))
        # The PID-reuse race between reading the jailed process's PID and writing it
        # into the VM's cgroup is closed by who reaps what: the spawner (the reaper's
        # parent and a child subreaper) keeps the reaper and the jailed process unreaped
        # until _reap releases them, under _pid_lock, and an unreaped process's PID is
        # never given to another. So the reaper's /proc entry is the reaper's, the child
        # found there is the jailed process, and the number written is its own, even if
        # it died in between (then the write moves a zombie, or nothing).
        async with self._pid_lock:
            if not self._pids_held:
                raise VmStartError(self.id, "starting the worker process",
                                   "it ended before the VM ran")
            self._pid = await trio.to_thread.run_sync(_child_pid, self._reaper)
            if self._pid is None:
                raise VmStartError(self.id, "starting the worker process",
                                   "its PID is gone")
            self._host_tids = await trio.to_thread.run_sync(_host_thread_ids, self._pid)
            await trio.to_thread.run_sync(self._place, self._pid)
        self._log.info("vm worker started", pid=self._pid)

    def _place_early(self, pid: int | None) -> None:
        """The VM's cgroup (if its CPU controls need one), with the process the spawner
        started for it (a worker thread)."""
        self._cpu.prepare()
        if pid is not None:
            self._cpu.place_process(pid)

    def _place(self, pid: int) -> None:
        """The VM's CPU controls on its worker (a worker thread), before its guest's
        first instruction (the worker builds it paused): the cgroup with the whole
        process in it, the vCPU threads pinned."""
        status = self._status
        threads = [] if status is None else status["vm"].get("vcpu_threads") or []
        vcpus = [(index, self._host_tids[tid]) for index, tid in enumerate(threads)
                 if isinstance(tid, int) and tid in self._host_tids]
        self._cpu.prepare()
        self._cpu.place_process(pid)
        self._cpu.place(vcpus)

    async def _relay_log(self) -> None:
        """The worker's stderr (its log lines) onto the daemon's, each line marked as
        this VM's worker's, cut to :data:`LOG_LINE_MAX` characters, control characters
        (terminal escapes included) shown as ``?``: a worker cannot forge or garble the
        daemon's own lines."""
        fd = self._log_fd
        if fd is None:
            return
        os.set_blocking(fd, False)
        pending = b""
        while True:
            try:
                await trio.lowlevel.wait_readable(fd)
                chunk = os.read(fd, 65536)
            except (OSError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                lines, pending = ([pending] if pending else []), b""
            else:
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > LOG_LINE_MAX:
                    lines, pending = [*lines, pending], b""
            if lines:
                text = "".join(f"[worker {self.id}] {_printable(line)}\n" for line in lines)
                await trio.to_thread.run_sync(_write_stderr, text)
            if not chunk:
                return

    async def _follow_then_end(self, scope: trio.CancelScope) -> None:
        await self._follow()
        scope.cancel()

    async def _follow(self) -> None:
        assert self._channel is not None
        channel = self._channel
        while True:
            try:
                message = await channel.receive()
                try:
                    self._event(message)
                except ChannelError:
                    raise
                except Exception as e:  # whatever a worker sends must not reach further
                    raise ChannelError(f"a message the daemon could not take "
                                       f"({type(e).__name__})") from None
            except ChannelError as e:
                self._ended.set()
                if self._exit is None:
                    if isinstance(e, ChannelClosed):
                        reason = _describe_status(await self._reap())
                    else:
                        await self._kill()
                        reason = f"it broke the protocol ({e}) and was killed"
                    self._exit = VmExit(StopReason.CRASH, HOST_FAILURE_STATUS,
                                        f"the VM's worker process ended: {reason}")
                    self._log.warning("vm worker crashed", detail=self._exit.detail)
                return
            if self._incoming is not None and self.state is not VmState.INCOMING:
                # The worker accepted its source: stop listening here too (a unix
                # socket's file goes).
                listener, self._incoming = self._incoming.listener, None
                await trio.to_thread.run_sync(listener.close)
            if self._exit is not None:
                self._ended.set()
                return

    async def _reap(self) -> int | None:
        """Wait for the worker process to end (killed if it has not in time); its exit
        status, as subprocess gives it. Once only: later calls give None."""
        spawner, reaper = self._isolation.spawner, self._reaper
        if spawner is None or reaper is None:
            return None
        self._reaper = None
        with trio.CancelScope(shield=True):
            code = None
            with trio.move_on_after(STOP_TIMEOUT_S) as waited:
                code = await spawner.wait(reaper)
            if waited.cancelled_caught:
                self._reaper = reaper
                await self._kill()
                self._reaper = None
                code = await spawner.wait(reaper)
            # No PID of the worker's is written from here on: the spawner may reap its
            # processes, and their numbers go to others (see _first_message).
            async with self._pid_lock:
                self._pids_held = False
            await spawner.release(reaper)
            return code


def _begin_snapshot(directory: Path, parent_fd: int) -> PartialSnapshot:
    """The snapshot's temporary directory in ``parent_fd`` and its two files (a worker
    thread)."""
    partial = PartialSnapshot.begin(directory, parent_fd=parent_fd)
    try:
        partial.create_files(handed_out=True)
    except OSError as e:
        partial.__exit__(None, None, None)
        raise SnapshotError(f"{directory}: cannot create the snapshot's files: "
                            f"{e.strerror}") from None
    except BaseException:
        partial.__exit__(None, None, None)
        raise
    return partial


#: Snapshots whose files the daemon checks and copies at once (each reads and writes up
#: to a guest's RAM): a thread pool of their own, so that many VMs' snapshots (hostile
#: workers' too) never hold every thread of trio's default pool, which path checks and
#: VM starts use.
SNAPSHOT_COPIES_AT_ONCE = 2
_snapshot_copies_var: trio.lowlevel.RunVar[trio.CapacityLimiter] = \
    trio.lowlevel.RunVar("avmm_snapshot_copies")


def _snapshot_copies() -> trio.CapacityLimiter:
    try:
        return _snapshot_copies_var.get()
    except LookupError:
        limiter = trio.CapacityLimiter(SNAPSHOT_COPIES_AT_ONCE)
        _snapshot_copies_var.set(limiter)
        return limiter


def _commit_snapshot(partial: PartialSnapshot, memory_bytes: int) -> tuple[int, int]:
    """Check and copy what the worker wrote into files it never held, then fsync and
    rename the snapshot (a worker thread): the worker keeps its fds, and the committed
    files must be out of its reach (restored VMs map the memory file). The state file's
    size and the memory file's data bytes."""
    try:
        sizes = partial.take_over_files(SNAPSHOT_SECTIONS, max_memory_bytes=memory_bytes)
        partial.commit()
    except OSError as e:
        raise SnapshotError(f"{partial.directory}: cannot write the snapshot: "
                            f"{e.strerror or e}") from e
    return sizes


def _snapshot_bytes(result: object, memory_mib: int) -> int | None:
    """The bytes of guest memory the worker says it wrote, if that is a count the
    guest's RAM can hold; else None."""
    try:
        count = _count(_dict(_dict(result, 8)["snapshot"], 4)["bytes_memory"])
    except (KeyError, TypeError):
        return None
    return count if count <= memory_mib << 20 else None


def _text(value: object, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise TypeError("a string too long or of the wrong type")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise TypeError("not a count")
    return value


def _seconds(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) \
            or not 0 <= value < 1e12:
        raise TypeError("not a number of seconds")
    return float(value)


def _dict(value: object, limit: int) -> dict[Any, Any]:
    if not isinstance(value, dict) or len(value) > limit:
        raise TypeError("not an object, or too large")
    return value


def _list(value: object, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise TypeError("not an array, or too long")
    return value


def sanitize_status(status: object) -> dict[str, Any]:
    """What the daemon keeps of a worker's status: only the fields it shows that only the
    worker knows (state, uptime, exit, thread ids, counters, its devices' limits), each
    checked for type and bounds. Everything else (id, name, config, CPU controls) is the
    daemon's own.

    :raises TypeError, KeyError, ValueError: the status is malformed.
    """
    vm = _dict(_dict(status, 8)["vm"], 64)
    exit_data = vm.get("exit")
    exit_value = None if exit_data is None else {
        "reason": StopReason(_dict(exit_data, 8)["reason"]).value,
        "exit_status": _count(exit_data["exit_status"]),
        "detail": _text(exit_data.get("detail", ""), 1000),
    }
    uptime = vm.get("uptime_s")
    rate_limits = vm.get("rate_limits")
    migration = vm.get("migration")
    if migration is not None:
        migration = {key: value for key, value in _dict(migration, 32).items()
                     if key in MIGRATION_KEYS and (
                         value is None or isinstance(value, bool | int | float)
                         or (isinstance(value, str) and len(value) <= 1000))}
        if migration.get("state") not in MIGRATION_STATES:
            raise TypeError("a migration without a known state")
    metrics = _dict(status["metrics"], 8)  # type: ignore[index]
    devices = {}
    for name, counters in _dict(metrics["devices"], 64).items():
        counters = _dict(counters, 4)
        devices[_text(name, 64)] = {"kind": _text(counters["kind"], 32),
                                    **{key: _count(counters.get(key, 0))
                                       for key in ("requests", "bytes", "notifications")}}
    return {
        "vm": {
            "state": VmState(vm["state"]).value,
            "uptime_s": None if uptime is None else _seconds(uptime),
            "exit": exit_value,
            "vcpu_threads": [_count(tid) for tid in _list(vm.get("vcpu_threads", []), 512)],
            # Its devices' limits as the worker applies them (display only; bounded by
            # the message size, with no float the JSON encoder could not write back).
            "rate_limits": None if rate_limits is None else _dict(rate_limits, 256),
            "migration": migration,
        },
        "metrics": {
            "vcpu_exits": {_text(kind, 64): _count(count) for kind, count
                           in _dict(metrics["vcpu_exits"], 64).items()},
            "devices": devices,
        },
        "rate_limit_waits": [
            [_text(device, 64), _text(kind, 32), _seconds(seconds)]
            for device, kind, seconds in _list(status["rate_limit_waits"], 256)],  # type: ignore[index]
    }


def _child_pid(reaper: int | None) -> int | None:
    """The jailed worker's PID: the one child of its reaper (see avmm.isolation.jail)."""
    if reaper is None:
        return None
    try:
        children = Path(f"/proc/{reaper}/task/{reaper}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _printable(line: bytes) -> str:
    return _UNPRINTABLE.sub("?", line.decode(errors="replace")[:LOG_LINE_MAX])


def _write_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _open_bind_sources(spec: JailSpec, paths: PathPolicy | None) -> dict[str, int]:
    """An O_PATH fd of each bind that comes from the VM's config (not the Python
    runtime), opened through ``paths``; by bind path."""
    policy = paths if paths is not None else PathPolicy()
    runtime = {bind.path for bind in runtime_binds()}
    sources: dict[str, int] = {}
    try:
        for bind in spec.binds:
            if bind.path in runtime:
                continue
            sources[bind.path] = policy.open_path(Path(bind.path), "jail")
    except BaseException:
        close_fds(list(sources.values()))
        raise
    if len(sources) > MAX_BIND_FDS:
        close_fds(list(sources.values()))
        raise ConfigError(f"a VM in a worker may name at most {MAX_BIND_FDS} files and "
                          "directories", key="disk")
    return sources


def worker_config(config: VmConfig) -> VmConfig:
    """The config a worker builds its VM from: without the CPU controls (the daemon
    applies them: the jail holds no cgroup tree), and without its taps' network
    namespaces (the daemon opened the taps in them, see :func:`_open_outputs`; the jail
    has no /run/netns to check the names against)."""
    return dataclasses.replace(
        config,
        machine=dataclasses.replace(config.machine, cpu_weight=None, cpu_max_percent=None,
                                    cpu_affinity=None, vcpu_affinity=None),
        nets=tuple(dataclasses.replace(net, netns=None) if net.tap is not None else net
                   for net in config.nets))


@dataclasses.dataclass
class IncomingRequest:
    """A VM that comes in by live migration, received in its worker: the listening
    socket the daemon bound (its fd handed over; the daemon keeps the listener, which
    removes a unix socket's file when closed), as ``listen`` names it.

    ``streamed``: no config was given; the daemon accepts the source and reads the
    stream's opening itself (see :meth:`WorkerVm._take_source`), and hands the worker
    the ``opening`` (the connection and the bytes read) instead of the listener."""

    listen: str
    listener: Any  # avmm.migration.transport.Listener
    accept_timeout_s: float | None
    streamed: bool = False
    opening: Any = None  # avmm.migration.destination.Opening, once read


@dataclasses.dataclass(frozen=True)
class RestoreRequest:
    """A VM restored in its worker: the snapshot directory (an fd the daemon opened,
    closed when the worker has it), how, and the path (for messages)."""

    path: str
    dir_fd: int
    copy_memory: bool
    vhost_user: dict[str, str]


#: The most daemon-wide rate-limit groups one VM in a worker may name.
MAX_SHARED_GROUPS = 16


def daemon_groups_named(config: VmConfig) -> list[tuple[str, str]]:
    """(config key, group) of every device naming a group its config does not define:
    a daemon-wide one; each group once."""
    own_groups = {name for name, _limit in config.rate_limit_groups}
    named = [(f"disk[{index}].rate_limit_group", disk.rate_limit_group)
             for index, disk in enumerate(config.disks)] + [
        (f"net[{index}].{direction}_rate_limit_group",
         getattr(net, f"{direction}_rate_limit_group"))
        for index, net in enumerate(config.nets) for direction in ("tx", "rx")]
    seen: dict[str, str] = {}
    for key, group in named:
        if group is not None and group not in own_groups:
            seen.setdefault(group, key)
    return [(key, group) for group, key in seen.items()]


def _refuse_daemon_groups(config: VmConfig) -> None:
    """A config that came with an incoming migration stream, to a VM given none: its
    worker is handed no daemon-wide group (as none mode's streamed VM gets none).

    :raises ConfigError: it names one (with the key).
    """
    named = daemon_groups_named(config)
    if named:
        key, group = named[0]
        raise ConfigError(f"the streamed config names the daemon-wide rate-limit group "
                          f"{group!r}; give the incoming VM a config, or define the "
                          "group in the VM's [rate_limit_groups]",
                          path=config.source, key=key)


def _daemon_group_fds(config: VmConfig, groups: SharedGroups | None) -> dict[str, int]:
    """A descriptor of the shared memory of each daemon-wide group ``config`` names, by
    name (an open file description of its own: its lock is this worker's). A group the
    daemon does not have (deleted since the config was checked) is left out: the
    worker's build then fails on it as a VM of none mode does.

    :raises ConfigError: more than :data:`MAX_SHARED_GROUPS` groups are named.
    """
    named = daemon_groups_named(config)
    if len(named) > MAX_SHARED_GROUPS:
        raise ConfigError(f"a VM in a worker may name at most {MAX_SHARED_GROUPS} "
                          "daemon-wide rate-limit groups", path=config.source,
                          key=named[MAX_SHARED_GROUPS][0])
    fds: dict[str, int] = {}
    if groups is None:
        return fds
    try:
        for _key, group in named:
            fd = groups.handout_fd(group)
            if fd is not None:
                fds[group] = fd
    except BaseException:
        close_fds(list(fds.values()))
        raise
    return fds


def _open_outputs(vm: str, config: VmConfig, paths: PathPolicy | None,
                  ) -> dict[str, int | BoundSocket]:
    """The serial port's output file and the virtio console's file or socket, by key
    (``serial.path``, ``console.path``), opened or bound through ``paths`` by the very
    calls a VM of none mode makes (:meth:`PathPolicy.open_output`,
    :meth:`PathPolicy.bind_socket`), for a worker whose jail holds none of their
    directories (writable, it would expose everything else in them); then the tap of
    each tap NIC (``net[N].tap``: its fd), as none mode opens it (:func:`avmm.vm.open_tap`,
    in the NIC's network namespace), for a worker whose jail has no /dev/net/tun and
    which has no CAP_NET_ADMIN. Blocks: a thread.

    :raises VmStartError: as the VM's build would fail, naming its step and the key (a
        PathNotAllowedError inside: 403).
    """
    policy = paths if paths is not None else PathPolicy()
    opened: dict[str, int | BoundSocket] = {}
    try:
        for step, key, output in ((SERIAL_STEP, "serial.path", config.serial),
                                  (CONSOLE_STEP, "console.path", config.console)):
            if output is None or output.path is None:
                continue
            try:
                opened[key] = policy.bind_socket(output.path, key) \
                    if output.mode == "socket" else policy.open_output(output.path, key)
                _check_output_device(opened[key], key)
            except (AvmmError, OSError) as e:
                raise step_failed(vm, step, e) from e
        for index, net in enumerate(config.nets):
            if net.tap is None:
                continue
            try:
                opened[f"net[{index}].tap"] = open_tap(net).detach()
            except (AvmmError, OSError) as e:
                raise step_failed(vm, tap_step(index, net), e) from e
    except BaseException:
        _close_outputs(opened)
        raise
    return opened


#: The character devices a worker may be handed as an output: none mode writes to any
#: (the daemon's own process), but a worker's fd of /dev/port, /dev/mem or /dev/kmsg
#: would hand a jailed process what its jail keeps from it.
OUTPUT_DEVICES: Final = ("/dev/null", "/dev/zero", "/dev/full")


def _check_output_device(output: int | BoundSocket, key: str) -> None:
    """Refuse an output that is a character device other than :data:`OUTPUT_DEVICES`
    (compared by device number, whatever the path that led to it).

    :raises ConfigError: it is one (the key named).
    """
    if isinstance(output, BoundSocket):
        return
    info = os.fstat(output)
    if not stat.S_ISCHR(info.st_mode):
        return
    allowed = set()
    for device in OUTPUT_DEVICES:
        with contextlib.suppress(OSError):
            allowed.add(os.stat(device).st_rdev)
    if info.st_rdev not in allowed:
        raise ConfigError(f"a character device other than {', '.join(OUTPUT_DEVICES)} is "
                          "not an output a VM in a jailed worker may have; use a regular "
                          "file, or --isolation none", key=key)


def _close_outputs(outputs: dict[str, int | BoundSocket]) -> None:
    """Close what :func:`_open_outputs` opened; a console socket's file is removed."""
    for output in outputs.values():
        if isinstance(output, BoundSocket):
            output.close()
        else:
            with contextlib.suppress(OSError):
                os.close(output)


def _disk_sizes(config: VmConfig) -> list[int]:
    """The sizes of the VM's disk images (a thread: stat). One that cannot be looked at
    counts nothing here: the VM's build names it."""
    sizes = []
    for disk in config.disks:
        if disk.path is not None:
            with contextlib.suppress(OSError):
                sizes.append(os.stat(disk.path).st_size)
    return sizes


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _host_thread_ids(pid: int) -> dict[int, int]:
    """Process ``pid``'s threads: the id its own PID namespace gives each → the host's
    (the last and first numbers of NSpid in each thread's status)."""
    ids = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                    if line.startswith("NSpid:"):
                        numbers = [int(number) for number in line.split()[1:]]
                        ids[numbers[-1]] = numbers[0]
    return ids


def _describe_status(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGSYS":
            return "killed by SIGSYS (a system call its seccomp filter forbids)"
        return f"killed by {name}"
    return f"exit status {code}"


def _remove_quietly(root: str) -> None:
    try:
        remove_jail(root)
    except (JailError, OSError) as e:
        log.warning("could not remove a jail", root=root, reason=str(e))
