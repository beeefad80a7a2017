"""``VirtualMachine``: one VM, built by a straight-line recipe and run in a trio nursery.

The recipe (``_build``) goes kvm → vm → memory → kernel → devices → vCPUs, and a failure
at any step becomes one :class:`VmStartError` naming the step, with everything built so
far released. Running a VM means one nursery: a task per vCPU, each owning the thread that
runs KVM_RUN. The VM ends when anything requests a stop (the guest through a device or
a vCPU exit, the host through :meth:`VirtualMachine.stop`, or cancellation); then every
vCPU is kicked out of KVM_RUN and joined before ``async with`` returns.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from .arch.x86 import layout
from .arch.x86.acpi import AcpiTables, build_acpi_tables
from .arch.x86.cpuid import filter_cpuid
from .arch.x86.loader import load_kernel
from .bus import Bus
from .config import ConsoleConfig, VmConfig
from .devices.debug_exit import DEBUG_EXIT_DEFAULT_PORT, DEBUG_EXIT_PORT_COUNT, DebugExit
from .devices.i8042 import I8042, I8042_BASE_PORT, I8042_PORT_COUNT
from .devices.serial import SERIAL_PORT_COUNT, Serial8250
from .errors import AvmmError, BootError, GuestAddressError, VmStartError, VmStateError
from .eventfd import signal_eventfd
from .kvm import Kvm, Vcpu, install_kick_handler
from .lifecycle import HOST_FAILURE_STATUS, StopLatch, StopReason, VmExit
from .memory import MIB, GuestMemory
from .netns import call_in_netns
from .serial_port import SerialPort, serve_console_socket
from .vcpu_loop import VcpuLoop
from .vcpu_thread import run_in_vcpu_thread
from .virtio.device import DeviceId, VirtioDevice
from .vm_virtio import VIRTIO_MMIO_WINDOW, VirtioMmioSlot, placements
from .x86_vcpu import apply_boot_state, configure_platform_state, wait_for_sipi

log = structlog.get_logger(__name__)

COM1_PORT = 0x3F8
COM1_IRQ = 4

_vm_numbers = itertools.count(1)


class VirtualMachine:
    """A VM inside the caller's trio program.

    ::

        async with VirtualMachine(config) as vm:
            output = await vm.serial.receive_some()
            result = await vm.wait()

    Entering builds and starts the VM (raising :class:`VmStartError` if it cannot);
    leaving stops it if it is still running and releases everything. Several VMs may run
    concurrently in one program; a failure inside one never touches another.
    """

    def __init__(self, config: VmConfig, *, name: str | None = None) -> None:
        self.config = config
        self.name = name or config.name or f"vm{next(_vm_numbers)}"
        self._serial_port = SerialPort(sink_fds=())
        self._console_port: SerialPort | None = None
        self._latch = StopLatch(self._on_stop_requested)
        self._resources = contextlib.ExitStack()
        self._nursery_manager: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._finished = trio.Event()
        self._vcpus: list[Vcpu] = []
        self.virtio_slots: list[VirtioMmioSlot] = []
        self._devices_scope = trio.CancelScope()
        self._devices_done = trio.Event()
        self._loops: list[VcpuLoop] = []
        self.memory: GuestMemory | None = None
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.uart: Serial8250 | None = None
        self._log = log.bind(vm=self.name)

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

    def vcpu_exit_counts(self) -> dict[str, int]:
        """KVM exits seen so far, by kind, summed over vCPUs."""
        total: dict[str, int] = {}
        for loop in self._loops:
            for kind, count in loop.exit_counts.items():
                total[kind] = total.get(kind, 0) + count
        return total

    # -- lifetime -----------------------------------------------------------------------

    async def __aenter__(self) -> VirtualMachine:
        if self._nursery_manager is not None:
            raise VmStateError(f"VM {self.name!r} was already started; make a new one")
        self._token = trio.lowlevel.current_trio_token()
        try:
            self._build()
        except BaseException:
            self._resources.close()
            raise
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        await nursery.start(self._run_devices)
        nursery.start_soon(self._supervise)
        self._log.info("vm started", vcpus=len(self._vcpus),
                       memory_mib=self.config.machine.memory_mib)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> bool:
        self._latch.request(VmExit(StopReason.STOPPED, 0, "the VM's context was left"))
        try:
            return bool(await self._nursery_manager.__aexit__(exc_type, exc, traceback))
        finally:
            self._resources.close()

    # -- the recipe ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, step: str) -> Iterator[None]:
        try:
            yield
        except VmStartError:
            raise
        except (AvmmError, OSError) as e:
            raise VmStartError(self.name, step, str(e)) from e

    def _build(self) -> None:
        config = self.config
        resources = self._resources
        with self._step("opening /dev/kvm"):
            kvm = Kvm()
            resources.callback(kvm.close)
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
            resources.callback(vm.close)
            vm.set_tss_address(layout.KVM_TSS_ADDRESS)
            vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDRESS)
            vm.create_irqchip()
            vm.create_pit2()
        with self._step(f"allocating {config.machine.memory_mib} MiB of guest memory"):
            memory = GuestMemory(config.machine.memory_mib * MIB, name=f"avmm-{self.name}")
            resources.callback(memory.close)
            self.memory = memory
            for slot, region in enumerate(memory.regions):
                vm.set_user_memory_region(slot, region.guest_address, region.size,
                                          memory.host_address(region))
        devices = self._make_virtio_devices()
        with self._step("placing the virtio devices"):
            for device, placement in zip(devices, placements(len(devices)), strict=True):
                slot = VirtioMmioSlot(vm=vm, memory=memory, device=device,
                                      placement=placement, token=self._token_or_fail())
                resources.callback(slot.close)
                self.virtio_slots.append(slot)
                self.mmio_bus.insert(slot.transport, placement.base, 0x1000, name=device.name)
        cmdline = kernel_cmdline(config, self.virtio_slots)
        with self._step("building the ACPI tables"):
            acpi = acpi_tables(config, self.virtio_slots) if config.machine.acpi else None
        with self._step(f"loading the kernel {config.boot.kernel}"):
            kernel_load = load_kernel(memory, config.boot.kernel, cmdline=cmdline,
                                      initrd=config.boot.initrd, acpi=acpi)
            self._log.info("kernel loaded", kernel=str(config.boot.kernel),
                           acpi_rsdp=kernel_load.log_fields().get("acpi_rsdp"))
        with self._step("setting up the serial port"):
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
            self.pio_bus.insert(I8042(on_reset=self._on_guest_reset), I8042_BASE_PORT,
                                I8042_PORT_COUNT, name="i8042")
            self.pio_bus.insert(DebugExit(on_exit=self._on_debug_exit),
                                DEBUG_EXIT_DEFAULT_PORT, DEBUG_EXIT_PORT_COUNT,
                                name="debug-exit")
        supported = None
        for vcpu_id in range(config.machine.vcpus):
            with self._step(f"creating vCPU {vcpu_id}"):
                if supported is None:
                    supported = kvm.supported_cpuid()
                vcpu = vm.create_vcpu(vcpu_id)
                resources.callback(vcpu.close)
                vcpu.set_cpuid2(filter_cpuid(
                    supported, vcpu_id=vcpu_id, vcpu_count=config.machine.vcpus,
                    profile=config.machine.cpu_profile,
                    hide=config.machine.hide_cpu_features,
                ))
                # The boot CPU starts at the kernel's entry; the others wait in the
                # kernel for the guest's INIT/SIPI (KVM_RUN sleeps until then).
                configure_platform_state(vcpu, boot_cpu=vcpu_id == 0)
                if vcpu_id == 0:
                    apply_boot_state(vcpu, kernel_load.cpu)
                else:
                    wait_for_sipi(vcpu)
                self._vcpus.append(vcpu)
                self._loops.append(VcpuLoop(vcpu, pio_bus=self.pio_bus,
                                            mmio_bus=self.mmio_bus,
                                            read_guest=self._read_guest, latch=self._latch))

    def _make_virtio_devices(self) -> list[VirtioDevice]:
        """The configured virtio devices, in placement order: disks, NICs, rng, console.
        Each is registered for closing as soon as it exists."""
        from .tap import Tap
        from .virtio.blk import BlockDevice
        from .virtio.net import NetDevice
        from .virtio.rng import RngDevice

        config = self.config
        devices: list[VirtioDevice] = []

        def keep(device: VirtioDevice) -> None:
            devices.append(device)

        for index, disk in enumerate(config.disks):
            if disk.vhost_user is not None:
                keep(self._make_vhost_user(disk.vhost_user, DeviceId.BLOCK, f"blk{index}"))
                continue
            assert disk.path is not None
            with self._step(f"opening disk {index} ({disk.path})"):
                blk = BlockDevice(disk.path, read_only=disk.readonly, serial=disk.id,
                                  name=f"blk{index}")
                self._resources.callback(blk.close)
                keep(blk)
        for index, net in enumerate(config.nets):
            if net.vhost_user is not None:
                keep(self._make_vhost_user(
                    net.vhost_user, DeviceId.NET, f"net{index}",
                    mac=net.mac or _derived_mac(self.name, str(net.vhost_user))))
                continue
            assert net.tap is not None
            with self._step(f"opening tap {net.tap!r} for net{index}"):
                if net.netns is None:
                    tap = Tap.open(net.tap)
                else:
                    tap = call_in_netns(net.netns, lambda name=net.tap: Tap.open(name))
                self._resources.callback(tap.close)
                keep(NetDevice(tap, mac=net.mac or _derived_mac(self.name, net.tap),
                               name=f"net{index}"))
        for index, generic in enumerate(config.vhost_users):
            keep(self._make_vhost_user(generic.socket, generic.device_id, f"vhost{index}",
                                       num_queues=generic.num_queues,
                                       queue_size=generic.queue_size))
        if config.rng is not None:
            keep(RngDevice(name="rng0"))
        if config.console is not None:
            with self._step("setting up the virtio console"):
                keep(self._make_console(config.console))
        return devices

    def _make_vhost_user(self, socket_path: Path, device_id: int, name: str, *,
                         mac: bytes | None = None, num_queues: int | None = None,
                         queue_size: int = 256) -> VirtioDevice:
        """A device served by a vhost-user back-end: connect and negotiate now (a few
        seconds at most), so that a missing or broken back-end stops the VM's start."""
        from .vhost.frontend import VhostUserDevice

        assert self.memory is not None
        with self._step(f"connecting {name} to the vhost-user back-end at {socket_path}"):
            device = VhostUserDevice(socket_path, device_id=device_id, memory=self.memory,
                                     num_queues=num_queues, queue_size=queue_size, mac=mac,
                                     name=name)
            self._resources.callback(device.close)
        return device

    def _make_console(self, console: ConsoleConfig) -> VirtioDevice:
        from .virtio.console import ConsoleDevice

        sinks: tuple[int, ...] = ()
        if console.mode == "console":
            sinks = (1,)
        elif console.mode == "file":
            assert console.path is not None
            fd = os.open(console.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o644)
            self._resources.callback(os.close, fd)
            sinks = (fd,)
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
            fd = os.open(serial.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o644)
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
                console = self.config.console
                if console is not None and console.mode == "socket":
                    assert console.path is not None and self._console_port is not None
                    await nursery.start(serve_console_socket, console.path,
                                        self._console_port.stream)
                task_status.started()
                await trio.sleep_forever()

    async def _supervise(self) -> None:
        """Run every vCPU; when all have returned, the VM has stopped."""
        structlog.contextvars.bind_contextvars(vm=self.name)
        try:
            async with trio.open_nursery() as nursery:
                for loop in self._loops:
                    nursery.start_soon(self._run_vcpu, loop)
        finally:
            # Devices stop after the vCPUs (nothing can kick them any more) and before
            # wait() returns, so a caller that saw the VM stop sees its devices stopped.
            self._devices_scope.cancel()
            with trio.CancelScope(shield=True):
                await self._devices_done.wait()
            self._serial_port.close()
            if self._console_port is not None:
                self._console_port.close()
            self._finished.set()
            result = self._latch.exit
            self._log.info("vm stopped", reason=result.reason.value if result else None,
                           exit_status=result.exit_status if result else None,
                           detail=result.detail if result else None)

    async def _run_vcpu(self, loop: VcpuLoop) -> None:
        structlog.contextvars.bind_contextvars(vm=self.name, vcpu=loop.vcpu.id)

        def kick() -> None:
            # Cancelled from outside (e.g. the embedding program's scope): stop the VM.
            self._latch.request(VmExit(StopReason.STOPPED, 0, "cancelled"))

        try:
            await run_in_vcpu_thread(loop.run, kick=kick,
                                     name=f"avmm {self.name} vcpu{loop.vcpu.id}")
        except Exception as e:  # pragma: no cover - VcpuLoop.run catches its own errors
            self._log.exception("vcpu task failed")
            self._latch.request(VmExit(StopReason.ERROR, HOST_FAILURE_STATUS, str(e)))

    def _on_stop_requested(self, vm_exit: VmExit) -> None:
        """Runs once, on whichever thread asked first: get every vCPU out of KVM_RUN."""
        for vcpu in self._vcpus:
            vcpu.kick()

    def _on_guest_reset(self) -> None:
        self._latch.request(VmExit(StopReason.RESET, 0, "the guest reset the machine (i8042)"))

    def _on_debug_exit(self, status: int) -> None:
        self._latch.request(VmExit(StopReason.DEBUG_EXIT, status,
                                   f"the guest wrote {status >> 1} to the debug-exit port"))


def kernel_cmdline(config: VmConfig, slots: Sequence[VirtioMmioSlot]) -> str:
    """The guest's command line: the configured one, plus one ``virtio_mmio.device=``
    word per virtio-mmio device when ACPI is off (with ACPI the DSDT describes them, and
    Linux would probe a device twice if it were given both ways)."""
    words = [config.boot.cmdline]
    if not config.machine.acpi:
        words += [slot.placement.kernel_parameter() for slot in slots]
    return " ".join(words).strip()


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
