"""``VirtualMachine``: one VM, built by a straight-line recipe and run in a trio nursery.

The recipe (``_build``) goes kvm → vm → memory → kernel → devices → vCPUs, and a failure
at any step becomes one :class:`VmStartError` naming the step, with everything built so
far released. The recipe runs in a worker thread (it opens files and sockets, reads the
kernel and may wait for a vhost-user back-end), never on the event loop; every file it
opens goes through a :class:`~avmm.paths.PathPolicy`. Running a VM means one nursery,
entered and left through an ``AsyncExitStack`` so that a failure half-way through
``__aenter__`` unwinds it in order: a task per vCPU, each owning the thread that
runs KVM_RUN. The VM ends when anything requests a stop (the guest through a device or
a vCPU exit, the host through :meth:`VirtualMachine.stop`, or cancellation); then every
vCPU is kicked out of KVM_RUN and joined before ``async with`` returns.

Pausing kicks every vCPU too, but a paused vCPU waits in its thread (``PauseControl`` in
:mod:`avmm.vcpu_loop`) instead of returning, and the devices' queues stop handing out
requests (``PauseGate``); :attr:`VirtualMachine.state` follows STARTING → RUNNING ⇄
PAUSED → STOPPING → STOPPED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import itertools
import os
import socket
import sys
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from .arch.x86 import layout
from .arch.x86.acpi import (
    ACPI_SLEEP_CONTROL_PORT,
    S5_SLEEP_TYPE,
    AcpiTables,
    build_acpi_tables,
)
from .arch.x86.cpuid import filter_cpuid
from .arch.x86.loader import load_kernel
from .bus import Bus
from .cgroups import CpuLimits, CpuUsage, StartGate, VmCpu, limits_from_machine
from .config import ConsoleConfig, NetConfig, VmConfig, check_cpu_limits
from .cpu_profile import ResolvedProfile, profile_cmdline, resolve_cpu_profile
from .devices.acpi_sleep import ACPI_SLEEP_PORT_COUNT, AcpiSleep
from .devices.boot_timer import BOOT_TIMER_PORT, BOOT_TIMER_PORT_COUNT, BootTimer
from .devices.debug_exit import DEBUG_EXIT_DEFAULT_PORT, DEBUG_EXIT_PORT_COUNT, DebugExit
from .devices.i8042 import I8042, I8042_BASE_PORT, I8042_PORT_COUNT
from .devices.serial import SERIAL_PORT_COUNT, Serial8250
from .errors import (
    AvmmError,
    BootError,
    ConfigError,
    GuestAddressError,
    HostFileError,
    KvmError,
    PathNotAllowedError,
    StateError,
    VmStartError,
    VmStateError,
    leaf_errors,
)
from .eventfd import signal_eventfd
from .isolation.syscalls import ThreadKind
from .kvm import Kvm, Vcpu, install_kick_handler
from .lifecycle import (
    HOST_FAILURE_STATUS,
    StopLatch,
    StopReason,
    VmExit,
    VmMetrics,
    VmState,
)
from .memory import MIB, GuestMemory
from .migration.errors import MigrationError
from .migration.progress import MigrationProgress
from .netns import call_in_netns
from .paths import BoundSocket, PathPolicy
from .ratelimit import DeviceLimits, SharedGroups
from .serial_port import SerialPort, serve_console_socket
from .state._errors import SnapshotError
from .threads import run_in_own_thread
from .vcpu_loop import PauseControl, VcpuLoop
from .virtio.device import DeviceId, PauseGate, VirtioDevice
from .vm_virtio import VIRTIO_MMIO_WINDOW, VirtioMmioSlot, VirtioSlotState, placements
from .x86_vcpu import apply_boot_state, configure_platform_state, wait_for_sipi

if TYPE_CHECKING:
    from .migration.transport import Accepted
    from .state import MachineState, Snapshot, SnapshotFiles, SnapshotInfo
    from .state.vm_state import LegacyDevicesState
    from .virtio.blk import BlockDevice

log = structlog.get_logger(__name__)

COM1_PORT = 0x3F8
COM1_IRQ = 4

_vm_numbers = itertools.count(1)

#: The build steps that open the serial port's output file and the virtio console's file
#: or socket (a daemon that opens them for a jailed worker fails with the same steps).
SERIAL_STEP = "setting up the serial port"
CONSOLE_STEP = "setting up the virtio console"


def tap_step(index: int, net: NetConfig) -> str:
    """The build step that opens NIC ``index``'s tap (a daemon that opens it for a
    jailed worker fails with the same step)."""
    return f"opening tap {net.tap!r} for net{index}"


def open_tap(net: NetConfig) -> Any:
    """The tap of a tap NIC (an :class:`avmm.tap.Tap`), opened in its network namespace
    when it names one. Blocks briefly (a thread enters the namespace).

    :raises TapError, NetnsError: it cannot be opened; the message says what to fix.
    """
    from .tap import Tap

    assert net.tap is not None
    if net.netns is None:
        return Tap.open(net.tap)
    return call_in_netns(net.netns, lambda name=net.tap: Tap.open(name))


def step_failed(vm: str, step: str, error: BaseException) -> VmStartError:
    """The start error of VM ``vm`` whose build ``step`` failed with ``error`` (a
    ConfigError shown as its key and reason)."""
    cause = f"{error.key}: {error.reason}" if isinstance(error, ConfigError) and error.key \
        else str(error)
    return VmStartError(vm, step, cause, error)

#: The state model's modules: a VM that boots needs none of them (only its devices'
#: state classes, in :mod:`avmm.state.codec`'s terms), so they are imported when a
#: snapshot, restore or migration first needs them (``avmm up`` pays for them only with
#: ``--restore``). The async paths import them in a worker thread (no file reads on the
#: event loop: :func:`state_model_imported`); a jailed worker imports them up front.
STATE_MODEL_MODULES = ("avmm.state.snapshot", "avmm.state.machine", "avmm.state.vm_state")


def import_state_model() -> None:
    """Import :data:`STATE_MODEL_MODULES` (blocking: call it from a worker thread, or
    before the event loop runs)."""
    for module in STATE_MODEL_MODULES:
        importlib.import_module(module)


async def imported_in_a_thread(*modules: str) -> None:
    """Import ``modules`` in a worker thread (no module files read on the event loop,
    where a daemon's other VMs and API clients wait), the first time only."""
    missing = [module for module in modules if module not in sys.modules]
    if missing:
        def load() -> None:
            for module in missing:
                importlib.import_module(module)

        await trio.to_thread.run_sync(load)


async def state_model_imported() -> None:
    """:func:`import_state_model` in a worker thread, the first time only."""
    await imported_in_a_thread(*STATE_MODEL_MODULES)


@dataclass(frozen=True)
class _RestorePlan:
    """What the recipe needs to build a VM from a snapshot instead of booting it."""

    snapshot: Snapshot | None  # None: the state came by a migration stream
    copy_memory: bool
    machine: MachineState
    devices: LegacyDevicesState
    virtio: list[VirtioSlotState]


class VirtualMachine:
    """A VM inside the caller's trio program.

    ::

        async with VirtualMachine(config) as vm:
            output = await vm.serial.receive_some()
            result = await vm.wait()

    Entering builds and starts the VM (raising :class:`VmStartError` if it cannot, with
    everything released); leaving stops it if it is still running and releases
    everything. Several VMs may run concurrently in one program; a failure inside one
    never touches another. ``paths`` says where the files the config names may be
    (``avmm serve --allow-path``); by default anywhere this process can reach.
    ``after_build`` runs on the event loop once everything is opened and before the
    first vCPU or device thread starts (a jailed worker drops its privileges and loads
    its seccomp filter there); if it raises, the start fails and everything is released.
    """

    def __init__(self, config: VmConfig, *, name: str | None = None,
                 start_paused: bool = False, paths: PathPolicy | None = None,
                 rate_limit_groups: SharedGroups | None = None,
                 after_build: Callable[[], None] | None = None) -> None:
        self.config = config
        self._after_build = after_build
        # The daemon's rate-limit groups, for devices whose group the config lacks.
        self._shared_limit_groups = rate_limit_groups
        self._paths = paths if paths is not None else PathPolicy()
        self.name = name or config.name or f"vm{next(_vm_numbers)}"
        # Pause/resume (see pause()): the vCPU side parks threads, the gate holds the
        # device tasks; the state event is replaced each time the state changes.
        self._start_paused = start_paused
        self._pause = PauseControl(config.machine.vcpus, on_change=self._notify_threadsafe)
        self._gate = PauseGate()
        self._paused = False
        self._running = False
        self._start_failed = False
        self._state_event = trio.Event()
        self._control_lock = trio.Lock()
        self._kvm_vm: Any = None
        self._paused_clock: int | None = None
        self._serial_port = SerialPort(sink_fds=())
        self._console_port: SerialPort | None = None
        self._latch = StopLatch(self._on_stop_requested)
        self._resources = contextlib.ExitStack()
        #: KVM's VM and guest RAM: plain fds and mappings, closed last (after everything
        #: that uses them) and, when the VM's context is left, in a worker thread: KVM
        #: tears a VM down inside close() (20-30 ms on kvm_pvm), which would stall every
        #: other VM and API client on the event loop.
        self._host_resources = contextlib.ExitStack()
        self._resources.callback(self._host_resources.close)
        self._stack: contextlib.AsyncExitStack | None = None
        self._console_listener: BoundSocket | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._finished = trio.Event()
        self._vcpus: list[Vcpu] = []
        self.virtio_slots: list[VirtioMmioSlot] = []
        #: The disks avmm serves itself (their fds are flushed at a snapshot and a stop).
        self._disks: list[BlockDevice] = []
        #: An incoming VM's vCPUs were let go after the source's COMMIT (_hand_over):
        #: from here the guest is this side's, whatever fails afterwards.
        self._handed_over = False
        self._devices_scope = trio.CancelScope()
        self._devices_done = trio.Event()
        self._loops: list[VcpuLoop] = []
        # CPU controls (avmm.cgroups): made again by _build from the config in force.
        self._cpu = VmCpu(self.name, limits_from_machine(config.machine))
        self.memory: GuestMemory | None = None
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.uart: Serial8250 | None = None
        self._i8042: I8042 | None = None
        self._debug_exit: DebugExit | None = None
        self._boot_timer: BootTimer | None = None
        self._acpi_sleep: AcpiSleep | None = None
        self._restore_plan: _RestorePlan | None = None
        # Live migration: a VM made by receive() is incoming until the hand-over; a VM
        # being migrated away refuses pause/resume/snapshot meanwhile.
        self._incoming = False
        self._migrating = False
        self._migration: MigrationProgress | None = None
        self._paused_for_migration = False
        self._named_on_receive = True
        self._receiving: trio.CancelScope | None = None  # an incoming VM's, see receive()
        self._log = log.bind(vm=self.name)
        self._started_at: float | None = None  # time.monotonic() when __aenter__ began
        self._userspace_reached = trio.Event()
        #: Seconds from the VM's start to the guest's boot-time marker (BootTimer), or None.
        self.userspace_reached_s: float | None = None
        #: The disks' and NICs' rate limiters (set when the devices are made).
        self.rate_limits = DeviceLimits()

    # -- public API ---------------------------------------------------------------------

    @property
    def serial(self) -> Any:
        """The guest's serial port as a trio byte stream (read output, send input)."""
        return self._serial_port.stream

    @property
    def console(self) -> Any:
        """The virtio console as a trio byte stream, or None without ``[console]``."""
        return self._console_port.stream if self._console_port is not None else None

    @property
    def exit(self) -> VmExit | None:
        """How the VM ended, or None while it runs."""
        return self._latch.exit if self._finished.is_set() else None

    def stop(self, detail: str = "stopped by the host") -> None:
        """Ask the VM to stop (idempotent; returns at once). ``wait()`` tells when it has."""
        self._latch.request(VmExit(StopReason.STOPPED, 0, detail))

    async def wait(self) -> VmExit:
        """Wait until the VM has stopped and every vCPU thread has finished."""
        await self._finished.wait()
        result = self._latch.exit
        assert result is not None
        return result

    async def wait_userspace(self) -> float:
        """Wait for the guest's boot-time marker (see :mod:`avmm.devices.boot_timer`);
        returns the seconds from the VM's start. Never returns for a guest that does not
        write it: use it beside :meth:`wait`, not instead of it."""
        await self._userspace_reached.wait()
        assert self.userspace_reached_s is not None
        return self.userspace_reached_s

    def vcpu_exit_counts(self) -> dict[str, int]:
        """KVM exits seen so far, by kind, summed over vCPUs."""
        total: dict[str, int] = {}
        for loop in self._loops:
            # A copy first: the vCPU thread may add a kind while we iterate.
            for kind, count in loop.exit_counts.copy().items():
                total[kind] = total.get(kind, 0) + count
        return total

    def metrics(self) -> VmMetrics:
        """The VM's counters now: state, vCPU exits by kind, per-device counters (see
        :class:`~avmm.lifecycle.DeviceMetrics` for what each counts)."""
        return VmMetrics(
            state=self.state,
            vcpu_exits=self.vcpu_exit_counts(),
            devices={slot.device.name: slot.metrics() for slot in self.virtio_slots},
        )

    @property
    def state(self) -> VmState:
        if self._finished.is_set() or self._start_failed:
            return VmState.STOPPED
        if self._incoming and not self._running:
            return VmState.INCOMING
        if self._latch.requested:
            return VmState.STOPPING
        if self._paused:
            return VmState.PAUSED
        if self._running:
            return VmState.RUNNING
        return VmState.STARTING

    async def wait_state(self, *states: VmState) -> VmState:
        """Wait until the VM is in one of ``states`` and return it. Returns STOPPED as
        soon as the VM has stopped, whatever was asked: nothing changes after that."""
        while True:
            state = self.state
            if state in states or state is VmState.STOPPED:
                await trio.lowlevel.checkpoint()
                return state
            await self._state_event.wait()

    async def pause(self) -> None:
        """Pause a running VM: every vCPU leaves KVM_RUN and waits in its thread, then
        every device stops (:meth:`VirtioMmioSlot.pause`: requests in flight finish,
        chains taken are given back, vhost-user rings are stopped with GET_VRING_BASE).
        Returns once the VM is quiescent: nothing writes guest memory or raises an
        interrupt until :meth:`resume`.

        :raises VmStateError: the VM is not running (already paused, starting, stopped),
            or it stopped while being paused.
        :raises DevicePauseError: a device could not be stopped; the VM runs on.
        """
        self._refuse_while_migrating("paused")
        async with self._control_lock:
            state = self.state
            if state is not VmState.RUNNING:
                raise VmStateError(f"VM {self.name!r} is {state.value}; only a running VM "
                                   "can be paused")
            await self._pause_now()
        self._log.info("vm paused")

    async def _pause_now(self) -> None:
        """The body of :meth:`pause` (the control lock held, the VM running)."""
        self._gate.close()
        self._pause.request()
        for vcpu in self._vcpus:
            vcpu.kick()
        try:
            await self._wait_parked()
            # The vCPUs are parked: no driver can kick, reset or activate a device
            # while the device tasks stop.
            for slot in self.virtio_slots:
                await slot.pause()
        except BaseException:
            # Cancelled, stopped or a device that did not stop, half-way: let
            # everything that paused go on.
            with trio.CancelScope(shield=True):
                for slot in self.virtio_slots:
                    await slot.resume()
            self._pause.resume()
            self._gate.open()
            raise
        self._paused = True
        self._paused_clock = self._read_kvm_clock()
        self._state_changed()

    async def resume(self) -> None:
        """Let a paused VM go on exactly where it stopped: the devices serve on from
        their queues' positions (vhost-user: SET_VRING_BASE with the saved position),
        then the vCPUs run.

        :raises VmStateError: the VM is not paused.
        """
        self._refuse_while_migrating("resumed")
        async with self._control_lock:
            state = self.state
            if state is not VmState.PAUSED:
                raise VmStateError(f"VM {self.name!r} is {state.value}; only a paused VM "
                                   "can be resumed")
            await self._resume_now()
        self._log.info("vm resumed")

    async def _resume_now(self) -> None:
        await self._resume_devices()
        self._continue()

    async def _resume_devices(self) -> None:
        """The devices serve again (a checkpoint per slot); the vCPUs stay parked until
        :meth:`_continue`."""
        self._gate.open()
        for slot in self.virtio_slots:
            await slot.resume()

    def _refuse_while_migrating(self, what: str) -> None:
        if self._migrating:
            raise VmStateError(f"VM {self.name!r} is being migrated; it cannot be {what} "
                               "until the migration ends")

    def _continue(self) -> None:
        # The guest's kvmclock goes on from where it was paused (as QEMU does), so the
        # guest does not see the pause as a jump of its monotonic clock.
        if self._paused_clock is not None:
            self._write_kvm_clock(self._paused_clock)
            self._paused_clock = None
        self._paused = False
        self._pause.resume()
        self._gate.open()
        self._state_changed()

    async def _wait_parked(self) -> None:
        while not self._pause.all_parked():
            if self._latch.requested:
                raise VmStateError(f"VM {self.name!r} stopped while it was being paused")
            await self._state_event.wait()

    def _state_changed(self) -> None:
        """Wake everyone waiting for a state change (event-loop thread only)."""
        event, self._state_event = self._state_event, trio.Event()
        event.set()

    def _notify_threadsafe(self) -> None:
        """Any thread: have the event loop run :meth:`_state_changed` soon."""
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._state_changed)
        except trio.RunFinishedError:  # pragma: no cover - the program is ending anyway
            pass

    def _read_kvm_clock(self) -> int | None:
        try:
            return _get_kvm_clock(self._kvm_vm)
        except (AvmmError, OSError) as e:
            self._log.debug("kvm clock not saved", error=str(e))
            return None

    def _write_kvm_clock(self, value: int) -> None:
        try:
            _set_kvm_clock(self._kvm_vm, value)
        except (AvmmError, OSError) as e:
            self._log.debug("kvm clock not restored", error=str(e))

    # -- snapshots ----------------------------------------------------------------------

    def config_with_limits(self, *, shared_as_own: bool = True) -> VmConfig:
        """:attr:`config` with the CPU controls and I/O rate limits in force now: changed
        at run time by :meth:`set_cpu_limits`, ``PATCH /vms/{id}`` or a daemon group's
        ``PUT`` (a device in a daemon group shows it as a group of the VM's own, with its
        buckets now; see :meth:`avmm.ratelimit.DeviceLimits.in_effect`). What a snapshot
        or a migration carries; ``GET /vms/{id}``'s ``config`` leaves the daemon's
        groups out (``shared_as_own=False``: its devices name them, as posted)."""
        config: VmConfig = self.rate_limits.in_effect(self.config,
                                                      shared_as_own=shared_as_own)
        cpu = self._cpu.limits
        machine = dataclasses.replace(
            config.machine, cpu_weight=cpu.weight, cpu_max_percent=cpu.max_percent,
            cpu_affinity=cpu.affinity, vcpu_affinity=cpu.vcpu_affinity)
        return dataclasses.replace(config, machine=machine)

    def _config_in_effect(self) -> VmConfig:
        """The config with what avmm derived filled in: a NIC's MAC derived from the VM's
        name would otherwise change when the snapshot is restored under another name,
        and the guest's driver would find a device that is not the one it knew. The
        limits are those in effect (:meth:`config_with_limits`), so that a snapshot or a
        migration carries them (avmm.state.vm_state)."""
        config = self.config_with_limits()
        nets = tuple(
            net if net.mac is not None else dataclasses.replace(net, mac=_derived_mac(
                self.name, str(net.tap if net.vhost_user is None else net.vhost_user)))
            for net in config.nets)
        return dataclasses.replace(config, nets=nets)

    async def snapshot(self, path: str | os.PathLike[str]) -> SnapshotInfo:
        """Save the paused VM into the new directory ``path`` (see README, "Snapshots"):
        its config, the KVM state (irqchip, PIT, kvmclock, every vCPU), each device's
        state and guest RAM. Writable disks are flushed (fdatasync) first; their contents
        stay where they are. The VM stays paused. The directory appears whole or not at
        all; its parent must exist and be allowed by the VM's path policy.

        :raises VmStateError: the VM is not paused.
        :raises SnapshotError: ``path`` exists, or the snapshot cannot be written (then
            nothing is left behind).
        """
        return await self._snapshot(functools.partial(self._write_snapshot, Path(path)))

    async def snapshot_into(self, files: SnapshotFiles,
                            path: str | os.PathLike[str]) -> SnapshotInfo:
        """Save the paused VM as :meth:`snapshot` does, into two open files someone
        else made (``avmm serve --isolation process``: the daemon makes the directory
        and the files, and renames or removes it; this VM, in its jailed worker, is
        handed the two files only). The fds stay open; ``path`` (what the directory
        will be called) is for the result and the log only: nothing is opened.

        :raises VmStateError: the VM is not paused.
        :raises SnapshotError: the files cannot be written.
        """
        return await self._snapshot(functools.partial(
            self._write_snapshot_files, files, Path(path)))

    async def _snapshot(self, write: Callable[[dict[str, Any]], SnapshotInfo]
                        ) -> SnapshotInfo:
        """What both ways of taking a snapshot share: the checks, the sections, the
        disks flushed and the KVM state saved; ``write`` (a worker thread) then writes
        the sections and guest RAM."""
        self._refuse_while_migrating("snapshotted")
        await state_model_imported()
        from .state.vm_state import VirtioDevicesState, config_to_state

        async with self._control_lock:
            state = self.state
            if state is not VmState.PAUSED:
                raise VmStateError(f"VM {self.name!r} is {state.value}; only a paused VM "
                                   "can be snapshotted (pause it first)")
            # The devices change only on vCPU threads (parked) and on this thread (the
            # virtio device tasks are stopped while paused): their state is taken here,
            # the blocking part (KVM ioctls, files) in a worker.
            sections: dict[str, Any] = {
                "config": config_to_state(self._config_in_effect()),
                "devices": self._save_legacy_devices(),
                "virtio": VirtioDevicesState(
                    slots=[slot.save_state() for slot in self.virtio_slots]),
            }
            info = await trio.to_thread.run_sync(self._save_and_write, write, sections)
        self._log.info("vm snapshotted", path=str(info.path), bytes_state=info.bytes_state,
                       bytes_memory=info.bytes_memory,
                       duration_ms=round(info.duration_s * 1000, 1))
        return info

    def _save_legacy_devices(self) -> LegacyDevicesState:
        from .state.vm_state import LegacyDevicesState

        assert self.uart is not None and self._i8042 is not None
        assert self._debug_exit is not None and self._boot_timer is not None
        return LegacyDevicesState(
            serial=self.uart.save_state(),
            i8042=self._i8042.save_state(),
            debug_exit=self._debug_exit.save_state(),
            boot_timer=self._boot_timer.save_state(),
            acpi_sleep=self._acpi_sleep.save_state() if self._acpi_sleep else None,
        )

    def _save_and_write(self, write: Callable[[dict[str, Any]], SnapshotInfo],
                        sections: dict[str, Any]) -> SnapshotInfo:
        """The blocking half of :meth:`_snapshot` (a worker thread; the vCPUs parked)."""
        started = time.monotonic()
        self._flush_disks_for_snapshot()
        sections["machine"] = self._save_machine()
        info = write(sections)
        return dataclasses.replace(info, duration_s=time.monotonic() - started)

    def _write_snapshot(self, path: Path, sections: dict[str, Any]) -> SnapshotInfo:
        path = Path(os.path.abspath(path))
        parent_fd = _open_snapshot_directory(self._paths, path.parent, "snapshot path")
        try:
            # Written inside the directory the policy opened (its fd), never by name.
            inside = Path(f"/proc/self/fd/{parent_fd}")
            from .state.snapshot import write_snapshot

            try:
                info = write_snapshot(inside / path.name, sections, self.memory)
            except SnapshotError as e:
                raise _renamed(e, inside, path.parent) from None
        finally:
            os.close(parent_fd)
        return dataclasses.replace(info, path=path)

    def _write_snapshot_files(self, files: SnapshotFiles, path: Path,
                              sections: dict[str, Any]) -> SnapshotInfo:
        from .state.snapshot import write_snapshot_files

        assert self.memory is not None  # a paused VM has its memory
        return write_snapshot_files(files, sections, self.memory, path=path)

    def _save_machine(self) -> MachineState:
        """The KVM state of the paused VM (a worker thread; the vCPUs parked)."""
        from .state.machine import save_machine

        unfinished = [loop.vcpu.id for loop in self._loops if loop.io_unfinished]
        if unfinished:
            raise SnapshotError(f"VM {self.name!r}: vCPU {unfinished[0]} kept making I/O "
                                "accesses while it paused; resume the VM and try again")
        try:
            # Each vCPU loop finished its last access before it parked.
            machine = save_machine(self._kvm_vm, self._vcpus, io_finished=True)
        except KvmError as e:
            raise SnapshotError(f"VM {self.name!r}: cannot save the KVM state: {e}") from e
        if self._paused_clock is not None:
            # The clock as it was when the VM paused: the guest sees no time pass while
            # it was paused or saved, as across a pause and resume.
            platform = machine.platform
            machine = dataclasses.replace(machine, platform=dataclasses.replace(
                platform, clock=dataclasses.replace(platform.clock,
                                                    clock=self._paused_clock)))
        return machine

    def _flush_disks_for_snapshot(self) -> None:
        """fdatasync every writable disk: a snapshot completes only with the guest's
        completed writes stable, since the disks are not part of it."""
        for device in self._disks:
            if not device.read_only and device.fd >= 0:
                try:
                    os.fdatasync(device.fd)
                except OSError as e:
                    raise SnapshotError(f"cannot flush {device.name} before the snapshot: "
                                        f"{e.strerror}") from None

    @classmethod
    @contextlib.asynccontextmanager
    async def restore(cls, path: str | os.PathLike[str], *, start_paused: bool = False,
                      copy_memory: bool = False,
                      vhost_user: Mapping[str, str] | None = None,
                      paths: PathPolicy | None = None,
                      name: str | None = None,
                      adjust_config: Callable[[VmConfig], VmConfig] | None = None,
                      dir_fd: int | None = None,
                      after_build: Callable[[], None] | None = None,
                      ) -> AsyncIterator[VirtualMachine]:
        """Bring back the VM saved in the snapshot directory ``path`` (see
        :meth:`snapshot`), as an async context manager like ``VirtualMachine(config)``::

            async with VirtualMachine.restore("/snapshots/one") as vm:
                result = await vm.wait()

        The VM is built from the saved config (its disks, taps and back-end sockets must
        be there again; ``vhost_user`` gives vhost-user devices new sockets by name, e.g.
        ``{"blk0": "/run/new.sock"}``), with guest RAM mapped copy-on-write from the
        memory file (the file must stay unchanged while the VM runs), or copied with
        ``copy_memory``. A VM with vhost-user devices always gets a copy: its back-ends
        map guest RAM's memfd, which a mapped file would bypass. No kernel is loaded:
        the guest goes on from where it was saved, or stays paused with
        ``start_paused`` until :meth:`resume`. ``adjust_config`` may change the saved
        config before the VM is built (the daemon's: a serial port on the API, not on
        its stdout). ``dir_fd``: the snapshot directory, opened by someone else (a
        jailed worker's daemon), used instead of opening ``path``, which then only
        names it in messages. ``after_build``: as for ``VirtualMachine(config)``.

        :raises SnapshotError: the snapshot is missing, damaged, of another format or
            does not fit together (one line naming the file);
            :class:`StateCompatibilityError`: this host cannot run it faithfully;
            :class:`DeviceStateError`: a device's saved state does not fit the device.
            Nothing is left running or allocated then.
        """
        policy = paths if paths is not None else PathPolicy()
        opened = await trio.to_thread.run_sync(open_snapshot, Path(path), policy,
                                               vhost_user, dir_fd)
        released = False
        try:
            config, snapshot = opened.config, opened.snapshot
            if adjust_config is not None:
                config = adjust_config(config)
            copy = copy_memory
            if not copy and _has_vhost_user(config):
                copy = True
                log.info("snapshot memory copied, not mapped: vhost-user back-ends map "
                         "guest RAM's memfd", path=str(path))
            if not copy and policy.restricted:
                # A daemon's client may truncate a file it can write: mapped, that
                # would kill the daemon with SIGBUS (see others_can_change_memory).
                from .state.snapshot import others_can_change_memory

                why = others_can_change_memory(snapshot)
                if why is not None:
                    copy = True
                    log.info("snapshot memory copied, not mapped", reason=why, path=str(path))

            def release() -> None:
                # What the build needed of the snapshot is read (a mapped memory file
                # stays mapped): its fds go. A jailed worker must hold no directory of
                # the host once its guest runs (openat with ".." walks out of a jail).
                nonlocal released
                if not released:
                    released = True
                    opened.snapshot.close()
                    os.close(opened.dirfd)

            def built() -> None:
                release()
                if after_build is not None:
                    after_build()

            vm = cls(config, name=name, start_paused=start_paused, paths=policy,
                     after_build=built)
            machine: MachineState = snapshot.sections["machine"]
            vm._restore_plan = _RestorePlan(snapshot=snapshot, copy_memory=copy,
                                            machine=machine,
                                            devices=snapshot.sections["devices"],
                                            virtio=snapshot.sections["virtio"].slots)
            if start_paused:
                # Resuming sets the kvmclock back to this: no time passes for the guest
                # between the snapshot and its resume.
                vm._paused_clock = machine.platform.clock.clock
            entered = False
            try:
                async with vm:
                    entered = True
                    yield vm
            except VmStartError as e:
                if entered or not isinstance(e.error, StateError):
                    raise
                error = _renamed(e.error, opened.inside, Path(path))
                raise type(error)(f"cannot restore {path}: {e.step}: {error}") from e
        finally:
            if not released:
                opened.snapshot.close()  # the memory file's fd (a mapping keeps the file)
                os.close(opened.dirfd)

    # -- live migration -----------------------------------------------------------------

    @property
    def migration(self) -> MigrationProgress | None:
        """The progress of this VM's last migration (outgoing, or incoming for a VM made
        by :meth:`receive`), or None; kept after the VM stops."""
        return self._migration

    def _set_migration(self, progress: MigrationProgress) -> None:
        self._migration = progress

    async def migrate(self, to: str, *, downtime_ms: int = 300, on_timeout: str = "pause",
                      max_rounds: int = 30, timeout_s: float | None = None,
                      connected: socket.socket | None = None) -> MigrationProgress:
        """Move the running guest to a destination listening at ``to`` (``unix:/abs/path``
        or ``tcp:HOST:PORT``; see :meth:`receive` and README, "Live migration").

        Pre-copy rounds send RAM while the guest runs, until what is left would take
        less than ``downtime_ms`` to send; if ``max_rounds`` or ``timeout_s`` comes
        first, ``on_timeout="pause"`` pauses the guest and finishes anyway, ``"abort"``
        gives up. Then the guest pauses, the last pages and its state are sent, and once
        the destination acknowledges, this VM stops with
        :attr:`~avmm.lifecycle.StopReason.MIGRATED`. A paused VM stays paused through
        the pre-copy. :attr:`migration` shows the progress meanwhile.

        :raises MigrationError: bad arguments, a VM that cannot be migrated (not running
            or paused, vhost-user back-ends without dirty logging), or any failure on
            the way (the stream cut, the destination refusing, a timeout): the VM then
            runs on here as before (resumed if it was paused for the hand-over).
            :class:`~avmm.migration.HandOverUnconfirmed` (a ``MigrationError``): COMMIT
            went out but the destination never said the guest runs there; this VM
            stays paused (the guest may run there, so it is never resumed here by
            itself), for the caller to :meth:`resume` once it knows it does not.
        """
        await imported_in_a_thread("avmm.migration.source", "avmm.migration.transport")
        from .migration.source import Options, Source
        from .migration.transport import parse_address

        options = Options(downtime_ms=downtime_ms, on_timeout=on_timeout,
                          max_rounds=max_rounds, timeout_s=timeout_s)
        options.check()
        address = parse_address(to)
        # Asked before the lock (a running migration holds it to its end) and again
        # with it (a pause or stop may have been under way).
        self._refuse_migration()
        async with self._control_lock:
            self._refuse_migration()
            self._migrating = True
            self._paused_for_migration = False
            try:
                return await Source(self, address, options, self._set_migration,
                                    connected=connected).run()
            finally:
                self._migrating = False

    def _refuse_migration(self) -> None:
        problem = self.migration_problem()
        if problem is not None:
            raise MigrationError(f"VM {self.name!r} cannot be migrated: {problem}")

    def migration_problem(self) -> str | None:
        """Why this VM cannot be migrated now, in one line, or None if it can: it is
        not running or paused, it is already being migrated, or a vhost-user back-end
        cannot log the writes it makes into guest memory. :meth:`migrate` refuses with
        this reason before anything starts; a manager can ask first (the daemon answers
        ``POST /vms/{id}/migrate`` with it)."""
        from .vhost.frontend import VhostUserDevice

        if self._migrating:
            return "it is already being migrated"
        state = self.state
        if state not in (VmState.RUNNING, VmState.PAUSED):
            return f"it is {state.value}; only a running or paused VM can be migrated"
        for slot in self.virtio_slots:
            device = slot.device
            if isinstance(device, VhostUserDevice):
                why = device.dirty_log_problem()
                if why is not None:
                    return why
        return None

    def _migration_config(self) -> bytes:
        """The CONFIG frame's payload: the config in effect (derived MACs included)."""
        from .state.codec import encode
        from .state.vm_state import config_to_state

        # With this VM's name: a destination given none goes on under it.
        config = dataclasses.replace(self._config_in_effect(), name=self.name)
        return encode(config_to_state(config))

    def _migration_running(self) -> bool:
        """False once a stop was requested: the migration must give up."""
        return not self._latch.requested

    async def _migration_pause(self) -> None:
        """Pause for the stop-and-copy (the control lock is held by :meth:`migrate`)."""
        if self._paused:
            return  # paused before the migration: it stays so, here or there
        try:
            await self._pause_now()
        except VmStateError as e:
            raise MigrationError(str(e)) from None
        self._paused_for_migration = True
        self._log.info("vm paused for the hand-over")

    async def _migration_resume(self) -> None:
        """After a failed stop-and-copy: let the guest go on here."""
        if self._paused_for_migration and self.state is VmState.PAUSED:
            self._paused_for_migration = False
            await self._resume_now()
            self._log.info("vm resumed after a failed migration")

    async def _migration_state(self) -> dict[str, Any]:
        """The STATE frame's sections (the VM paused): the snapshot's machine, legacy
        devices and virtio devices. Writable disks are flushed first: the destination
        opens the same images (shared storage)."""
        await state_model_imported()
        from .state.vm_state import VirtioDevicesState

        sections: dict[str, Any] = {
            "devices": self._save_legacy_devices(),
            "virtio": VirtioDevicesState(
                slots=[slot.save_state() for slot in self.virtio_slots]),
        }

        def blocking() -> MachineState:
            self._flush_disks_for_snapshot()
            return self._save_machine()

        try:
            sections["machine"] = await trio.to_thread.run_sync(blocking)
        except StateError as e:
            raise MigrationError(str(e)) from None
        return {"machine": sections["machine"], "devices": sections["devices"],
                "virtio": sections["virtio"]}

    def _migration_handover(self, detail: str) -> None:
        """The destination has the guest: stop here for good (the vCPUs, parked, leave
        without running it again)."""
        self._latch.request(VmExit(StopReason.MIGRATED, 0, detail))

    @classmethod
    @contextlib.asynccontextmanager
    async def receive(cls, listen: str, *, config: VmConfig | None = None,
                      start: bool = True, paths: PathPolicy | None = None,
                      name: str | None = None, accept_timeout_s: float | None = None,
                      listening: socket.socket | Accepted | None = None,
                      after_build: Callable[[], None] | None = None,
                      adjust_config: Callable[[VmConfig], VmConfig] | None = None,
                      ) -> AsyncIterator[VirtualMachine]:
        """Receive a migrating VM (see :meth:`migrate`), as an async context manager
        like ``VirtualMachine(config)``::

            async with VirtualMachine.receive("unix:/run/avmm/in.sock") as vm:
                result = await vm.wait()

        Entering returns as soon as ``listen`` (``unix:/abs/path``, created mode 0600,
        or ``tcp:HOST:PORT``; port 0 picks one, see ``vm.migration.address``) listens;
        the VM is :attr:`~avmm.lifecycle.VmState.INCOMING`. It accepts one connection,
        builds the machine from the streamed config (or from ``config``, whose devices
        must match in kind and order: new disk paths, taps, back-end sockets), receives
        RAM and state and runs the guest once the source has let go — or keeps it paused
        with ``start=False``. A failed or cut stream ends the VM without it ever running:
        ``vm.exit`` says why (reason "error"). So does ``accept_timeout_s`` (seconds;
        None, the default, waits as long as it takes) when no source has connected by
        then: it stops listening (a ``unix:`` socket file is removed). :meth:`stop`
        ends it at once before the hand-over (reason "stopped"; a source already
        sending is told the destination refused).

        ``listening``: a socket already listening at ``listen`` (a jailed worker's
        daemon bound it; it is used, not made), or the source's connection already
        accepted there, with the bytes read of it (:class:`~avmm.migration.transport.
        Accepted`: the daemon read the stream's config to plan the jail; they are read
        again here, first). ``after_build``: as for ``VirtualMachine(config)``, here once
        the stream's config has built the machine, before the first page is taken in.
        ``adjust_config`` changes (or refuses, raising an AvmmError) the config to build,
        once the stream has brought it.

        :raises MigrationError: ``listen`` is malformed or cannot be listened on, or
            ``accept_timeout_s`` is not a positive number.
        """
        await imported_in_a_thread("avmm.migration.destination", "avmm.migration.transport")
        from .migration.destination import Destination
        from .migration.transport import (
            Accepted,
            Listener,
            check_accept_timeout,
            parse_address,
        )
        from .migration.transport import listen as listen_on

        address = parse_address(listen, listen=True)
        accept_timeout_s = check_accept_timeout(accept_timeout_s)
        policy = paths if paths is not None else PathPolicy()
        vm = cls(config if config is not None else _incoming_placeholder(), name=name,
                 start_paused=not start, paths=policy, after_build=after_build)
        vm._incoming = True
        vm._named_on_receive = name is not None or (config is not None
                                                    and config.name is not None)
        vm._token = trio.lowlevel.current_trio_token()
        vm._started_at = time.monotonic()
        listener: Listener | Accepted
        if isinstance(listening, Accepted):
            listener = listening
        elif listening is not None:
            listener = Listener(address, listening, None, accept_timeout_s)
        else:
            listener = await trio.to_thread.run_sync(functools.partial(
                listen_on, address, policy, accept_timeout_s=accept_timeout_s))
        destination = Destination(vm, listener, config, vm._set_migration,
                                  adjust=adjust_config)
        vm._set_migration(destination.progress)
        # stop() before the hand-over ends the wait for (or the reception of) the stream.
        vm._receiving = destination.receiving
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(destination.run)
                try:
                    yield vm
                finally:
                    vm._latch.request(VmExit(StopReason.STOPPED, 0,
                                             "the VM's context was left"))
                    destination.receiving.cancel()
        finally:
            listener.close()

    def _prepare_incoming(self, config: VmConfig) -> None:
        """The destination has the config: this is the machine to build. An incoming VM
        that was given no name takes the migrating VM's (its config's) name."""
        if not self._named_on_receive and config.name:
            self.name = config.name
            self._log = log.bind(vm=self.name)
        self.config = config
        self._pause = PauseControl(config.machine.vcpus, on_change=self._notify_threadsafe)

    def _restore_incoming(self, sections: Mapping[str, Any]) -> None:
        """Load the streamed state into the machine built for it (a worker thread)."""
        machine: MachineState = sections["machine"]
        plan = _RestorePlan(snapshot=None, copy_memory=False, machine=machine,
                            devices=sections["devices"], virtio=sections["virtio"].slots)
        if len(machine.vcpus) != len(self._vcpus):
            raise MigrationError(f"the streamed state has {len(machine.vcpus)} vCPUs, the "
                                 f"streamed config {len(self._vcpus)}")
        # Guest RAM goes to KVM only now that the stream has filled it: on some hosts a
        # first write to a page KVM maps costs several times more (see
        # avmm.migration.destination).
        assert self.memory is not None
        self._register_memory(self._kvm_vm, self.memory)
        self._restore_state(self._kvm_vm, plan)
        # From here the VM's start serves the restored (paused) slots, as after restore().
        self._restore_plan = plan
        if self._start_paused:
            self._paused_clock = machine.platform.clock.clock

    def _migration_failed(self, detail: str) -> None:
        """An incoming VM whose migration failed: stopped, never run (its resources are
        released by the caller)."""
        self._start_failed = True
        self._vcpus.clear()  # closed with the resources (if not yet): nothing to kick
        self._latch.request(VmExit(StopReason.ERROR, HOST_FAILURE_STATUS, detail))
        self._serial_port.close()  # readers of vm.serial see its end
        self._finished.set()
        self._state_changed()

    # -- lifetime -----------------------------------------------------------------------

    async def __aenter__(self) -> VirtualMachine:
        if self._started_at is not None:
            raise VmStateError(f"VM {self.name!r} was already started; make a new one")
        self._token = trio.lowlevel.current_trio_token()
        self._started_at = time.monotonic()
        try:
            # Opening files, reading the kernel, connecting to back-ends: a worker
            # thread, so that a slow disk or a peer that does not answer never stalls
            # the event loop (and the other VMs and API clients on it).
            await trio.to_thread.run_sync(self._build)
            if self._after_build is not None:
                with self._step("after the build"):
                    self._after_build()
        except BaseException:
            self._start_failed = True
            self._resources.close()
            raise
        return await self._start_built()

    async def _start_built(self, *, parked: bool = False) -> VirtualMachine:
        """The second half of :meth:`__aenter__`: run the machine ``_build`` made (the
        caller's task owns the VM's nursery from here; leave with :meth:`__aexit__` in
        the same task).

        ``parked`` (an incoming VM, before the source's COMMIT): start the device tasks
        and the vCPU threads as a paused start does (every vCPU parks before its first
        KVM_RUN, restored slots stay paused: the guest runs no instruction and no device
        writes its memory), but the VM stays :attr:`~VmState.INCOMING`: nothing but
        :meth:`_hand_over` lets it go, and :meth:`_end_parked` ends it unrun."""
        paused = self._start_paused or parked
        stack = contextlib.AsyncExitStack()
        stack.push_async_callback(self._release)  # last out: after the nursery has left
        # Before anything is released: a snapshot still writing from a worker thread
        # (it holds the control lock) reads the vCPUs and guest memory until it is done.
        stack.push_async_callback(self._wait_for_control)
        try:
            nursery = await stack.enter_async_context(trio.open_nursery())
            try:
                with self._step("starting the device tasks"):
                    await nursery.start(self._run_devices)
                    if self._restore_plan is not None and not paused:
                        # Restored slots are paused (restore_state): serve them from
                        # their saved positions before the vCPUs run.
                        for slot in self.virtio_slots:
                            await slot.resume()
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
        except BaseException:
            self._start_failed = True
            # Leave the nursery (nothing runs in it now) and release everything before
            # the error goes up: __aenter__ never returns with a nursery entered.
            # (No shield here: a cancel scope opened now would sit inside the nursery.)
            await stack.aclose()
            raise
        self._stack = stack
        if paused:
            # immediate_exit before the first KVM_RUN (set here, before any vCPU thread
            # exists): each vCPU parks before the guest runs a single instruction, so
            # the VM counts as paused from here on.
            self._gate.close()
            self._pause.request()
            for vcpu in self._vcpus:
                vcpu.kick()
            self._paused = True
        nursery.start_soon(self._supervise)
        if not parked:
            # A parked VM stays INCOMING (state) until _hand_over: pause(), resume(),
            # snapshots and migrations refuse it meanwhile.
            self._running = True
        self._state_changed()
        self._log.info("vm started", vcpus=len(self._vcpus),
                       memory_mib=self.config.machine.memory_mib, paused=self._paused,
                       parked_until_handover=parked)
        return self

    async def _hand_over(self) -> None:
        """An incoming VM started ``parked`` (:meth:`_start_built`) has the source's
        COMMIT: let it go, as :meth:`resume` does (the restored slots serve from their
        saved positions, then the vCPUs run), or, received with ``start=False``, leave
        it paused. The VM is RUNNING (PAUSED) from here.

        :raises VmStateError: the VM stopped before (a stop requested meanwhile, or a
            vCPU thread that could not be placed): no vCPU ran the guest. Once
            :attr:`_handed_over` is set the guest is this side's, whatever is raised.
        """
        async with self._control_lock:
            self._refuse_if_stopped_before_hand_over()
            if not self._start_paused:
                await self._resume_devices()
                # Again, with no checkpoint from here to the vCPUs' release: a stop that
                # came while the slots resumed has kept every vCPU parked (each leaves
                # on the stop), and the source must hear that nothing ran here.
                self._refuse_if_stopped_before_hand_over()
                self._continue()
            self._handed_over = True
            # Only now: INCOMING until here (a task waiting for RUNNING or PAUSED, such
            # as the host's uptime, must not see the hand-over half done).
            self._running = True
            self._state_changed()
        self._log.info("vm handed over", paused=self._paused)

    def _refuse_if_stopped_before_hand_over(self) -> None:
        if self._latch.requested:
            vm_exit = self._latch.exit
            raise VmStateError(f"VM {self.name!r} stopped before the hand-over"
                               + (f" ({vm_exit.detail})" if vm_exit and vm_exit.detail
                                  else ""))

    async def _end_parked(self, detail: str) -> None:
        """An incoming VM started ``parked`` whose hand-over will not come: stop it with
        :attr:`~StopReason.ERROR` and ``detail`` (unless a stop was requested before:
        the first reason stays), its parked vCPUs leaving without running the guest, and
        release everything (in the caller's task, which owns the VM's nursery; no
        shield around it: a cancel scope opened now would sit inside the nursery; a
        cancelled caller still waits for the vCPU threads and releases everything)."""
        self._latch.request(VmExit(StopReason.ERROR, HOST_FAILURE_STATUS, detail))
        await self.__aexit__(None, None, None)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> bool:
        self._latch.request(VmExit(StopReason.STOPPED, 0, "the VM's context was left"))
        assert self._stack is not None
        return bool(await self._stack.__aexit__(exc_type, exc, traceback))

    async def _release(self) -> None:
        """Release what the build acquired: devices, fds and trio objects here, then
        KVM's VM and guest RAM in a worker thread (see ``_host_resources``)."""
        host = self._host_resources.pop_all()  # _resources.close() then skips them
        try:
            self._resources.close()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(host.close)

    async def _wait_for_control(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._control_lock:
                pass

    # -- the recipe ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, step: str) -> Iterator[None]:
        try:
            yield
        except VmStartError:
            raise
        except (AvmmError, OSError) as e:
            raise self._start_error(step, e) from e
        except BaseExceptionGroup as group:
            # A step that starts tasks gets its errors wrapped by their nursery.
            errors = leaf_errors(group)
            if not all(isinstance(error, AvmmError | OSError) for error in errors):
                raise
            first = errors[0]
            if isinstance(first, VmStartError):
                raise first from group
            raise self._start_error(step, first) from group

    def _start_error(self, step: str, error: BaseException) -> VmStartError:
        return step_failed(self.name, step, error)

    def _build(self) -> None:
        """The recipe; runs in a worker thread (see __aenter__). Everything it acquires
        is registered on ``self._resources`` at once, so a failure at any step (or an
        exception from outside, such as a KeyboardInterrupt) releases it all."""
        config = self.config
        resources = self._resources
        plan = self._restore_plan
        with self._step("opening /dev/kvm"):
            kvm = Kvm()
            self._host_resources.callback(kvm.close)
            missing = kvm.missing_capabilities()
            if missing:
                raise VmStartError(self.name, "checking KVM capabilities",
                                   "this host's KVM lacks " + ", ".join(missing))
            if config.machine.vcpus > kvm.max_vcpus():
                raise VmStartError(self.name, "checking machine.vcpus",
                                   f"{config.machine.vcpus} vCPUs asked, this host's KVM "
                                   f"allows at most {kvm.max_vcpus()}")
            install_kick_handler()
        with self._step("creating the KVM VM"):
            vm = kvm.create_vm()
            self._host_resources.callback(vm.close)
            vm.set_tss_address(layout.KVM_TSS_ADDRESS)
            vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDRESS)
            vm.create_irqchip()
            vm.create_pit2()
            self._kvm_vm = vm
        with self._step(f"allocating {config.machine.memory_mib} MiB of guest memory"):
            memory = GuestMemory(config.machine.memory_mib * MIB, name=f"avmm-{self.name}")
            self._host_resources.callback(memory.close)
            self.memory = memory
        if plan is not None:
            # Before the KVM memory slots exist: the file is mapped over the memory's own
            # mapping, so every address handed out from here on is the restored RAM.
            from .state.snapshot import load_memory

            with self._step("loading the snapshot's guest memory"):
                load_memory(plan.snapshot, memory, copy=plan.copy_memory)
        if not self._incoming:
            self._register_memory(vm, memory)
        devices = self._make_virtio_devices()
        with self._step("placing the virtio devices"):
            for device, placement in zip(devices, placements(len(devices)), strict=True):
                slot = VirtioMmioSlot(vm=vm, memory=memory, device=device,
                                      placement=placement, token=self._token_or_fail(),
                                      gate=self._gate)
                resources.callback(slot.close)
                self.virtio_slots.append(slot)
                self.mmio_bus.insert(slot.transport, placement.base, 0x1000, name=device.name)
        # A restored VM loads no kernel: its RAM, registers and devices are the saved ones.
        # Neither does an incoming VM: its RAM and state come by the migration stream.
        boot = self._load_kernel(memory) if plan is None and not self._incoming else None
        self._make_legacy_devices(vm)
        self._make_vcpus(kvm, vm, boot)
        with self._step("applying the CPU controls"):
            # Before any vCPU runs, so that a host that cannot apply them refuses the VM.
            # _supervise releases the cgroup once the vCPU threads are gone; this is for
            # a start that fails before.
            self._cpu = VmCpu(self.name, limits_from_machine(config.machine))
            resources.callback(self._cpu.release)
            self._cpu.prepare()
        if plan is not None:
            self._restore_state(vm, plan)

    def _register_memory(self, vm: Any, memory: GuestMemory) -> None:
        with self._step("registering guest memory with KVM"):
            for slot, region in enumerate(memory.regions):
                vm.set_user_memory_region(slot, region.guest_address, region.size,
                                          memory.host_address(region))

    def _restore_state(self, vm: Any, plan: _RestorePlan) -> None:
        """Load the saved state into the freshly built machine, in the order its parts
        depend on each other: irqchip and PIT, then the vCPUs (restore_machine), then the
        UART (after the irqchip and its irqfd: it pulses an interrupt it still owes, which
        a later KVM_SET_IRQCHIP would erase), then the other legacy devices."""
        from .state.machine import restore_machine

        with self._step("restoring the machine state (irqchip, PIT, vCPUs)"):
            restore_machine(vm, self._vcpus, plan.machine)
        with self._step("restoring the legacy devices' state"):
            devices = plan.devices
            if (devices.acpi_sleep is None) != (self._acpi_sleep is None):
                raise SnapshotError("the saved ACPI sleep device does not match the saved "
                                    "config's machine.acpi")
            assert self.uart is not None and self._i8042 is not None
            assert self._debug_exit is not None and self._boot_timer is not None
            self.uart.restore_state(devices.serial)
            self._i8042.restore_state(devices.i8042)
            self._debug_exit.restore_state(devices.debug_exit)
            self._boot_timer.restore_state(devices.boot_timer)
            if self._acpi_sleep is not None and devices.acpi_sleep is not None:
                self._acpi_sleep.restore_state(devices.acpi_sleep)
        with self._step("restoring the virtio devices' state"):
            saved = [state.name for state in plan.virtio]
            built = [slot.device.name for slot in self.virtio_slots]
            if saved != built:
                raise SnapshotError(f"the snapshot holds the virtio devices {saved}, its "
                                    f"config makes {built}")
            # Each slot stays paused: the VM's start (or resume) serves it from there.
            for slot, state in zip(self.virtio_slots, plan.virtio, strict=True):
                slot.restore_state(state)

    def _load_kernel(self, memory: GuestMemory) -> tuple[Any, ResolvedProfile]:
        """Put the kernel, initrd, command line and ACPI tables in guest memory; the
        boot CPU's entry state and the CPU profile chosen."""
        config = self.config
        profile = resolve_cpu_profile(config.machine.cpu_profile)
        if profile != config.machine.cpu_profile:
            self._log.info("cpu profile chosen", cpu_profile=profile,
                           why="this host's KVM needs it" if profile == "compat" else "")
        cmdline = kernel_cmdline(config, self.virtio_slots, profile)
        with self._step("building the ACPI tables"):
            acpi = acpi_tables(config, self.virtio_slots) if config.machine.acpi else None
        ram_limit = (f"the guest's {config.machine.memory_mib} MiB of RAM; give it more "
                     "(machine.memory_mib)")
        with self._step(f"loading the kernel {config.boot.kernel}"):
            # Read through the policy (regular files only, at most the guest's RAM), so
            # that neither a FIFO nor a huge file is ever read without bound.
            kernel_data = self._paths.read_file(config.boot.kernel, "boot.kernel",
                                                max_size=memory.size, limit_text=ram_limit)
            initrd_data = None
            if config.boot.initrd is not None:
                initrd_data = self._paths.read_file(config.boot.initrd, "boot.initrd",
                                                    max_size=memory.size,
                                                    limit_text=ram_limit)
            kernel_load = load_kernel(memory, kernel_data, cmdline=cmdline,
                                      initrd=initrd_data, acpi=acpi,
                                      kernel_name=str(config.boot.kernel),
                                      initrd_name=str(config.boot.initrd),
                                      cmdline_note=_cmdline_note(config, profile,
                                                                 self.virtio_slots))
            del kernel_data, initrd_data
            self._log.info("kernel loaded", kernel=str(config.boot.kernel),
                           acpi_rsdp=kernel_load.log_fields().get("acpi_rsdp"))
        return kernel_load.cpu, profile

    def _make_legacy_devices(self, vm: Any) -> None:
        config = self.config
        resources = self._resources
        with self._step(SERIAL_STEP):
            if self._incoming:
                # receive() handed out vm.serial before the config was known: keep that
                # port, with the sinks the config asks for.
                self._serial_port._sink_fds = self._serial_sinks()
            else:
                self._serial_port = SerialPort(sink_fds=self._serial_sinks())
            irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            resources.callback(os.close, irq_fd)
            vm.irqfd(irq_fd, COM1_IRQ)
            self.uart = Serial8250(raise_irq=functools.partial(signal_eventfd, irq_fd),
                                   output=self._serial_port.output)
            self._serial_port.attach(self._token_or_fail(), push_input=self.uart.push_input)
            resources.callback(self._serial_port.close)
            self.pio_bus.insert(self.uart, COM1_PORT, SERIAL_PORT_COUNT, name="serial0")
        with self._step("setting up the legacy devices"):
            self._i8042 = I8042(on_reset=self._on_guest_reset)
            self.pio_bus.insert(self._i8042, I8042_BASE_PORT, I8042_PORT_COUNT, name="i8042")
            self._debug_exit = DebugExit(on_exit=self._on_debug_exit)
            self.pio_bus.insert(self._debug_exit, DEBUG_EXIT_DEFAULT_PORT,
                                DEBUG_EXIT_PORT_COUNT, name="debug-exit")
            self._boot_timer = BootTimer(on_marker=self._on_boot_marker)
            self.pio_bus.insert(self._boot_timer, BOOT_TIMER_PORT, BOOT_TIMER_PORT_COUNT,
                                name="boot-timer")
            if config.machine.acpi:
                self._acpi_sleep = AcpiSleep(soft_off_type=S5_SLEEP_TYPE,
                                             on_poweroff=self._on_acpi_poweroff)
                self.pio_bus.insert(self._acpi_sleep, ACPI_SLEEP_CONTROL_PORT,
                                    ACPI_SLEEP_PORT_COUNT, name="acpi-sleep")

    def _make_vcpus(self, kvm: Kvm, vm: Any, boot: tuple[Any, ResolvedProfile] | None) -> None:
        """Create every vCPU; with ``boot`` (the kernel's entry state and the CPU profile)
        set them up to boot, without it leave them blank for a restore to load."""
        config = self.config
        resources = self._resources
        supported = None
        for vcpu_id in range(config.machine.vcpus):
            with self._step(f"creating vCPU {vcpu_id}"):
                vcpu = vm.create_vcpu(vcpu_id)
                resources.callback(vcpu.close)
                if boot is not None:
                    boot_cpu, profile = boot
                    if supported is None:
                        supported = kvm.supported_cpuid()
                    vcpu.set_cpuid2(filter_cpuid(
                        supported, vcpu_id=vcpu_id, vcpu_count=config.machine.vcpus,
                        profile=profile,
                        hide=config.machine.hide_cpu_features,
                    ))
                    # The boot CPU starts at the kernel's entry; the others wait in the
                    # kernel for the guest's INIT/SIPI (KVM_RUN sleeps until then).
                    configure_platform_state(vcpu, boot_cpu=vcpu_id == 0)
                    if vcpu_id == 0:
                        apply_boot_state(vcpu, boot_cpu)
                    else:
                        wait_for_sipi(vcpu)
                self._vcpus.append(vcpu)
                # The vCPU's C fast path remembers accesses the buses leave unclaimed;
                # a change of either map makes it forget them.
                self.pio_bus.on_change(vcpu.stop_absorbing)
                self.mmio_bus.on_change(vcpu.stop_absorbing)
                self._loops.append(VcpuLoop(vcpu, pio_bus=self.pio_bus,
                                            mmio_bus=self.mmio_bus,
                                            read_guest=self._read_guest, latch=self._latch,
                                            pause=self._pause))

    def _make_virtio_devices(self) -> list[VirtioDevice]:
        """The configured virtio devices, in placement order: disks, NICs, rng, console.
        Each is registered for closing as soon as it exists. (A device's module is
        imported only when the config has one: ``avmm up`` pays for what it boots.)"""
        config = self.config
        devices: list[VirtioDevice] = []

        def keep(device: VirtioDevice) -> None:
            devices.append(device)

        for index, disk in enumerate(config.disks):
            if disk.vhost_user is not None:
                keep(self._make_vhost_user(disk.vhost_user, DeviceId.BLOCK, f"blk{index}",
                                           f"disk[{index}].vhost_user"))
                continue
            assert disk.path is not None
            from .virtio.blk import BlockDevice

            with self._step(f"opening disk {index} ({disk.path})"):
                # Checked and pinned by the policy (O_PATH), then reopened through the fd
                # with the access the disk needs: what the device opens is what was
                # checked, and a FIFO swapped in never blocks the open.
                fd = self._paths.open_disk(disk.path, f"disk[{index}].path")
                try:
                    blk = BlockDevice(Path(f"/proc/self/fd/{fd}"), read_only=disk.readonly,
                                      serial=disk.id, name=f"blk{index}")
                finally:
                    os.close(fd)
                blk.path = disk.path  # for its log lines
                self._resources.callback(blk.close)
                keep(blk)
                self._disks.append(blk)
        for index, net in enumerate(config.nets):
            if net.vhost_user is not None:
                keep(self._make_vhost_user(
                    net.vhost_user, DeviceId.NET, f"net{index}", f"net[{index}].vhost_user",
                    mac=net.mac or _derived_mac(self.name, str(net.vhost_user))))
                continue
            assert net.tap is not None
            from .tap import Tap
            from .virtio.net import NetDevice

            with self._step(tap_step(index, net)):
                # A jailed worker is handed its taps, opened by its daemon (the jail
                # has no /dev/net/tun and the worker no CAP_NET_ADMIN).
                handed = self._paths.take_opened(f"net[{index}].tap")
                tap = open_tap(net) if handed is None else Tap.handed_over(handed, net.tap)
                self._resources.callback(tap.close)
                keep(NetDevice(tap, mac=net.mac or _derived_mac(self.name, net.tap),
                               name=f"net{index}"))
        # Disks first, then NICs, in config order (see above): attach the rate limiters.
        with self._step("attaching the rate limiters"):
            self.rate_limits = DeviceLimits.attach(
                config, devices[:len(config.disks)],
                devices[len(config.disks):len(config.disks) + len(config.nets)],
                shared=self._shared_limit_groups)
        for index, generic in enumerate(config.vhost_users):
            keep(self._make_vhost_user(generic.socket, generic.device_id, f"vhost{index}",
                                       f"vhost_user[{index}].socket",
                                       num_queues=generic.num_queues,
                                       queue_size=generic.queue_size))
        if config.rng is not None:
            from .virtio.rng import RngDevice

            keep(RngDevice(name="rng0"))
        if config.console is not None:
            with self._step(CONSOLE_STEP):
                keep(self._make_console(config.console))
        return devices

    def _make_vhost_user(self, socket_path: Path, device_id: int, name: str, key: str, *,
                         mac: bytes | None = None, num_queues: int | None = None,
                         queue_size: int = 256) -> VirtioDevice:
        """A device served by a vhost-user back-end: connect and negotiate now (a few
        seconds at most), so that a missing or broken back-end stops the VM's start."""
        from .vhost.frontend import VhostUserDevice

        assert self.memory is not None
        with self._step(f"connecting {name} to the vhost-user back-end at {socket_path}"):
            # Under --allow-path the first connection goes to the very socket the policy
            # opened (an O_PATH fd); reconnections (a restarted back-end makes a new
            # socket under the same name) look the name up in the directory resolved then.
            address, fd = self._paths.socket_address(socket_path, key)
            try:
                device = VhostUserDevice(address, device_id=device_id, memory=self.memory,
                                         num_queues=num_queues, queue_size=queue_size,
                                         mac=mac, name=name)
            finally:
                if fd is not None:
                    os.close(fd)
            self._resources.callback(device.close)
            if self._paths.restricted:
                reconnect_address, dirfd = self._paths.socket_directory(socket_path, key)
                if dirfd is not None:
                    self._resources.callback(os.close, dirfd)
                device.socket_path = Path(reconnect_address)
        return device

    def _make_console(self, console: ConsoleConfig) -> VirtioDevice:
        from .virtio.console import ConsoleDevice

        sinks: tuple[int, ...] = ()
        if console.mode == "console":
            sinks = (1,)
        elif console.mode == "file":
            assert console.path is not None
            fd = self._paths.open_output(console.path, "console.path")
            self._resources.callback(os.close, fd)
            sinks = (fd,)
        elif console.mode == "socket":
            assert console.path is not None
            # Bound now, in the recipe: a path that cannot be bound is a failed step
            # with everything released, not an error inside the running VM.
            listener = self._paths.bind_socket(console.path, "console.path")
            self._resources.callback(listener.close)
            self._console_listener = listener
        port = SerialPort(sink_fds=sinks)
        device = ConsoleDevice(output=port.output, name="console0")
        port.attach(self._token_or_fail(), send_input=device.send_input)
        self._resources.callback(port.close)
        self._console_port = port
        return device

    def _serial_sinks(self) -> tuple[int, ...]:
        serial = self.config.serial
        if serial.mode == "console":
            return (1,)
        if serial.mode == "file":
            assert serial.path is not None
            fd = self._paths.open_output(serial.path, "serial.path")
            self._resources.callback(os.close, fd)
            return (fd,)
        return ()

    def _token_or_fail(self) -> trio.lowlevel.TrioToken:
        assert self._token is not None
        return self._token

    def _read_guest(self, address: int, length: int) -> bytes | None:
        assert self.memory is not None
        try:
            return self.memory.read(address, length)
        except GuestAddressError:
            return None

    # -- running ------------------------------------------------------------------------

    async def _run_devices(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                           ) -> None:
        """Home of the device tasks: each starts when its driver sets DRIVER_OK and all
        are cancelled when the VM stops."""
        try:
            await self._device_nursery(task_status)
        finally:
            self._devices_done.set()

    async def _device_nursery(self, task_status: trio.TaskStatus[None]) -> None:
        with self._devices_scope:
            async with trio.open_nursery() as nursery:
                for slot in self.virtio_slots:
                    slot.attach(nursery)
                if self._console_listener is not None:
                    assert self._console_port is not None
                    await nursery.start(serve_console_socket, self._console_listener,
                                        self._console_port.stream)
                task_status.started()
                await trio.sleep_forever()

    async def _supervise(self) -> None:
        """Run every vCPU; when all have returned, the VM has stopped."""
        structlog.contextvars.bind_contextvars(vm=self.name)
        try:
            async with trio.open_nursery() as nursery:
                gate = self._start_gate(nursery)
                for loop in self._loops:
                    loop.on_start = None if gate is None else gate.arrive
                    nursery.start_soon(self._run_vcpu, loop)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self._cpu.release)
                except AvmmError as e:
                    self._log.warning("cannot remove the VM's cgroup", error=str(e))
            # Devices stop after the vCPUs (nothing can kick them any more) and before
            # wait() returns, so a caller that saw the VM stop sees its devices stopped.
            self._devices_scope.cancel()
            with trio.CancelScope(shield=True):
                await self._devices_done.wait()
                for slot in self.virtio_slots:
                    slot.observe_used_rings()  # vhost-user counts, while memory exists
                await self._flush_disks()
            self._serial_port.close()
            if self._console_port is not None:
                self._console_port.close()
            self._finished.set()
            self._state_changed()
            result = self._latch.exit
            self._log.info("vm stopped", reason=result.reason.value if result else None,
                           exit_status=result.exit_status if result else None,
                           detail=result.detail if result else None)

    def _start_gate(self, nursery: trio.Nursery) -> StartGate | None:
        """With CPU controls, the vCPU threads wait before their first KVM_RUN until a
        worker thread has put them in the VM's cgroup and set their affinity."""
        if not self._cpu.limits.any or not self._loops:
            return None
        arrived = trio.Event()
        token = self._token_or_fail()
        gate = StartGate(len(self._loops), lambda: token.run_sync_soon(arrived.set))

        async def place() -> None:
            try:
                await arrived.wait()
                await trio.to_thread.run_sync(self._cpu.place, gate.arrived)
            except (AvmmError, OSError) as e:
                self._latch.request(VmExit(StopReason.ERROR, HOST_FAILURE_STATUS,
                                           f"placing the vCPU threads: {e}"))
                self._log.error("cannot place the vcpu threads", error=str(e))
            finally:
                gate.open()

        nursery.start_soon(place)
        return gate

    @property
    def vcpu_threads(self) -> list[int]:
        """Host thread ids of the running vCPU threads, in vCPU order."""
        return [tid for tid in (loop.native_id for loop in self._loops) if tid is not None]

    @property
    def cpu_limits(self) -> CpuLimits:
        """The CPU controls in force (see :meth:`set_cpu_limits`)."""
        return self._cpu.limits

    def cpu_description(self) -> dict[str, Any]:
        """The effective CPU controls, as the API shows them."""
        return self._cpu.describe()

    async def cpu_usage(self) -> CpuUsage:
        """CPU time and throttled time so far (from the VM's cgroup; without one, its
        vCPU threads' CPU time): read in a worker thread."""
        return await trio.to_thread.run_sync(self._cpu.usage, self.vcpu_threads)

    async def set_cpu_limits(self, *, weight: int | None = None,
                             max_percent: float | None = None,
                             clear_max_percent: bool = False) -> CpuLimits:
        """Change the VM's CPU weight and/or quota while it runs (validated as the
        ``[machine]`` keys ``cpu_weight``/``cpu_max_percent`` are: a bad value raises a
        ConfigError naming the key; None leaves a value as it is, ``clear_max_percent``
        removes the quota). A VM started without a cgroup gets one now.

        :raises VmStateError: the VM has stopped.
        :raises CgroupError: this host cannot apply CPU controls.
        """
        check_cpu_limits(weight=weight, max_percent=max_percent)
        if self.state in (VmState.STARTING, VmState.INCOMING):
            # Before its machine is built there are no vCPU threads to place, and the
            # VmCpu made then would be replaced (and its cgroup left behind).
            raise VmStateError(f"VM {self.name!r} is not running yet; its CPU limits can "
                               "change once it runs (set them in its config before)")
        if self.state in (VmState.STOPPING, VmState.STOPPED):
            raise VmStateError(f"VM {self.name!r} is {self.state.value}; its CPU limits "
                               "cannot change")
        tids = [(loop.vcpu.id, loop.native_id) for loop in self._loops
                if loop.native_id is not None]

        def apply() -> CpuLimits:
            self._cpu.place(tids)  # records them; affinity is unchanged
            return self._cpu.update(weight=weight, max_percent=max_percent,
                                    clear_max=clear_max_percent)

        return await trio.to_thread.run_sync(apply)

    async def _run_vcpu(self, loop: VcpuLoop) -> None:
        structlog.contextvars.bind_contextvars(vm=self.name, vcpu=loop.vcpu.id)

        def kick() -> None:
            # Cancelled from outside (e.g. the embedding program's scope): stop the VM.
            self._latch.request(VmExit(StopReason.STOPPED, 0, "cancelled"))

        try:
            # Dedicated: the thread may be pinned and put in the VM's cgroup, which must
            # not outlive the VM in a thread trio would reuse for other work.
            await run_in_own_thread(loop.run, on_cancel=kick,
                                    name=f"avmm {self.name} vcpu{loop.vcpu.id}",
                                    seccomp_kind=ThreadKind.VCPU, dedicated=True)
        except Exception as e:  # pragma: no cover - VcpuLoop.run catches its own errors
            self._log.exception("vcpu task failed")
            self._latch.request(VmExit(StopReason.ERROR, HOST_FAILURE_STATUS, str(e)))

    def _on_stop_requested(self, vm_exit: VmExit) -> None:
        """Runs once, on whichever thread asked first: get every vCPU out of KVM_RUN
        (parked ones included) and tell the event loop that the state changed."""
        for vcpu in self._vcpus:
            vcpu.kick()
        self._pause.release()
        receiving = self._receiving
        if receiving is not None and self._token is not None:
            # An incoming VM waits in accept() or on its stream, not in a vCPU: end that
            # wait (after the hand-over the scope is left and this does nothing).
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(receiving.cancel)
        self._notify_threadsafe()

    async def _flush_disks(self) -> None:
        """Make every write the guest completed stable before the VM counts as stopped
        (a guest that never sent FLUSH still expects its data on the disk)."""
        for device in self._disks:
            if not device.read_only and device.fd >= 0:
                try:
                    await trio.to_thread.run_sync(os.fdatasync, device.fd)
                except OSError as e:
                    self._log.warning("disk flush failed", device=device.name,
                                      error=os.strerror(e.errno or 0))

    def _on_guest_reset(self) -> None:
        self._latch.request(VmExit(StopReason.RESET, 0, "the guest reset the machine (i8042)"))

    def _on_acpi_poweroff(self) -> None:
        self._latch.request(VmExit(StopReason.POWEROFF, 0, "the guest powered off (ACPI S5)"))

    def _on_boot_marker(self) -> None:
        """The guest's /init wrote the boot-time marker (vCPU thread)."""
        assert self._started_at is not None
        elapsed = time.monotonic() - self._started_at
        self.userspace_reached_s = elapsed
        self._log.info("guest userspace reached", boot_time_ms=round(elapsed * 1000, 1))
        try:
            self._token_or_fail().run_sync_soon(self._userspace_reached.set)
        except trio.RunFinishedError:  # pragma: no cover - the program is ending anyway
            pass

    def _on_debug_exit(self, status: int) -> None:
        self._latch.request(VmExit(StopReason.DEBUG_EXIT, status,
                                   f"the guest wrote {status >> 1} to the debug-exit port"))


def kernel_cmdline(config: VmConfig, slots: Sequence[VirtioMmioSlot],
                   profile: ResolvedProfile = "host") -> str:
    """The guest's command line: the CPU profile's words (see :mod:`avmm.cpu_profile`),
    the configured ones, plus one ``virtio_mmio.device=`` word per virtio-mmio device
    when ACPI is off (with ACPI the DSDT describes them, and Linux would probe a device
    twice if it were given both ways)."""
    words = [profile_cmdline(profile), config.boot.cmdline]
    if not config.machine.acpi:
        words += [slot.placement.kernel_parameter() for slot in slots]
    return " ".join(word for word in words if word).strip()


def _cmdline_note(config: VmConfig, profile: ResolvedProfile,
                  slots: Sequence[VirtioMmioSlot]) -> str:
    """What avmm added to ``boot.cmdline``, for the message of a command line that is too
    long."""
    added = []
    prefix = profile_cmdline(profile)
    if prefix:
        added.append(f"{len(prefix.encode()) + 1} bytes of the {profile} CPU profile's words")
    if not config.machine.acpi and slots:
        words = " ".join(slot.placement.kernel_parameter() for slot in slots)
        added.append(f"{len(words.encode()) + 1} bytes of virtio_mmio.device= words")
    return f" ({' and '.join(added)} included)" if added else ""


def acpi_tables(config: VmConfig, slots: Sequence[VirtioMmioSlot]) -> AcpiTables:
    """The ACPI tables for this machine: one LAPIC per vCPU, each virtio-mmio window.

    :raises BootError: the machine cannot be described (e.g. more vCPUs than xAPIC IDs).
    """
    try:
        return build_acpi_tables(
            vcpus=config.machine.vcpus,
            virtio_devices=[(slot.placement.base, VIRTIO_MMIO_WINDOW, slot.placement.irq)
                            for slot in slots],
        )
    except ValueError as e:
        raise BootError(f"cannot build the ACPI tables: {e}") from e


def _derived_mac(vm_name: str, tap: str) -> bytes:
    """A stable, locally administered unicast MAC for a NIC without one configured."""
    import hashlib

    digest = hashlib.sha256(f"{vm_name}/{tap}".encode()).digest()
    return bytes([0x02]) + digest[:5]


def _clock_buffer() -> Any:
    """A zeroed ``struct kvm_clock_data``, sized from the ioctl number (which encodes the
    header's struct size), so that no layout but the first field is assumed here."""
    from .kvm._kvm_ffi import ffi, lib

    size = (lib.KVM_GET_CLOCK >> 16) & 0x3FFF
    return ffi.new("uint64_t[]", (size + 7) // 8)


def _get_kvm_clock(vm: Any) -> int:
    """KVM_GET_CLOCK: the guest's kvmclock now, in nanoseconds (``clock``, the struct's
    first field)."""
    from .kvm._ioctl import ioctl

    data = _clock_buffer()
    ioctl(vm.fd, "KVM_GET_CLOCK", data)
    return int(data[0])


def _set_kvm_clock(vm: Any, value: int) -> None:
    """KVM_SET_CLOCK with no flags: the guest's kvmclock continues from ``value``."""
    from .kvm._ioctl import ioctl

    data = _clock_buffer()
    data[0] = value
    ioctl(vm.fd, "KVM_SET_CLOCK", data)


# -- snapshot helpers ---------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedSnapshot:
    """A snapshot read and checked: its directory's fd (the policy's O_PATH fd), that fd
    as a path, its sections with the memory file held open, and the config it holds."""

    dirfd: int
    inside: Path
    snapshot: Snapshot
    config: VmConfig


def _open_snapshot_directory(policy: PathPolicy, path: Path, key: str) -> int:
    """An O_PATH fd of the directory ``path``, through ``policy``. Outside the allowed
    directories: :class:`PathNotAllowedError`; any other failure: :class:`SnapshotError`."""
    try:
        return policy.open_directory(path, key)
    except PathNotAllowedError:
        raise
    except HostFileError as e:
        cause = e.__cause__
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e)
        raise SnapshotError(f"{path}: cannot use this directory: {why}") from None


def open_snapshot(path: Path, policy: PathPolicy,
                   vhost_user: Mapping[str, str] | None,
                   dir_fd: int | None = None) -> OpenedSnapshot:
    """Read and check the snapshot in ``path`` (or in ``dir_fd``, a copy of which is
    used; a worker thread): the state file in full, the memory file's presence and
    size, the config, and that the parts fit together."""
    from .state.snapshot import STATE_FILE_NAME, read_snapshot
    from .state.vm_state import SNAPSHOT_SECTIONS, config_from_state

    path = Path(os.path.abspath(path))
    dirfd = _open_snapshot_directory(policy, path, "restore") if dir_fd is None \
        else os.dup(dir_fd)
    inside = Path(f"/proc/self/fd/{dirfd}")
    snapshot: Snapshot | None = None
    try:
        try:
            snapshot = read_snapshot(inside, SNAPSHOT_SECTIONS)
            source = str(path / STATE_FILE_NAME)
            config = config_from_state(snapshot.sections["config"], source=source,
                                       vhost_user=vhost_user,
                                       path_check=policy.check if policy.restricted else None)
            machine: MachineState = snapshot.sections["machine"]
            if len(machine.vcpus) != config.machine.vcpus:
                raise SnapshotError(f"{source}: {len(machine.vcpus)} saved vCPUs, the saved "
                                    f"config has {config.machine.vcpus}")
            if snapshot.memory is None or snapshot.memory.size != config.machine.memory_mib * MIB:
                raise SnapshotError(f"{source}: the memory file does not hold the saved "
                                    f"config's {config.machine.memory_mib} MiB of RAM")
        except SnapshotError as e:
            raise _renamed(e, inside, path) from None
        return OpenedSnapshot(dirfd=dirfd, inside=inside, snapshot=snapshot,
                               config=dataclasses.replace(config, source=str(path)))
    except BaseException:
        if snapshot is not None:
            snapshot.close()
        os.close(dirfd)
        raise


def _renamed(error: StateError, inside: Path, outside: Path) -> StateError:
    """``error`` with the /proc/self/fd path of a directory fd shown as the path the
    user gave (same type, one line)."""
    text = str(error)
    if str(inside) not in text:
        return error
    return type(error)(text.replace(str(inside), str(outside)))


def _incoming_placeholder() -> VmConfig:
    """The config of an incoming VM until the stream brings the real one."""
    from .config import BootConfig, MachineConfig, SerialConfig

    return VmConfig(machine=MachineConfig(), boot=BootConfig(kernel=Path("/")),
                    serial=SerialConfig(mode="none"), source="incoming migration")


def _has_vhost_user(config: VmConfig) -> bool:
    return (any(disk.vhost_user is not None for disk in config.disks)
            or any(net.vhost_user is not None for net in config.nets)
            or bool(config.vhost_users))
