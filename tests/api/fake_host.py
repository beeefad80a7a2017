"""A Host with the interface of avmm.host.Host and no KVM behind it, for testing the HTTP
layer on any machine: VMs change state on request, the console echoes its input, and
``crash()`` ends a VM the way a triple fault would."""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from avmm.config import VmConfig
from avmm.errors import UnknownVmError, VmStartError, VmStateError
from avmm.host import config_to_dict, migration_to_dict, unix_path
from avmm.lifecycle import GUEST_FAILURE_STATUS, StopReason, VmExit, VmState
from avmm.paths import PathPolicy
from avmm.state import SnapshotError, SnapshotInfo

_ACTIVE = ("setup", "precopy", "stop-and-copy", "incoming", "receiving")


@dataclass
class FakeDeviceMetrics:
    kind: str
    requests: int
    bytes: int
    notifications: int


@dataclass
class FakeVmMetrics:
    state: VmState
    vcpu_exits: dict[str, int]
    devices: dict[str, FakeDeviceMetrics]


class FakeSubscription:
    def __init__(self, vm: FakeVm) -> None:
        self._vm = vm
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)
        if vm.backlog:
            self._send.send_nowait(bytes(vm.backlog))
        if vm.state is VmState.STOPPED:
            self._send.close()
        else:
            vm.subscribers.append(self._send)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        async for chunk in self._receive:
            yield chunk

    async def aclose(self) -> None:
        if self._send in self._vm.subscribers:
            self._vm.subscribers.remove(self._send)
        self._send.close()
        await self._receive.aclose()

    async def __aenter__(self) -> FakeSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class FakeVm:
    def __init__(self, vm_id: str, config: VmConfig | None) -> None:
        self.id = vm_id
        self.name = (config.name if config is not None else None) or vm_id
        self.config = config
        self.state: Any = VmState.RUNNING
        self.created_at = time.time()
        self.exit: VmExit | None = None
        self.backlog = bytearray(b"fake-guest: hello\n")
        self.subscribers: list[trio.MemorySendChannel[bytes]] = []
        self.received = bytearray()
        #: The latest migration's progress, as HostedVm.migration shows it.
        self.migration: dict[str, Any] | None = None
        #: (to, downtime_ms) of every migration begun.
        self.migrations: list[tuple[str, int]] = []
        #: Every PATCH /vms/{id} body accepted (LimitsUpdate).
        self.limit_updates: list[Any] = []

    @property
    def uptime_s(self) -> float | None:
        return 1.5

    async def pause(self) -> None:
        if self.state is not VmState.RUNNING:
            raise VmStateError(f"VM {self.id} is {self.state}; only a running VM can pause")
        self.state = VmState.PAUSED

    async def resume(self) -> None:
        if self.state is not VmState.PAUSED:
            raise VmStateError(f"VM {self.id} is {self.state}; only a paused VM can resume")
        self.state = VmState.RUNNING

    async def snapshot(self, path: str, *, paths: PathPolicy | None = None) -> SnapshotInfo:
        """Checks as the real one does, writes nothing."""
        if self.state is not VmState.PAUSED:
            raise VmStateError(f"VM {self.id} is {self.state}; pause it first")
        policy = paths if paths is not None else PathPolicy()
        target = await trio.to_thread.run_sync(policy.new_path, Path(path), "path")
        target.close()
        return SnapshotInfo(Path(path), bytes_state=1234, bytes_memory=4096,
                            duration_s=0.0125)

    async def start_migration(self, to: str, *, downtime_ms: int = 300,
                              paths: PathPolicy | None = None) -> None:
        """Checks as the real one does; the test moves it on (progress(), migrated(),
        fail_migration())."""
        if self.migration is not None and self.migration["state"] in _ACTIVE:
            raise VmStateError(f"VM {self.id!r} is already being migrated")
        if self.state is not VmState.RUNNING:
            raise VmStateError(f"VM {self.id!r} is {self.state}; only a running VM can be "
                               "migrated")
        path = unix_path(to)
        if path is not None and paths is not None:
            await trio.to_thread.run_sync(paths.check, Path(path), "to", "socket")
        self.migrations.append((to, downtime_ms))
        self.migration = migration_to_dict({"state": "setup", "round": 0, "pages_sent": 0,
                                            "pages_dirty": 0, "bytes_sent": 0,
                                            "total_ms": 0.0})

    def progress(self, **values: Any) -> None:
        assert self.migration is not None
        self.migration = {**self.migration, **values}

    def migrated(self, downtime_ms: float = 12.5) -> None:
        self.progress(state="completed", downtime_ms=downtime_ms)
        self._end(VmExit(StopReason.MIGRATED, 0, "migrated to the destination"))

    def fail_migration(self, error: str) -> None:
        self.progress(state="failed", error=error)

    async def stop(self) -> VmExit:
        self._end(VmExit(StopReason.STOPPED, 0, "stopped by the host"))
        assert self.exit is not None
        return self.exit

    def crash(self) -> None:
        self._end(VmExit(StopReason.TRIPLE_FAULT, GUEST_FAILURE_STATUS, "triple fault at rip"))

    def _end(self, vm_exit: VmExit) -> None:
        if self.state is VmState.STOPPED:
            return
        self.state = VmState.STOPPED
        self.exit = vm_exit
        for channel in self.subscribers:
            channel.close()
        self.subscribers.clear()

    def emit(self, data: bytes) -> None:
        self.backlog += data
        for channel in self.subscribers:
            channel.send_nowait(data)

    def rate_limit_waits(self) -> list[tuple[str, str, float]]:
        return []  # a fake VM has no devices, so no limiter ever made it wait

    def metrics(self) -> FakeVmMetrics:
        return FakeVmMetrics(self.state, {"io": 10, "mmio": 3, "hlt": 1},
                             {"blk0": FakeDeviceMetrics("blk", 4, 2048, 5)})

    def console_backlog(self) -> bytes:
        return bytes(self.backlog)

    def subscribe_console(self) -> FakeSubscription:
        return FakeSubscription(self)

    async def send_console(self, data: bytes) -> None:
        if self.state is VmState.STOPPED:
            raise VmStateError(f"VM {self.id} has stopped")
        self.received += data
        self.emit(data)  # a guest that echoes

    async def update_limits(self, update: Any) -> None:
        """What HostedVm.update_limits checks, without devices: ``machine`` keys and
        values, indexes against the config; every accepted change is recorded in
        ``limit_updates``."""
        from avmm.host import cpu_change
        from avmm.ratelimit import LimitTargetError

        if update.machine is not None:
            cpu_change(update.machine)
        for change in update.changes:
            devices = () if self.config is None else (
                self.config.disks if change.kind == "disk" else self.config.nets)
            if change.index >= len(devices):
                raise LimitTargetError(f"{change.key}: no such device", key=change.key)
        for name, _ in update.groups:
            raise LimitTargetError(f"rate_limit_groups.{name}: no such group",
                                   key=f"rate_limit_groups.{name}")
        self.limit_updates.append(update)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": str(self.state),
            "created_at": self.created_at,
            "uptime_s": self.uptime_s,
            "exit": None if self.exit is None else {
                "reason": str(self.exit.reason), "exit_status": self.exit.exit_status,
                "detail": self.exit.detail},
            "config": None if self.config is None else config_to_dict(self.config),
            "migration": self.migration,
            "isolation": "none",
            "pid": os.getpid(),
            "vcpu_threads": [],
            "cpu": None,
        }

    async def refresh(self) -> None:
        await trio.lowlevel.checkpoint()

    async def cpu_usage(self) -> None:
        return None


class FakeHost:
    def __init__(self) -> None:
        from avmm.ratelimit import SharedGroups

        self.vms: dict[str, FakeVm] = {}
        #: The daemon-wide rate-limit groups (PUT /rate_limit_groups/NAME).
        self.rate_limit_groups = SharedGroups()
        self._next = 1
        #: What restore() brings back from a directory holding a state.avmm file.
        self.restore_config: VmConfig | None = None
        self.restored: list[tuple[str, bool, bool, dict[str, str]]] = []
        #: (listen, config, start) of every receive().
        self.received: list[tuple[str, VmConfig | None, bool]] = []
        #: The accept_timeout_s of every receive().
        self.accept_timeouts: list[float | None] = []

    async def __aenter__(self) -> FakeHost:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_all()

    async def restore(self, path: str, *, start: bool = True, copy_memory: bool = False,
                      vhost_user: Mapping[str, str] | None = None,
                      paths: PathPolicy | None = None,
                      adjust_config: Callable[[VmConfig], VmConfig] | None = None,
                      ) -> FakeVm:
        """Checks the paths as the real one does; a directory with a state.avmm file
        restores ``restore_config`` (when set, changed by ``adjust_config`` as the real
        one does), anything else is not a snapshot."""
        policy = paths if paths is not None else PathPolicy()

        def check() -> None:
            for name, socket in (vhost_user or {}).items():
                policy.check(Path(socket), f"vhost_user.{name}", "socket")
            os.close(policy.open_directory(Path(path), "restore"))

        await trio.to_thread.run_sync(check)
        if self.restore_config is None or not (Path(path) / "state.avmm").is_file():
            raise SnapshotError(f"{path}: not a snapshot (it has no state.avmm)")
        self.restored.append((path, start, copy_memory, dict(vhost_user or {})))
        config = self.restore_config
        if adjust_config is not None:
            config = adjust_config(config)
        return await self.create(config, start=start)

    async def receive(self, listen: str, *, config: VmConfig | None = None,
                      start: bool = True, paths: PathPolicy | None = None,
                      accept_timeout_s: float | None = None) -> FakeVm:
        """Checks the socket path as the real one does; the VM stays incoming."""
        path = unix_path(listen)
        if path is not None:
            policy = paths if paths is not None else PathPolicy()
            await trio.to_thread.run_sync(policy.check, Path(path), "listen", "bind")
        self.received.append((listen, config, start))
        self.accept_timeouts.append(accept_timeout_s)
        vm = FakeVm(f"vm-{self._next:06x}", config)
        self._next += 1
        vm.state = VmState.INCOMING
        vm.migration = migration_to_dict({"state": "incoming"})
        self.vms[vm.id] = vm
        return vm

    async def create(self, config: VmConfig, *, start: bool = True,
                     paths: object = None) -> FakeVm:
        if config.name == "unbootable":
            raise VmStartError(config.name, "load the kernel", "not an ELF or bzImage")
        vm = FakeVm(f"vm-{self._next:06x}", config)
        if not start:
            vm.state = VmState.PAUSED
        self._next += 1
        self.vms[vm.id] = vm
        return vm

    def get(self, vm_id: str) -> FakeVm:
        try:
            return self.vms[vm_id]
        except KeyError:
            raise UnknownVmError(vm_id) from None

    def list(self) -> list[FakeVm]:
        return list(self.vms.values())

    async def remove(self, vm_id: str) -> bool:
        vm = self.vms.pop(vm_id, None)
        if vm is None:
            return False
        await vm.stop()
        return True

    async def stop_all(self) -> None:
        for vm in self.vms.values():
            await vm.stop()

    def metrics(self) -> dict[str, FakeVmMetrics]:
        return {vm.id: vm.metrics() for vm in self.vms.values()}
