"""Wiring virtio-mmio devices into a VM: windows, eventfds, and the device tasks.

For each device the VM gets one :class:`VirtioMmioSlot`: a 4 KiB MMIO window with the
transport (register accesses, handled on vCPU threads), one KVM ioeventfd per queue
(the QueueNotify register, datamatch = queue index, so notifications never leave the
kernel), one irqfd for the device's interrupt line, and the trio task that runs the
device once the driver sets DRIVER_OK. That task waits on the ioeventfds, so the whole
data path (notify → serve → interrupt) runs without a vCPU exit to userspace.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import trio

from .eventfd import signal_eventfd, wait_eventfd
from .kvm import Vm
from .memory import MemoryAccess
from .virtio.device import COMMON_FEATURES, DeviceNeedsReset, VirtioDevice
from .virtio.mmio import MmioTransport, TransportCallbacks
from .virtio.queue import VirtQueue

log = structlog.get_logger(__name__)

#: Where virtio-mmio windows start (inside the 32-bit MMIO hole) and how big each is.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_WINDOW = 0x1000
#: GSIs for virtio-mmio devices: ISA lines the legacy PIC and IOAPIC both route, avoiding
#: the timer (0), keyboard/cascade (1, 2), the UARTs (3, 4) and the RTC (8).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 14, 15)

#: How long a driver's reset may wait for the device task to stop.
RESET_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Placement:
    base: int
    irq: int

    def kernel_parameter(self) -> str:
        """Linux's ``virtio_mmio.device=<size>@<base>:<irq>`` for minimal kernels."""
        return f"virtio_mmio.device=4K@0x{self.base:x}:{self.irq}"


def placements(count: int) -> list[Placement]:
    if count > len(VIRTIO_IRQS):
        raise ValueError(f"at most {len(VIRTIO_IRQS)} virtio-mmio devices, asked {count}")
    return [Placement(VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_WINDOW, VIRTIO_IRQS[i])
            for i in range(count)]


class VirtioMmioSlot:
    """One virtio device in one VM (see the module docstring)."""

    def __init__(self, *, vm: Vm, memory: MemoryAccess, device: VirtioDevice,
                 placement: Placement, token: trio.lowlevel.TrioToken) -> None:
        self.device = device
        self.placement = placement
        self._vm = vm
        self._token = token
        self._log = log.bind(device=device.name)
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None
        self.irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kick_fds: list[int] = []
        # A device served outside this process (vhost-user) offers its back-end's
        # features as they are, and its back-end writes the irqfd itself.
        external = bool(getattr(device, "external_data_path", False))
        self.transport = MmioTransport(
            device, memory,
            TransportCallbacks(activate=self._activate, reset=self._reset,
                               interrupt=self._interrupt, queue_notify=self._queue_notify),
            name=device.name,
            common_features=0 if external else COMMON_FEATURES,
            external_used_notifications=external,
        )
        try:
            vm.irqfd(self.irq_fd, placement.irq)
            notify = placement.base + MmioTransport.NOTIFY_OFFSET
            for index in range(len(device.queue_max_sizes)):
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.kick_fds.append(fd)
                vm.ioeventfd(fd, notify, 4, datamatch=index)
        except BaseException:
            self.close()
            raise

    def attach(self, nursery: trio.Nursery) -> None:
        """The nursery device tasks run in (the VM's, cancelled when the VM stops)."""
        self._nursery = nursery

    def close(self) -> None:
        for fd in [*self.kick_fds, self.irq_fd]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.kick_fds = []
        closer = getattr(self.device, "close", None)
        if callable(closer):
            closer()

    # -- transport callbacks (vCPU threads) ---------------------------------------------

    def _interrupt(self) -> None:
        signal_eventfd(self.irq_fd)

    def _queue_notify(self, index: int) -> None:
        # Only reached when the ioeventfd did not catch the write (e.g. a 2-byte write).
        if 0 <= index < len(self.kick_fds):
            signal_eventfd(self.kick_fds[index])

    def _activate(self, transport: MmioTransport) -> None:
        try:
            self._token.run_sync_soon(self._start)
        except trio.RunFinishedError:
            pass

    def _reset(self, transport: MmioTransport) -> None:
        """Block the resetting vCPU until the device task has stopped: the driver will
        reuse the rings' memory as soon as it sees status 0. Rare, so the latency of a
        round trip to the event loop does not matter."""
        try:
            trio.from_thread.run(self._stop_and_wait, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            pass

    # -- event-loop side ----------------------------------------------------------------

    def _start(self) -> None:
        if self._nursery is None or self._scope is not None:
            return
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._nursery.start_soon(self._serve, self._scope, self._stopped)

    async def _stop_and_wait(self) -> None:
        scope, stopped = self._scope, self._stopped
        if scope is None or stopped is None:
            return
        scope.cancel()
        with trio.move_on_after(RESET_TIMEOUT_S):
            await stopped.wait()
        self._scope = self._stopped = None

    async def _serve(self, scope: trio.CancelScope, stopped: trio.Event) -> None:
        structlog.contextvars.bind_contextvars(device=self.device.name)
        context = _MmioDeviceContext(self)
        self._log.debug("device activated", features=hex(context.features))
        try:
            with scope:
                await self.device.run(context)
        except DeviceNeedsReset as e:
            self.transport.set_needs_reset(str(e))
        except Exception as e:
            # A device bug must not take the VM down: the device stops, the driver sees
            # DEVICE_NEEDS_RESET, the log says why.
            self._log.exception("device failed")
            self.transport.set_needs_reset(f"internal error: {type(e).__name__}: {e}")
        finally:
            stopped.set()


class _MmioDeviceContext:
    """The DeviceContext of a device running behind virtio-mmio in this process."""

    def __init__(self, slot: VirtioMmioSlot) -> None:
        self._slot = slot
        transport = slot.transport
        self.memory = transport.memory
        self.features = transport.negotiated_features
        self.queues: Sequence[VirtQueue | None] = [
            queue if queue.state.ready else None for queue in transport.queues
        ]
        # The first wait returns at once: the driver may have queued buffers before it
        # set DRIVER_OK, and kicked before we were waiting.
        self._primed = [True] * len(self.queues)

    async def wait_kick(self, queue_index: int) -> None:
        if self._primed[queue_index]:
            self._primed[queue_index] = False
            await trio.lowlevel.checkpoint()
            return
        await wait_eventfd(self._slot.kick_fds[queue_index])

    def signal_used(self, queue_index: int) -> None:
        queue = self.queues[queue_index]
        if queue is not None and queue.should_notify(self.memory):
            self._slot.transport.signal_used()

    def signal_config_change(self) -> None:
        self._slot.transport.signal_config_change()

    # Where the eventfds are, for a device served outside this process (vhost-user hands
    # them to its back-end); in-process devices use wait_kick/signal_used instead.

    def kick_fd(self, queue_index: int) -> int:
        """The KVM ioeventfd eventfd of queue ``queue_index`` (the driver's kicks)."""
        return self._slot.kick_fds[queue_index]

    @property
    def call_fd(self) -> int:
        """The irqfd eventfd of the device's interrupt line (write 1 to interrupt)."""
        return self._slot.irq_fd
