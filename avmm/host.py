"""``Host``: many VMs in one trio program, each in a task of its own.

This is what ``avmm serve`` runs on, and what an embedding service uses to do the same::

    async with Host() as host:
        hosted = await host.create(config)          # builds and starts it
        async with hosted.subscribe_console() as console:
            async for chunk in console:             # the backlog first, then live output
                ...
        await hosted.pause()
        await hosted.resume()
        print(hosted.metrics())
        await host.remove(hosted.id)                # stop (disks flushed) and forget

        await hosted.pause()
        info = await hosted.snapshot("/srv/snaps/one")  # a new directory; VM paused
        restored = await host.restore("/srv/snaps/one")  # a new VM, running from there

        incoming = await host.receive("unix:/run/avmm/in.sock")  # INCOMING, listening
        await hosted.start_migration("unix:/run/avmm/in.sock")  # returns at once
        hosted.migration                             # progress, as the API shows it

Each VM runs in its own task inside the Host's nursery and catches everything its VM
can throw, so one VM's end, crash or bug never touches its neighbours: it is reported
as STOPPED with its :class:`~avmm.lifecycle.VmExit`. Leaving the Host stops every VM.

The serial console of every VM is read all the time into a 64 KiB backlog and fanned
out to subscribers; each subscriber has a bounded buffer of its own, so a slow reader
loses its oldest bytes (counted in ``dropped``) rather than stalling the guest or the
other readers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import time
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import structlog
import trio

from .cgroups import CpuLimits, CpuUsage
from .config import VmConfig
from .errors import AvmmError, UnknownVmError, VmStateError
from .lifecycle import (
    HOST_FAILURE_STATUS,
    DeviceMetrics,
    StopReason,
    VmExit,
    VmMetrics,
    VmState,
)
from .migration.errors import HandOverUnconfirmed, MigrationError
from .migration.transport import Accepted, check_accept_timeout
from .paths import NewPath, PathPolicy
from .ratelimit import LimitTargetError, SharedGroups
from .state import SnapshotFiles, SnapshotInfo
from .vm import VirtualMachine

if TYPE_CHECKING:
    from .isolation.worker_vm import ProcessIsolation

__all__ = [
    "CONSOLE_BACKLOG_BYTES",
    "ConsoleSubscription",
    "DeviceMetrics",
    "Host",
    "HostedVm",
    "SnapshotInfo",
    "UnknownVmError",
    "VmMetrics",
    "VmState",
    "config_to_dict",
]

log = structlog.get_logger(__name__)

#: Serial output kept per VM for subscribers that attach later.
CONSOLE_BACKLOG_BYTES = 64 * 1024
#: Output a subscriber may fall behind by before its oldest unread bytes are dropped.
SUBSCRIBER_BUFFER_BYTES = 256 * 1024


@final
class ConsoleSubscription:
    """One reader attached to a VM's serial console.

    An async iterator of ``bytes`` chunks: the backlog at the time of subscribing first,
    then the output as it comes; it ends when the VM has stopped and everything was
    read, or when detached with :meth:`aclose` (or by leaving ``async with``). Never
    blocks the guest: a reader that falls more than ``limit`` bytes behind loses the
    oldest ones, counted in :attr:`dropped`.
    """

    def __init__(self, hub: ConsoleHub, backlog: bytes, *,
                 limit: int = SUBSCRIBER_BUFFER_BYTES) -> None:
        self._hub = hub
        self._pending = bytearray(backlog)
        self._limit = limit
        self._ended = False
        self._waiter: trio.Event | None = None
        #: Bytes this reader lost because it fell behind.
        self.dropped = 0

    # -- the hub's side (event-loop thread, never blocks) -------------------------------

    def _offer(self, data: bytes) -> None:
        self._pending += data
        overflow = len(self._pending) - self._limit
        if overflow > 0:
            del self._pending[:overflow]
            self.dropped += overflow
        self._wake()

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()

    # -- the reader's side --------------------------------------------------------------

    def __aiter__(self) -> ConsoleSubscription:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            waiter = self._waiter = trio.Event()
            await waiter.wait()
        # Taken after the last checkpoint: a cancelled reader loses nothing.
        chunk = bytes(self._pending)
        self._pending.clear()
        return chunk

    def close(self) -> None:
        """Detach now (synchronous form of :meth:`aclose`)."""
        self._hub.detach(self)
        self._pending.clear()
        self._end()

    async def aclose(self) -> None:
        """Detach: the iteration ends, the VM goes on."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ConsoleSubscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None,
                        traceback: types.TracebackType | None) -> None:
        self.close()


class ConsoleHub:
    """A VM's serial output: the backlog and the subscribers (event-loop thread only)."""

    def __init__(self, backlog_limit: int = CONSOLE_BACKLOG_BYTES) -> None:
        self._backlog = bytearray()
        self._limit = backlog_limit
        self._subscribers: list[ConsoleSubscription] = []
        self.ended = False

    def backlog(self) -> bytes:
        return bytes(self._backlog)

    def feed(self, data: bytes) -> None:
        self._backlog += data
        overflow = len(self._backlog) - self._limit
        if overflow > 0:
            del self._backlog[:overflow]
        for subscriber in self._subscribers:
            subscriber._offer(data)

    def subscribe(self) -> ConsoleSubscription:
        subscription = ConsoleSubscription(self, self.backlog())
        if self.ended:
            subscription._end()
        else:
            self._subscribers.append(subscription)
        return subscription

    def detach(self, subscription: ConsoleSubscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def end(self) -> None:
        self.ended = True
        subscribers, self._subscribers = self._subscribers, []
        for subscriber in subscribers:
            subscriber._end()


#: Opens a VM that is built on entering (VirtualMachine.restore(...)).
_VmOpener = Callable[[], AbstractAsyncContextManager[VirtualMachine]]


class HostedVm:
    """One VM owned by a :class:`Host` (made by :meth:`Host.create` or
    :meth:`Host.restore`, never directly).

    A restored VM has no :attr:`vm` (and no :attr:`config`) until it is built: its
    config comes from the snapshot. ``restore`` opens it; ``config`` is then None.
    """

    def __init__(self, vm_id: str, config: VmConfig | None, *, start_paused: bool = False,
                 paths: PathPolicy | None = None, restore: _VmOpener | None = None,
                 incoming: bool = False, rate_limit_groups: SharedGroups | None = None,
                 after_build: Callable[[], None] | None = None) -> None:
        self.id = vm_id
        self._vm: VirtualMachine | None = None
        self._opener: _VmOpener
        if restore is not None:
            self._opener = restore
            self.name = (config.name if config is not None else None) or vm_id
        else:
            assert config is not None
            self.name = config.name or vm_id
            vm = VirtualMachine(config, name=self.name, start_paused=start_paused,
                                paths=paths, rate_limit_groups=rate_limit_groups,
                                after_build=after_build)
            self._vm = vm
            self._opener = lambda: vm
        self._start_paused = start_paused
        self._stop_requested: str | None = None
        # Held while a snapshot is written: resume and a second snapshot are refused
        # meanwhile (the guest must not run while its memory is copied), and a VM that
        # is stopped meanwhile keeps its memory and fds until the writer is done.
        self._snapshotting = False
        self._snapshot_done = trio.Event()
        self._snapshot_done.set()
        # An incoming VM (Host.receive) runs once the migration stream has handed over.
        self._incoming = incoming
        self._given_config = config
        # The VM's own task group (inside _run), where a migration runs: it lives as
        # long as the VM, and the VM's task waits for it.
        self._tasks: trio.Nursery | None = None
        self._migrating = False
        self._migration_error: AvmmError | None = None
        self._migration_done = trio.Event()
        self._migration_done.set()
        self._previous_progress: Any = None
        self.created_at = time.time()
        self._console = ConsoleHub()
        self._running_since: float | None = None
        self._stopped_at: float | None = None
        self._failure: VmExit | None = None
        self._done = trio.Event()
        self._log = log.bind(vm=vm_id)

    def __repr__(self) -> str:
        return f"<HostedVm {self.id} {self.name!r} {self.state.value}>"

    # -- state --------------------------------------------------------------------------

    @property
    def vm(self) -> VirtualMachine:
        """The VM itself.

        :raises VmStateError: a restored VM that is still being built.
        """
        if self._vm is None:
            raise VmStateError(f"VM {self.id!r} is still being restored")
        return self._vm

    @property
    def config(self) -> VmConfig | None:
        """The config the VM was built from (a restored VM's comes from its snapshot:
        None until it is built; an incoming VM's from the migration stream: None until
        the hand-over, unless one was given to :meth:`Host.receive`)."""
        if self._vm is None:
            return None
        if self._incoming and self._vm.state is VmState.INCOMING:
            return self._given_config
        return self._vm.config

    @property
    def state(self) -> VmState:
        if self._done.is_set():
            return VmState.STOPPED
        if self._vm is None:
            return VmState.STARTING
        state = self._vm.state
        # The VM has ended, but this host has not finished with it (its task still
        # records how it ended): "stopped" is shown only with its exit.
        return VmState.STOPPING if state is VmState.STOPPED else state

    @property
    def uptime_s(self) -> float | None:
        """Seconds since the VM started running (paused time included), frozen once it
        has stopped; None if it never ran."""
        if self._running_since is None:
            return None
        end = self._stopped_at if self._stopped_at is not None else time.monotonic()
        return end - self._running_since

    @property
    def exit(self) -> VmExit | None:
        """How the VM ended, once STOPPED."""
        if not self._done.is_set():
            return None
        return self._failure or self.vm.exit

    # -- operations ---------------------------------------------------------------------

    async def pause(self) -> None:
        """RUNNING → PAUSED; returns once every vCPU is out of KVM_RUN.

        :raises VmStateError: the VM is not running, or it is being migrated.
        """
        self._refuse_while_migrating("pause")
        await self.vm.pause()

    async def update_limits(self, update: Any) -> None:
        """Change the VM's CPU limits and I/O rate limits now (PATCH /vms/{id};
        ``update`` is the API's LimitsUpdate). Every change is checked before any is
        made; the CPU limits (the one change the host can still refuse) go first.

        :raises VmStateError: the VM is being built, or has stopped.
        :raises LimitTargetError: no such device or group (404), a device served by a
            vhost-user back-end, or a ``machine`` key that cannot change at run time (400).
        :raises ConfigError: a bad ``machine.cpu_weight``/``cpu_max_percent`` (400).
        :raises CgroupError: this host cannot apply CPU controls (409).
        """
        if self.state in (VmState.STARTING, VmState.INCOMING, VmState.STOPPING,
                          VmState.STOPPED):
            # INCOMING: its machine is built only with the stream; a change now would
            # be made on a placeholder and lost (its cgroup leaked).
            raise VmStateError(f"VM {self.id!r} is {self.state.value}; its limits can be "
                               "changed while it exists and runs (or is paused)")
        limits = self.vm.rate_limits
        cpu = None if update.machine is None else cpu_change(update.machine)
        for change in update.changes:
            limits.check(change.kind, change.index, change.direction, change.key)
        for name, _ in update.groups:
            limits.check_group(name)
        if cpu:
            await self.vm.set_cpu_limits(**cpu)
        for change in update.changes:
            limits.set(change.kind, change.index, change.direction, change.limit,
                       key=change.key)
        for name, limit in update.groups:
            limits.set_group(name, limit)
        self._log.info("limits changed", devices=len(update.changes),
                       groups=len(update.groups), cpu=cpu or None)

    async def resume(self) -> None:
        """PAUSED → RUNNING.

        :raises VmStateError: the VM is not paused, or a snapshot is being written.
        """
        self._refuse_while_migrating("resume")
        if self._snapshotting:
            raise VmStateError(f"VM {self.id!r} is being snapshotted; resume it once the "
                               "snapshot is written")
        await self.vm.resume()
        if self._running_since is None:
            # Built with start=False: the guest runs its first instruction now.
            self._running_since = time.monotonic()

    async def snapshot(self, path: str | os.PathLike[str], *,
                       paths: PathPolicy | None = None) -> SnapshotInfo:
        """Write the paused VM's state and memory to the new directory ``path`` (see
        :meth:`avmm.vm.VirtualMachine.snapshot`); the VM stays paused. ``path``'s
        parent is checked through ``paths`` (default: anywhere) first, for a one-line
        error naming the key; the VM then writes the snapshot inside its parent's fd
        through its own path policy (the same one, from :meth:`Host.create`).

        :raises VmStateError: the VM is not paused, or another snapshot is being written.
        :raises PathNotAllowedError: ``path`` lies outside the allowed directories.
        :raises HostFileError: its parent cannot be used, or ``path`` exists.
        :raises SnapshotError: the snapshot could not be written (nothing is left).
        """
        self._check_snapshot_state()
        policy = paths if paths is not None else PathPolicy()
        target: NewPath = await trio.to_thread.run_sync(policy.new_path, Path(path), "path")
        target.close()
        # Checked again: the VM may have been resumed while the path was looked at.
        self._check_snapshot_state()
        with self._snapshot_guard():
            return await self.vm.snapshot(path)

    async def snapshot_into(self, files: SnapshotFiles,
                            path: str | os.PathLike[str]) -> SnapshotInfo:
        """As :meth:`snapshot`, into two open files the caller made (see
        :meth:`avmm.vm.VirtualMachine.snapshot_into`: the VM of a jailed worker, whose
        daemon makes the directory); ``path`` names it in the result and the log only.

        :raises VmStateError: the VM is not paused, or another snapshot is being written.
        :raises SnapshotError: the files could not be written.
        """
        self._check_snapshot_state()
        with self._snapshot_guard():
            return await self.vm.snapshot_into(files, path)

    @contextlib.contextmanager
    def _snapshot_guard(self) -> Iterator[None]:
        self._snapshotting = True
        self._snapshot_done = trio.Event()
        try:
            yield
        finally:
            self._snapshotting = False
            self._snapshot_done.set()

    def _check_snapshot_state(self) -> None:
        self._refuse_while_migrating("snapshot")
        if self._snapshotting:
            raise VmStateError(f"VM {self.id!r} is already being snapshotted")
        state = self.state
        if state is not VmState.PAUSED:
            raise VmStateError(f"VM {self.id!r} is {state.value}; pause it before taking "
                               "a snapshot")

    # -- migration ----------------------------------------------------------------------

    @property
    def migration(self) -> dict[str, Any] | None:
        """The progress of the VM's latest migration as JSON-able data (None if it never
        migrated): ``state``, ``round``, ``pages_sent``, ``pages_dirty``,
        ``bytes_sent``, ``downtime_ms``, ``total_ms`` and whatever else the engine
        reports, plus ``error`` (one line, or None). Kept after the VM has stopped; an
        incoming VM has one too."""
        progress = None if self._vm is None else self._vm_migration()
        if self._migrating and progress is self._previous_progress:
            progress = None  # the engine has not begun this one yet
        if progress is None and self._migration_error is None and not self._migrating:
            return None
        result = migration_to_dict(progress)
        if self._migrating and progress is None:
            result["state"] = "setup"
        if self._migration_error is not None:
            result["state"] = "failed"
            result["error"] = str(self._migration_error)
        return result

    def _vm_migration(self) -> Any:
        # The engine's progress snapshot (VirtualMachine.migration); a VM class without
        # it has never migrated.
        return getattr(self._vm, "migration", None)

    @property
    def migrating(self) -> bool:
        """True from :meth:`start_migration` until the migration has ended."""
        return self._migrating

    async def start_migration(self, to: str, *, downtime_ms: int = 300,
                              paths: PathPolicy | None = None,
                              connected: socket.socket | None = None) -> None:
        """Begin to live-migrate the running VM to the avmm listening at ``to``
        (``unix:/abs/path`` or ``tcp:HOST:PORT``; see
        :meth:`avmm.vm.VirtualMachine.migrate`) and return at once: the migration runs
        in the VM's task; :attr:`migration` follows it. On success the VM stops with
        exit reason ``migrated``; on failure it keeps running and :attr:`migration`
        says why (state ``failed``, ``error``). A ``unix:`` path is checked through
        ``paths`` (default: anywhere) first, for a one-line error naming ``to``; the
        engine then connects through what the VM's own policy (the one it was created
        with) opens, never by the name checked here.

        :raises VmStateError: the VM is not running, or already being migrated.
        :raises MigrationError: the VM cannot be migrated (a vhost-user back-end that
            cannot log its writes).
        :raises PathNotAllowedError: the socket lies outside the allowed directories.
        """
        self._check_migration_state()
        # The engine's up-front check (a vhost-user back-end that cannot log its
        # writes), so that the request itself is refused rather than the migration
        # failing a moment later.
        problem = self.vm.migration_problem()
        if problem is not None:
            raise MigrationError(f"VM {self.id!r} cannot be migrated: {problem}")
        socket_path = unix_path(to)
        if socket_path is not None and paths is not None:
            await trio.to_thread.run_sync(paths.check, Path(socket_path), "to", "socket")
            # Checked again: the VM may have changed state while the path was looked at.
            self._check_migration_state()
        assert self._tasks is not None
        self._migrating = True
        self._migration_error = None
        self._previous_progress = self._vm_migration()
        self._migration_done = trio.Event()
        self._tasks.start_soon(self._migrate, to, downtime_ms, connected)

    async def migrate(self, to: str, *, downtime_ms: int = 300,
                      paths: PathPolicy | None = None) -> dict[str, Any]:
        """:meth:`start_migration` and wait for its end: the final :attr:`migration`.

        :raises AvmmError: the migration failed (``MigrationError``; the VM keeps
            running), or could not start (as :meth:`start_migration`).
        """
        await self.start_migration(to, downtime_ms=downtime_ms, paths=paths)
        await self._migration_done.wait()
        if self._migration_error is not None:
            raise self._migration_error
        result = self.migration
        assert result is not None
        return result

    def _check_migration_state(self) -> None:
        if self._migrating:
            raise VmStateError(f"VM {self.id!r} is already being migrated")
        if self._snapshotting:
            raise VmStateError(f"VM {self.id!r} is being snapshotted; migrate it once the "
                               "snapshot is written")
        state = self.state
        if state is not VmState.RUNNING or self._tasks is None:
            raise VmStateError(f"VM {self.id!r} is {state.value}; only a running VM can be "
                               "migrated")

    def _refuse_while_migrating(self, what: str) -> None:
        # The migration pauses and resumes the VM itself (stop-and-copy, or back to
        # running after a failure); a pause from outside would race with it.
        if self._migrating:
            raise VmStateError(f"VM {self.id!r} is being migrated; {what} it once the "
                               "migration has ended")

    async def _migrate(self, to: str, downtime_ms: int,
                       connected: socket.socket | None = None) -> None:
        self._log.info("migration started", to=to, downtime_ms=downtime_ms)
        try:
            await self.vm.migrate(to, downtime_ms=downtime_ms, connected=connected)
        except HandOverUnconfirmed as e:
            self._migration_error = e
            self._log.error("migration unconfirmed; the VM stays paused", to=to,
                            error=str(e))
        except AvmmError as e:
            # MigrationError: the VM runs on here, as if nothing had happened.
            self._migration_error = e
            self._log.warning("migration failed; the VM keeps running", to=to, error=str(e))
        except Exception as e:
            self._migration_error = AvmmError(f"{type(e).__name__}: {e}")
            self._log.exception("migration failed in avmm; the VM keeps running", to=to)
        else:
            self._log.info("migration completed", to=to)
        finally:
            self._migrating = False
            self._migration_done.set()

    async def stop(self, detail: str = "stopped by the host") -> VmExit:
        """Stop the VM (from any state; idempotent) and wait until it has stopped: every
        vCPU joined, devices stopped, disks flushed. Returns how it ended."""
        self.request_stop(detail)
        await self._done.wait()
        result = self.exit
        assert result is not None
        return result

    def request_stop(self, detail: str = "stopped by the host") -> None:
        """Ask the VM to stop without waiting (a VM still being restored stops as soon
        as it is built)."""
        if self._vm is not None:
            # An incoming VM still waiting for (or receiving) its stream ends too.
            self._vm.stop(detail)
        elif self._stop_requested is None:
            self._stop_requested = detail

    async def wait(self) -> VmExit:
        """Wait until the VM has stopped, however that happens."""
        await self._done.wait()
        result = self.exit
        assert result is not None
        return result

    def metrics(self) -> VmMetrics:
        if self._vm is None:
            return VmMetrics(state=self.state, vcpu_exits={}, devices={})
        metrics = self._vm.metrics()
        metrics.state = self.state
        return metrics

    def rate_limit_waits(self) -> list[tuple[str, str, float]]:
        """(device, kind, seconds) its requests waited for rate limiters (/metrics)."""
        return [] if self._vm is None else list(self._vm.rate_limits.wait_seconds())

    def console_backlog(self) -> bytes:
        """The last 64 KiB of serial output."""
        return self._console.backlog()

    def subscribe_console(self) -> ConsoleSubscription:
        """Attach a reader to the serial console (see :class:`ConsoleSubscription`)."""
        return self._console.subscribe()

    async def send_console(self, data: bytes) -> None:
        """Type ``data`` into the guest's serial port. Waits while the UART's receive
        FIFO is full (the guest drains it at its own pace; a paused guest does not).

        :raises VmStateError: the VM has stopped (or is stopping).
        """
        if self.state in (VmState.STARTING, VmState.STOPPING, VmState.STOPPED):
            raise VmStateError(f"VM {self.id!r} is {self.state.value}; its console takes "
                               "no input")
        try:
            await self.vm.serial.send_all(data)
        except trio.ClosedResourceError:
            raise VmStateError(f"VM {self.id!r} has stopped; its console takes no input"
                               ) from None

    def to_dict(self) -> dict[str, Any]:
        """The VM as JSON-able data (what the management API shows); ``config`` is None
        while a restored VM is being built."""
        result = self.exit
        config = self.config
        if config is not None and self._vm is not None and config is self._vm.config:
            # The limits as changed at run time; daemon groups named, not copied.
            config = self._vm.config_with_limits(shared_as_own=False)
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "isolation": "none",
            "pid": os.getpid(),
            "created_at": self.created_at,
            "uptime_s": self.uptime_s,
            "exit": None if result is None else {
                "reason": result.reason.value,
                "exit_status": result.exit_status,
                "detail": result.detail,
            },
            "config": None if config is None else config_to_dict(config),
            "migration": self.migration,
            "vcpu_threads": [] if self._vm is None else self._vm.vcpu_threads,
            "cpu": None if self._vm is None else self._vm.cpu_description(),
            "rate_limits": None if self._vm is None else self._vm.rate_limits.to_dict(),
        }

    async def refresh(self) -> None:
        """Bring what the sync accessors show up to date (a VM in this process: they
        are always current; see :class:`avmm.isolation.worker_vm.WorkerVm`)."""
        await trio.lowlevel.checkpoint()

    async def cpu_usage(self) -> CpuUsage | None:
        """CPU time and throttled time of the VM's vCPUs (see VirtualMachine.cpu_usage)."""
        return None if self._vm is None else await self._vm.cpu_usage()

    async def set_cpu_limits(self, *, weight: int | None = None,
                             max_percent: float | None = None,
                             clear_max_percent: bool = False) -> CpuLimits:
        """Change the CPU weight/quota at run time (VirtualMachine.set_cpu_limits)."""
        return await self.vm.set_cpu_limits(weight=weight, max_percent=max_percent,
                                            clear_max_percent=clear_max_percent)

    # -- the task that owns the VM ------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                   ) -> None:
        """Build, start and run the VM until it stops. A failure to start is raised
        (before ``started``, so to :meth:`Host.create`); anything after that is recorded
        as the VM's exit and never raised into the Host's nursery."""
        structlog.contextvars.bind_contextvars(vm=self.id)
        started = False
        try:
            async with self._opener() as vm:
                self._vm = vm
                if self.config is not None and self.config.name:
                    self.name = self.config.name
                if self._stop_requested is not None:
                    vm.stop(self._stop_requested)
                if not self._start_paused and not self._incoming:
                    self._running_since = time.monotonic()
                started = True
                task_status.started()
                async with trio.open_nursery() as nursery:
                    self._tasks = nursery
                    if self._incoming:
                        # Its serial port is made with the machine, after the stream's
                        # config has come: the console is read from then on.
                        nursery.start_soon(self._wait_handover)
                    else:
                        nursery.start_soon(self._pump_console)
                    await self.vm.wait()
                    self._tasks = None
                # Stopped while a snapshot is being written (DELETE during a long
                # one): the writer reads guest memory and vCPU state in a worker
                # thread, so the VM is not released under it.
                await self._snapshot_done.wait()
            if self._vm is not None and self._vm.exit is None and self._failure is None:
                # An incoming VM stopped before its hand-over: it never ran.
                self._failure = VmExit(StopReason.STOPPED, 0, self._stop_requested
                                       or "stopped before its migration came in")
        except Exception as e:
            if not started:
                raise
            # A bug inside avmm while running this VM: this VM stops, with the reason.
            self._failure = VmExit(StopReason.ERROR, HOST_FAILURE_STATUS,
                                   f"{type(e).__name__}: {e}")
            self._log.exception("vm task failed")
        finally:
            if self._running_since is not None:
                self._stopped_at = time.monotonic()
            self._console.end()
            self._done.set()

    async def _wait_handover(self) -> None:
        """An incoming VM's uptime starts when it runs, after the hand-over (or when it
        is resumed, with start=False); its name may come with the streamed config."""
        state = await self.vm.wait_state(VmState.RUNNING, VmState.PAUSED)
        if state is VmState.STOPPED:
            return
        if self._given_config is None and self.vm.config.name:
            self.name = self.vm.config.name
        if state is VmState.RUNNING:
            self._running_since = time.monotonic()
        await self._pump_console()

    async def _pump_console(self) -> None:
        """Read the serial stream all the time: the guest never waits for a reader."""
        async for chunk in self.vm.serial:
            self._console.feed(chunk)


class Host:
    """Owns many VMs, each in its own task inside the Host's nursery; one VM's failure
    never touches another. Leaving ``async with`` stops every VM (disks flushed)."""

    def __init__(self, *, isolation: ProcessIsolation | None = None) -> None:
        #: With ``isolation``, each VM made by :meth:`create` runs in a jailed worker
        #: process of its own (``avmm serve --isolation process``); without, here.
        self.isolation = isolation
        self._spawner_scope = trio.CancelScope()
        self._vms: dict[str, Any] = {}
        #: Rate-limit groups shared by the VMs made by create() that name them (in
        #: shared memory when the VMs run in worker processes).
        self.rate_limit_groups = SharedGroups(across_processes=isolation is not None)
        self._nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._closing = False

    async def __aenter__(self) -> Host:
        if self._stack is not None:
            raise VmStateError("this Host was already entered; make a new one")
        # An exit stack rather than the nursery manager's __aenter__ by hand: the
        # nursery is entered and left as `async with` would.
        stack = contextlib.AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        if self.isolation is not None:
            # Workers are started by a process of their own (see avmm.isolation.spawner),
            # made now: before whoever entered this Host loads a seccomp filter.
            from .isolation.spawner import Spawner

            spawner = Spawner(fork=self.isolation.fork_workers,
                              worker_module=self.isolation.worker_module,
                              module_path=self.isolation.module_path)
            try:
                await self._nursery.start(self._run_spawner, spawner)
            except BaseException:
                self._nursery.cancel_scope.cancel()
                await stack.aclose()
                raise
            self.isolation.spawner = spawner
        return self

    async def _run_spawner(self, spawner: Any,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                           ) -> None:
        with self._spawner_scope:
            await spawner.run(task_status=task_status)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None,
                        traceback: types.TracebackType | None) -> bool:
        self._closing = True
        for hosted in self._vms.values():
            hosted.request_stop("the host is shutting down")
        if self.isolation is not None:
            # The workers end first (their status comes through the spawner), then the
            # spawner.
            with trio.CancelScope(shield=exc is None):
                for hosted in list(self._vms.values()):
                    await hosted.wait()
            self._spawner_scope.cancel()
        # The nursery waits for every VM's task, which returns once its VM has stopped.
        assert self._stack is not None
        try:
            return bool(await self._stack.__aexit__(exc_type, exc, traceback))
        finally:
            if self.rate_limit_groups.across_processes:
                self.rate_limit_groups.close()  # the groups' memory (the workers are gone)

    async def create(self, config: VmConfig, *, start: bool = True,
                     paths: PathPolicy | None = None, vm_id: str | None = None,
                     after_build: Callable[[], None] | None = None) -> Any:
        """Build and start a VM from ``config``; returns once it runs. With
        ``start=False`` it is built and left PAUSED before its first instruction
        (:meth:`HostedVm.resume` starts it). The files the config names are opened
        through ``paths`` (see :class:`~avmm.paths.PathPolicy`; default: anywhere).
        The VM is built in a worker thread: the event loop never waits for it.

        ``vm_id`` (a worker process: the id its daemon gave) and ``after_build`` (see
        :class:`~avmm.vm.VirtualMachine`) are for :mod:`avmm.isolation.worker`. With
        process isolation the result is a :class:`~avmm.isolation.worker_vm.WorkerVm`,
        which behaves as a :class:`HostedVm` does.

        :raises VmStartError: the VM cannot be built (the message names the step).
        :raises VmStateError: the Host is not entered, or is shutting down.
        """
        if self._nursery is None or self._closing:
            raise VmStateError("the host is not running (or is shutting down); it takes "
                               "no new VMs")
        if vm_id is None:
            vm_id = self._new_id()
        elif vm_id in self._vms:
            raise VmStateError(f"a VM with id {vm_id!r} exists already")
        hosted: Any
        if self.isolation is not None:
            from .isolation.worker_vm import WorkerVm

            hosted = WorkerVm(vm_id, config, start=start, paths=paths,
                              isolation=self.isolation,
                              rate_limit_groups=self.rate_limit_groups)
        else:
            hosted = HostedVm(vm_id, config, start_paused=not start, paths=paths,
                              rate_limit_groups=self.rate_limit_groups,
                              after_build=after_build)
        await self._start(hosted)
        return hosted

    async def restore(self, path: str | os.PathLike[str], *, start: bool = True,
                      copy_memory: bool = False,
                      vhost_user: Mapping[str, str | os.PathLike[str]] | None = None,
                      paths: PathPolicy | None = None,
                      adjust_config: Callable[[VmConfig], VmConfig] | None = None,
                      vm_id: str | None = None, dir_fd: int | None = None,
                      after_build: Callable[[], None] | None = None,
                      ) -> Any:
        """A new VM from the snapshot directory ``path`` (see
        :meth:`avmm.vm.VirtualMachine.restore`); returns once it runs, or, with
        ``start=False``, once it is built and PAUSED. ``vhost_user`` maps a vhost-user
        device's name to the socket of its back-end now. ``path``, those sockets and
        the files the snapshot's config names are opened through ``paths`` (default:
        anywhere): checked here first, for one-line errors naming the key, then opened
        (and the snapshot read through the directory's fd) by the VM's restore.
        ``adjust_config`` changes the saved config before the VM is built, as the
        daemon changes a config it is sent before :meth:`create` (its serial port).

        :raises PathNotAllowedError: a path lies outside the allowed directories.
        :raises HostFileError: ``path`` is not a directory that can be opened.
        :raises SnapshotError: the snapshot cannot be restored faithfully here (one line).
        :raises VmStartError: the VM cannot be built.
        :raises VmStateError: the Host is not entered, or is shutting down.
        """
        if self._nursery is None or self._closing:
            raise VmStateError("the host is not running (or is shutting down); it takes "
                               "no new VMs")
        policy = paths if paths is not None else PathPolicy()
        sockets = {name: os.fspath(path) for name, path in (vhost_user or {}).items()}
        if self.isolation is not None:
            from .isolation.worker_vm import WorkerVm

            restored = await WorkerVm.restoring(
                self._new_id(), path, start=start, copy_memory=copy_memory,
                vhost_user=sockets, paths=policy, adjust_config=adjust_config,
                isolation=self.isolation)
            await self._start(restored)
            log.info("vm restored", vm=restored.id, path=os.fspath(path),
                     state=restored.state.value)
            return restored

        def check_paths() -> None:
            for name, socket_path in sockets.items():
                policy.check(Path(socket_path), f"vhost_user.{name}", "socket")
            if dir_fd is None:
                os.close(policy.open_directory(Path(path), "restore"))

        await trio.to_thread.run_sync(check_paths)

        def opener() -> AbstractAsyncContextManager[VirtualMachine]:
            return VirtualMachine.restore(path, start_paused=not start,
                                          copy_memory=copy_memory,
                                          vhost_user=sockets or None, paths=policy,
                                          adjust_config=adjust_config, dir_fd=dir_fd,
                                          after_build=after_build)

        if vm_id is None:
            vm_id = self._new_id()
        hosted = HostedVm(vm_id, None, start_paused=not start, restore=opener)
        await self._start(hosted)
        log.info("vm restored", vm=hosted.id, path=os.fspath(path),
                 state=hosted.state.value)
        return hosted

    async def _start(self, hosted: HostedVm) -> None:
        self._vms[hosted.id] = hosted  # listed as STARTING while it builds
        try:
            assert self._nursery is not None
            await self._nursery.start(hosted._run)
        except BaseException:
            self._vms.pop(hosted.id, None)
            raise

    async def receive(self, listen: str, *, config: VmConfig | None = None,
                      start: bool = True, paths: PathPolicy | None = None,
                      accept_timeout_s: float | None = None, vm_id: str | None = None,
                      listening: socket.socket | Accepted | None = None,
                      after_build: Callable[[], None] | None = None,
                      adjust_config: Callable[[VmConfig], VmConfig] | None = None) -> Any:
        """A new VM that comes in by live migration: it listens at ``listen``
        (``unix:/abs/path``, a socket of mode 0600, or ``tcp:HOST:PORT``) for one
        migration stream (see :meth:`avmm.vm.VirtualMachine.receive`) and returns as
        soon as it listens, in state ``incoming``; it runs once the source has handed
        over (or stays paused with ``start=False``). A failed or cut stream ends it
        without ever running. ``config`` (optional) replaces the config the stream
        carries (the same devices, in kind and order, with this host's paths). The
        ``unix:`` path and the files ``config`` names go through ``paths``. With
        ``accept_timeout_s``, a VM that no source has connected to by then ends
        (failed; the socket released); without it, it waits until stopped. With process
        isolation and no ``config``, the daemon takes the source's connection and the
        stream's config itself, to plan the jail, before the worker starts (see
        :meth:`avmm.isolation.worker_vm.WorkerVm.receiving`).

        ``vm_id``, ``listening`` (see :meth:`avmm.vm.VirtualMachine.receive`),
        ``after_build`` and ``adjust_config`` are for :mod:`avmm.isolation.worker`.

        :raises PathNotAllowedError: the socket lies outside the allowed directories.
        :raises HostFileError: the socket cannot be bound there.
        :raises MigrationError: ``accept_timeout_s`` is not a positive number, or
            ``listen`` cannot be listened on.
        :raises VmStateError: the Host is not entered, or is shutting down.
        """
        if self._nursery is None or self._closing:
            raise VmStateError("the host is not running (or is shutting down); it takes "
                               "no new VMs")
        check_accept_timeout(accept_timeout_s)  # before anything is made
        policy = paths if paths is not None else PathPolicy()
        socket_path = unix_path(listen)
        if socket_path is not None and listening is None:
            await trio.to_thread.run_sync(policy.check, Path(socket_path), "listen", "bind")
        if self.isolation is not None:
            from .isolation.worker_vm import WorkerVm

            incoming = await WorkerVm.receiving(
                self._new_id(), listen, config=config, start=start, paths=policy,
                accept_timeout_s=accept_timeout_s, isolation=self.isolation)
            await self._start(incoming)
            log.info("vm incoming", vm=incoming.id, listen=listen)
            return incoming
        if vm_id is None:
            vm_id = self._new_id()
        # No name given: the VM goes on under the migrated VM's name (from the stream).
        name = config.name if config is not None else None

        def opener() -> AbstractAsyncContextManager[VirtualMachine]:
            return VirtualMachine.receive(listen, config=config, start=start,
                                          paths=policy, name=name,
                                          accept_timeout_s=accept_timeout_s,
                                          listening=listening, after_build=after_build,
                                          adjust_config=adjust_config)

        hosted = HostedVm(vm_id, config, start_paused=not start, restore=opener,
                          incoming=True)
        await self._start(hosted)
        log.info("vm incoming", vm=hosted.id, listen=listen)
        return hosted

    def get(self, vm_id: str) -> HostedVm:
        """:raises UnknownVmError: no such VM here."""
        try:
            return self._vms[vm_id]
        except KeyError:
            raise UnknownVmError(vm_id) from None

    def list(self) -> list[HostedVm]:
        """Every VM, in creation order."""
        return list(self._vms.values())

    async def remove(self, vm_id: str) -> bool:
        """Stop the VM (if it runs) and forget it. False if it was not known (so that a
        repeated DELETE is harmless)."""
        hosted = self._vms.get(vm_id)
        if hosted is None:
            await trio.lowlevel.checkpoint()
            return False
        await hosted.stop()
        if self._vms.get(vm_id) is hosted:
            del self._vms[vm_id]
        return True

    async def stop_all(self) -> None:
        """Stop every VM and wait until all have stopped."""
        hosted_vms = self.list()
        for hosted in hosted_vms:
            hosted.request_stop()
        for hosted in hosted_vms:
            await hosted.wait()
        await trio.lowlevel.checkpoint()

    def metrics(self) -> dict[str, VmMetrics]:
        """Every VM's counters, by id."""
        return {vm_id: hosted.metrics() for vm_id, hosted in self._vms.items()}

    def _new_id(self) -> str:
        while True:
            vm_id = f"vm-{secrets.token_hex(3)}"
            if vm_id not in self._vms:
                return vm_id


def config_to_dict(config: VmConfig) -> dict[str, Any]:
    """``config`` as JSON-able data with the ``vm.toml`` schema (keys whose value is
    unset are left out, as TOML has no null), so that
    ``config_from_dict(config_to_dict(c), base_dir=None)`` gives back an equal config."""
    machine = config.machine
    result: dict[str, Any] = {
        "machine": {
            "vcpus": machine.vcpus,
            "memory_mib": machine.memory_mib,
            "cpu_profile": machine.cpu_profile,
            "hide_cpu_features": list(machine.hide_cpu_features),
            "acpi": machine.acpi,
            **_without_none({
                "cpu_weight": machine.cpu_weight,
                "cpu_max_percent": machine.cpu_max_percent,
                "cpu_affinity": (None if machine.cpu_affinity is None
                                 else list(machine.cpu_affinity)),
                "vcpu_affinity": (None if machine.vcpu_affinity is None
                                  else [list(cpus) for cpus in machine.vcpu_affinity]),
            }),
        },
        "boot": _without_none({
            "kernel": str(config.boot.kernel),
            "initrd": _str_or_none(config.boot.initrd),
            "cmdline": config.boot.cmdline,
        }),
        "serial": _without_none({"mode": config.serial.mode,
                                 "path": _str_or_none(config.serial.path)}),
    }
    if config.name is not None:
        result["name"] = config.name
    if config.disks:
        result["disk"] = [_without_none({
            "path": _str_or_none(disk.path),
            "readonly": disk.readonly if disk.vhost_user is None else None,
            "id": disk.id,
            "vhost_user": _str_or_none(disk.vhost_user),
            "rate_limit": _limit_or_none(disk.rate_limit),
            "rate_limit_group": disk.rate_limit_group,
        }) for disk in config.disks]
    if config.nets:
        result["net"] = [_without_none({
            "tap": net.tap,
            "mac": None if net.mac is None else ":".join(f"{b:02x}" for b in net.mac),
            "netns": net.netns,
            "vhost_user": _str_or_none(net.vhost_user),
            "tx_rate_limit": _limit_or_none(net.tx_rate_limit),
            "rx_rate_limit": _limit_or_none(net.rx_rate_limit),
            "tx_rate_limit_group": net.tx_rate_limit_group,
            "rx_rate_limit_group": net.rx_rate_limit_group,
        }) for net in config.nets]
    if config.rng is not None:
        result["rng"] = {}
    if config.console is not None:
        result["console"] = _without_none({"mode": config.console.mode,
                                           "path": _str_or_none(config.console.path)})
    if config.vhost_users:
        result["vhost_user"] = [{
            "socket": str(generic.socket),
            "device_id": generic.device_id,
            "num_queues": generic.num_queues,
            "queue_size": generic.queue_size,
        } for generic in config.vhost_users]
    if config.rate_limit_groups:
        result["rate_limit_groups"] = {name: group.to_dict()
                                       for name, group in config.rate_limit_groups}
    return result


def _limit_or_none(limit: Any) -> dict[str, Any] | None:
    return None if limit is None else limit.to_dict()


#: The fields of a migration's progress that the API always shows (None until known).
MIGRATION_FIELDS = ("state", "round", "pages_sent", "pages_dirty", "bytes_sent",
                    "downtime_ms", "total_ms")


def migration_to_dict(progress: Any) -> dict[str, Any]:
    """A migration's progress (the engine's ``MigrationProgress``, a dataclass, or None)
    as JSON-able data: :data:`MIGRATION_FIELDS` first, then the engine's other scalar
    fields, then ``error``."""
    values: dict[str, Any] = {}
    if progress is not None:
        if dataclasses.is_dataclass(progress) and not isinstance(progress, type):
            values = {f.name: getattr(progress, f.name)
                      for f in dataclasses.fields(progress)}
        elif isinstance(progress, Mapping):
            values = dict(progress)
    result: dict[str, Any] = {name: _json_scalar(values.get(name))
                              for name in MIGRATION_FIELDS}
    for name, value in values.items():
        if name not in result and isinstance(value, str | int | float | bool | None):
            result[name] = _json_scalar(value)
    result.setdefault("error", None)
    return result


def _json_scalar(value: Any) -> Any:
    # Enums (a state as a StrEnum) as their value; everything else as it is.
    if isinstance(value, str):
        return str(value)
    return value


def unix_path(address: str) -> str | None:
    """The socket path of a ``unix:/path`` migration address, else None."""
    return address[len("unix:"):] if address.startswith("unix:") else None


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


#: The ``machine`` keys PATCH /vms/{id} can change while the VM runs (affinity is
#: fixed when the vCPU threads start).
RUNTIME_CPU_KEYS = ("cpu_weight", "cpu_max_percent")


def cpu_change(machine: dict[str, Any]) -> dict[str, Any]:
    """The :meth:`VirtualMachine.set_cpu_limits` arguments for a PATCH's ``machine``
    object, checked as the config checks them (``"cpu_max_percent": null`` removes the
    quota)."""
    from .config import check_cpu_limits

    for key in machine:
        if key not in RUNTIME_CPU_KEYS:
            raise LimitTargetError(
                f"machine.{key}: only {' and '.join(RUNTIME_CPU_KEYS)} can change while the "
                "VM runs (affinity is set when its vCPU threads start)",
                key=f"machine.{key}", status=400)
    weight = machine.get("cpu_weight")
    clear = "cpu_max_percent" in machine and machine["cpu_max_percent"] is None
    max_percent = machine.get("cpu_max_percent")
    check_cpu_limits(weight=weight, max_percent=max_percent)
    change: dict[str, Any] = {}
    if weight is not None:
        change["weight"] = weight
    if max_percent is not None:
        change["max_percent"] = max_percent
    if clear:
        change["clear_max_percent"] = True
    return change
