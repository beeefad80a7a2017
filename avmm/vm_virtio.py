"""Wiring virtio-mmio devices into a VM: windows, eventfds, and the device tasks.

For each device the VM gets one :class:`VirtioMmioSlot`: a 4 KiB MMIO window with the
transport (register accesses, handled on vCPU threads), one KVM ioeventfd per queue
(the QueueNotify register, datamatch = queue index, so notifications never leave the
kernel), one irqfd for the device's interrupt line, and the trio task that runs the
device once the driver sets DRIVER_OK. That task waits on the ioeventfds, so the whole
data path (notify → serve → interrupt) runs without a vCPU exit to userspace.

Pausing. :meth:`VirtioMmioSlot.pause` makes the device quiescent: its task is stopped
the way a reset stops it, but nothing is reset. An in-process device finishes the
request it works on (blk completes its batch), every chain it took and did not return
is given back to the driver (:meth:`VirtQueue.give_back`), and a vhost-user device's
``run`` stops the back-end's rings with GET_VRING_BASE on its way out, recording each
answer as the queue's position. After ``pause`` returns nothing of the device writes
guest memory or raises the interrupt; :meth:`~VirtioMmioSlot.resume` starts the task
again on the same rings, from the positions the queues record (vhost-user: the bring-up
replays SET_VRING_BASE with them). A :class:`PauseGate` shared by the VM's slots is
closed before the vCPUs park, so that between that moment and the stop the devices
take no new request (the device gets each queue wrapped in a :class:`_ServedQueue` that
holds pops back while the gate is closed).

Snapshots. While paused, :meth:`~VirtioMmioSlot.save_state` returns a
:class:`VirtioSlotState` (the transport's registers and queue positions, and the
device's own state encoded with the snapshot codec), and a freshly built slot takes it
back with :meth:`~VirtioMmioSlot.restore_state`, paused until ``resume``.

Counting. The slot counts what goes through it (:class:`DeviceMetrics`): the served
queues count pushes, and ``wait_kick`` counts the driver's notifications from the
eventfd's counter. So every in-process device is counted the same way, whatever loop
it runs.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import structlog
import trio

from .devices._state import DeviceStateError
from .errors import GuestMemoryError, VmStateError
from .eventfd import signal_eventfd
from .kvm import Vm
from .lifecycle import DeviceMetrics
from .memory import MemoryAccess
from .state._errors import SnapshotError
from .state._widths import U32
from .virtio.device import (
    COMMON_FEATURES,
    DeviceId,
    DeviceNeedsReset,
    PauseGate,
    VirtioDevice,
)
from .virtio.mmio import MmioTransport, MmioTransportState, TransportCallbacks
from .virtio.queue import DescriptorChain, QueueError, QueueState, VirtQueue

log = structlog.get_logger(__name__)

#: Where virtio-mmio windows start (inside the 32-bit MMIO hole) and how big each is.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_WINDOW = 0x1000
#: GSIs for virtio-mmio devices: ISA lines the legacy PIC and IOAPIC both route, avoiding
#: the timer (0), keyboard/cascade (1, 2), the UARTs (3, 4) and the RTC (8).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 14, 15)

#: How long the vCPU that resets a device waits for its task to stop. Past it the reset
#: stays pending (Status reads non-zero) until the task has stopped (see mmio.py).
RESET_TIMEOUT_S = 10.0

_DEVICE_KINDS = {DeviceId.BLOCK: "blk", DeviceId.NET: "net", DeviceId.CONSOLE: "console",
                 DeviceId.ENTROPY: "rng"}


class DevicePauseError(VmStateError):
    """A device could not be stopped for a pause: its task did not end in time, or a
    vhost-user back-end did not confirm that its rings stopped. The VM cannot be paused
    now (the API answers 409, as for any state that does not allow it); it runs on."""


@dataclass(frozen=True)
class VirtioSlotState:
    """One virtio-mmio device in a snapshot: the transport's registers and queue
    positions, and the device's own state.

    The device's state is stored as the codec's bytes of the device's own state class
    (``device.state_class``, a record carrying its name and STATE_VERSION), not as a
    field of a union of every device's class: the slot state then decodes without
    knowing which devices exist (a custom or vhost-user device adds its class without
    touching this one), and :meth:`VirtioMmioSlot.restore_state` decodes the bytes
    with the class of the device it restores into, which refuses a record of another
    device or version with one line.
    """

    STATE_VERSION: ClassVar[int] = 1

    #: The device's name ("blk0") and virtio device ID, checked on restore.
    name: str
    device_id: U32
    transport: MmioTransportState
    #: ``codec.encode(device.save_state())``.
    device_state: bytes


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
                 placement: Placement, token: trio.lowlevel.TrioToken,
                 gate: PauseGate | None = None) -> None:
        self.device = device
        self.placement = placement
        self._vm = vm
        self._token = token
        self._log = log.bind(device=device.name)
        self._nursery: trio.Nursery | None = None
        # Paused (see pause()): the device task is stopped and does not start until
        # resume(), whatever the driver does (it cannot: the vCPUs are parked).
        self._paused = False
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None
        # Set while no device task runs; read by vCPU threads polling a pending reset.
        self._idle = threading.Event()
        self._idle.set()
        self.irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kick_fds: list[int] = []
        #: Open while the VM runs; the VM closes it to pause the device.
        self.gate = gate if gate is not None else PauseGate()
        # A device served outside this process (vhost-user) offers its back-end's
        # features as they are, and its back-end writes the irqfd itself.
        external = bool(getattr(device, "external_data_path", False))
        #: The device's data path runs elsewhere: nothing to pause or count here.
        self.external = external
        self._metrics = DeviceMetrics(
            kind="vhost-user" if external else _DEVICE_KINDS.get(device.device_id, "virtio"))
        # Kicks the slot wrote itself (on resume), not to be counted as the driver's.
        # Locked: a device may read its eventfds on a thread of its own (blk does).
        self._injected_kicks = [0] * len(device.queue_max_sizes)
        self._kick_lock = threading.Lock()
        # Held by the served queues while they count requests and bytes (_ServedQueue).
        self._count_lock = threading.Lock()
        # vhost-user: the used idx of each queue when metrics were last read.
        self._seen_used: list[int] = [0] * len(device.queue_max_sizes)
        self.transport = MmioTransport(
            device, memory,
            TransportCallbacks(activate=self._activate, reset=self._reset,
                               interrupt=self._interrupt, queue_notify=self._queue_notify,
                               stopped=self._device_stopped),
            name=device.name,
            common_features=0 if external else COMMON_FEATURES,
            external_used_notifications=external or bool(
                getattr(device, "interrupts_directly", False)),
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
        """The nursery device tasks run in (the VM's, cancelled when the VM stops). A
        restored slot that was resumed before (or a restored transport of a slot that
        is not paused) starts serving here."""
        self._nursery = nursery
        if not self._paused and self.transport.activated:
            self._start()

    # -- pause, resume, snapshots (event-loop thread) ------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Stop the device and return once nothing of it writes guest memory or raises
        the interrupt: the device task is cancelled and waited for (a request in flight
        finishes first; blk completes the batch it started), every chain it took and
        did not return is given back to the driver (:meth:`VirtQueue.give_back`), and a
        vhost-user device's ``run`` has stopped its rings with GET_VRING_BASE, whose
        answers are the queues' positions. A pause is not a reset: registers, queue
        state and the device's own state stay, and :meth:`resume` serves on from there.
        Idempotent.

        :raises DevicePauseError: the device did not stop within
            :data:`RESET_TIMEOUT_S` or cannot confirm that it stopped; the slot counts
            as paused anyway (nothing will be started), so the caller may resume it.
        """
        if self._paused:
            return
        self._paused = True
        stopped = await self._stop_and_wait(why="pause")
        if self._idle.is_set():  # a task that did not stop still owns its queues
            self._give_back_chains()
        if not stopped:
            raise DevicePauseError(
                f"{self.device.name}: the device did not stop within {RESET_TIMEOUT_S:g} s "
                "or cannot confirm that it stopped writing guest memory")

    async def resume(self) -> None:
        """Serve again after :meth:`pause` or :meth:`restore_state`, from the positions
        the queues record, if the driver had activated the device (vhost-user: ``run``
        replays SET_VRING_BASE with the saved position, the kick and call eventfds and
        SET_VRING_ENABLE). Before :meth:`attach` it only records the wish; attach
        starts the task. Idempotent."""
        if not self._paused:
            return
        self._paused = False
        await trio.lowlevel.checkpoint()
        if self.transport.activated:
            self._start()
        # Buffers the driver made available while paused were not taken, and the
        # driver will not notify them again: a kick per queue makes the device look.
        self.resumed()

    def save_state(self) -> VirtioSlotState:
        """The slot's state. Only while no device task runs (after :meth:`pause`, or
        before the driver ever activated the device, as in a VM started paused), and
        while the vCPUs are parked, so that no position or register moves on.

        :raises VmStateError: the device is being served (pause it first).
        :raises DeviceStateError: the device cannot be saved.
        """
        if self._scope is not None or not self._idle.is_set():
            raise VmStateError(f"{self.device.name}: pause the device before saving it")
        from .state.codec import encode  # a snapshot's or a migration's: not on boot

        transport = self.transport_state()
        device_state = self.device.save_state()
        state_class = self.device.state_class
        if state_class is None or type(device_state) is not state_class:
            raise DeviceStateError(
                f"{self.device.name}: save_state returned a {type(device_state).__name__}, "
                f"its state_class is {getattr(state_class, '__name__', None)}")
        return VirtioSlotState(name=self.device.name, device_id=int(self.device.device_id),
                               transport=transport, device_state=encode(device_state))

    def restore_state(self, state: VirtioSlotState) -> None:
        """Load ``state`` into this freshly built slot (guest memory already holds the
        saved contents), before the device is served: everything is checked first, and
        a state that does not fit raises DeviceStateError (TransportStateError for the
        transport's part) with one line. The slot is paused afterwards: :meth:`resume`
        (VirtualMachine.resume()) starts serving from the restored positions.
        """
        from .state.codec import decode  # a restore's or a migration's: not on boot

        name = self.device.name
        if type(state) is not VirtioSlotState:
            raise DeviceStateError(f"{name}: expected a VirtioSlotState, got "
                                   f"{type(state).__name__}")
        if state.device_id != int(self.device.device_id):
            raise DeviceStateError(f"{name}: the saved device has virtio device ID "
                                   f"{state.device_id!r:.20}, this one "
                                   f"{int(self.device.device_id)}")
        if self._scope is not None:
            raise DeviceStateError(f"{name}: cannot restore a device that is being served")
        state_class = self.device.state_class
        if state_class is None:
            raise DeviceStateError(f"{name}: a {type(self.device).__name__} cannot be "
                                   "restored from a snapshot")
        if not isinstance(state.device_state, bytes):
            raise DeviceStateError(f"{name}: the device state is not bytes")
        try:
            device_state: Any = decode(state.device_state, state_class, path=name)
        except SnapshotError as e:
            raise DeviceStateError(str(e)) from None
        # The transport checks all of its part before it changes anything; the device
        # then checks its own before changing anything. A device that refuses after the
        # transport took its state leaves a slot nobody serves: restore is all or
        # nothing for the VM, which is thrown away on any error.
        self.transport.restore_state(state.transport)
        self.device.restore_state(device_state)
        self._paused = True
        # vhost-user request counts go on from the restored used positions.
        self._seen_used = [saved.next_used if saved.ready else 0
                           for saved in state.transport.queues]

    def _give_back_chains(self) -> None:
        """After the device task stopped: every chain taken and not returned goes back
        to the driver, so the queue state alone says where the device is."""
        if self.external:
            return  # the back-end's GET_VRING_BASE answer is its position
        memory = self.transport.memory
        for index, queue in enumerate(self.transport.queues):
            if not queue.state.ready:
                continue
            try:
                untaken, returned = queue.give_back(memory)
                if returned and queue.should_notify(memory):
                    self.transport.signal_used()
            except QueueError as e:
                self.transport.set_needs_reset(f"queue {index}: {e}")
                continue
            if untaken or returned:
                self._log.debug("chains given back on pause", queue=index,
                                untaken=untaken, returned_empty=returned)

    def transport_state(self) -> MmioTransportState:
        """The transport's part of :meth:`save_state` (same conditions). For a
        vhost-user device each ready queue's ``next_available`` is the back-end's
        position from GET_VRING_BASE, and ``next_used`` the used idx in guest memory:
        the back-end, not the front-end, moves it."""
        state = self.transport.save_state()
        if not self.external:
            return state
        memory = self.transport.memory
        queues = []
        for saved in state.queues:
            if saved.ready:
                try:
                    saved = dataclasses.replace(
                        saved, next_used=memory.read_u16(saved.used_ring + 2))
                except GuestMemoryError:
                    pass
            queues.append(saved)
        return dataclasses.replace(state, queues=queues)

    def resumed(self) -> None:
        """The VM was resumed (event-loop thread): make the device look at its rings.

        Buffers the driver made available while paused were not taken, and the driver
        will not notify them again; a spurious kick per queue wakes the device task
        wherever it waits. A vhost-user back-end was never held back: nothing to do.
        """
        if self.external:
            return
        for index, fd in enumerate(self.kick_fds):
            with self._kick_lock:
                self._injected_kicks[index] += 1
            signal_eventfd(fd)

    def count_kicks(self, queue_index: int, count: int) -> None:
        """``count`` notifications were read from queue ``queue_index``'s eventfd (any
        thread): count those that were the driver's."""
        with self._kick_lock:
            own = min(count, self._injected_kicks[queue_index])
            self._injected_kicks[queue_index] -= own
            self._metrics.notifications += count - own

    def metrics(self) -> DeviceMetrics:
        """A copy of the device's counters now (event-loop thread)."""
        self.observe_used_rings()
        m = self._metrics
        return DeviceMetrics(kind=m.kind, requests=m.requests, bytes=m.bytes,
                             notifications=m.notifications)

    def observe_used_rings(self) -> None:
        """vhost-user only (a no-op otherwise): the back-end pushes used entries without
        us, so count how far each used ring's idx moved since the last look. Called for
        metrics, before a driver reset clears the rings, and by the VM before its memory
        goes away; exact while that happens at least once per 65536 completions of a
        queue."""
        if not self.external:
            return
        memory = self.transport.memory
        for index, queue in enumerate(self.transport.queues):
            state = queue.state
            if not state.ready:
                self._seen_used[index] = 0
                continue
            try:
                used = memory.read_u16(state.used_ring + 2)
            except GuestMemoryError:  # a ring outside RAM, or the VM is gone
                continue
            self._metrics.requests += (used - self._seen_used[index]) & 0xFFFF
            self._seen_used[index] = used

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

    def _reset(self, transport: MmioTransport) -> bool:
        """Block the resetting vCPU until the device task has stopped (the driver will
        reuse the rings' memory as soon as it sees status 0), for at most
        :data:`RESET_TIMEOUT_S`; False if it has not stopped by then (the transport then
        keeps the reset pending and asks :meth:`_device_stopped` on each Status read).
        Rare, so the latency of a round trip to the event loop does not matter."""
        try:
            return bool(trio.from_thread.run(self._stop_and_wait, trio_token=self._token))
        except trio.RunFinishedError:
            return True  # the event loop is gone, and every device task with it
        except trio.Cancelled:
            return self._device_stopped()

    def _device_stopped(self) -> bool:
        """No device task runs, and the device vouches that nothing it started still
        touches guest memory (any thread; never blocks)."""
        return self._idle.is_set() and self._unstopped_reason() is None

    def _unstopped_reason(self) -> str | None:
        """Why a device whose task has returned may still write guest memory (a
        vhost-user back-end that did not confirm that its rings stopped), or None."""
        reason = getattr(self.device, "stop_unconfirmed", None)
        return reason if isinstance(reason, str) else None

    # -- event-loop side ----------------------------------------------------------------

    def _start(self) -> None:
        if self._nursery is None or self._scope is not None or self._paused:
            return
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._idle.clear()
        self._nursery.start_soon(self._serve, self._scope, self._stopped)

    async def _stop_and_wait(self, why: str = "reset") -> bool:
        """Cancel the device task and wait for it; whether the device has stopped."""
        scope, stopped = self._scope, self._stopped
        if scope is not None and stopped is not None:
            scope.cancel()
            with trio.move_on_after(RESET_TIMEOUT_S):
                await stopped.wait()
            if not stopped.is_set():
                self._log.warning("device did not stop within the timeout; the reset "
                                  "completes once it has, a pause fails",
                                  during=why, timeout_s=RESET_TIMEOUT_S)
                return False
        # The transport resets the rings next: a last look at how far a back-end got.
        self.observe_used_rings()
        reason = self._unstopped_reason()
        if reason is not None:
            self._log.warning("device cannot confirm that it stopped writing guest memory; "
                              "the reset completes once it can, a pause fails",
                              during=why, reason=reason)
            return False
        return True

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
            if self._scope is scope:
                # The next activation may start a task; a reset finds nothing to wait for.
                self._scope = self._stopped = None
            stopped.set()
            self._idle.set()


class _ServedQueue:
    """A queue as a device in this process sees it: the transport's VirtQueue, with pops
    held back while the VM is paused and what passes through counted.

    Only ``pop``, ``take``, ``push``, ``enable_notifications``, ``may_take`` and ``took``
    differ;
    everything else is the VirtQueue's own (bound once here, so the hot path pays one
    call, not a lookup).
    """

    def __init__(self, queue: VirtQueue, gate: PauseGate, metrics: DeviceMetrics,
                 counting: threading.Lock) -> None:
        self._queue = queue
        self._gate = gate
        self._metrics = metrics
        # The device's queues may be served from threads of their own (net's RX and TX):
        # their updates of the one DeviceMetrics must not lose each other's.
        self._counting = counting
        self._pop = queue.pop
        self._push = queue.push
        self._enable = queue.enable_notifications
        self.disable_notifications = queue.disable_notifications
        self.should_notify = queue.should_notify

    @property
    def state(self) -> QueueState:
        return self._queue.state  # a restore may replace the state object

    def __getattr__(self, name: str) -> object:
        return getattr(self._queue, name)

    def __repr__(self) -> str:
        return f"<served {self._queue!r}>"

    def pop(self, memory: MemoryAccess) -> DescriptorChain | None:
        # Paused: nothing is available as far as the device can tell.
        if not self._gate.is_open:
            return None
        chain = self._pop(memory)
        if chain is not None:
            with self._counting:
                self._metrics.bytes += chain.readable_length
        return chain

    def take(self, memory: MemoryAccess) -> DescriptorChain | None:
        # Even while paused: for a chain the device has written into already.
        chain = self._pop(memory)
        if chain is not None:
            with self._counting:
                self._metrics.bytes += chain.readable_length
        return chain

    def push(self, memory: MemoryAccess, head: int, written: int) -> None:
        self._push(memory, head, written)
        metrics = self._metrics
        with self._counting:
            metrics.requests += 1
            metrics.bytes += written

    def may_take(self) -> bool:
        return self._gate.is_open and self._queue.may_take()

    def took(self, memory: MemoryAccess, chains: int, readable_bytes: int,
             written_bytes: int) -> None:
        # What pop and push would have counted for those chains.
        metrics = self._metrics
        with self._counting:
            metrics.requests += chains
            metrics.bytes += readable_bytes + written_bytes

    def enable_notifications(self, memory: MemoryAccess) -> bool:
        more = self._enable(memory)
        # Paused: report nothing pending, so that the device goes back to wait_kick
        # (which holds it until the resume) instead of draining a ring pop keeps empty.
        return more and self._gate.is_open


class _MmioDeviceContext:
    """The DeviceContext of a device running behind virtio-mmio in this process."""

    def __init__(self, slot: VirtioMmioSlot) -> None:
        self._slot = slot
        self._gate = slot.gate
        self._metrics = slot._metrics
        transport = slot.transport
        self.memory = transport.memory
        self.features = transport.negotiated_features
        self.queues: Sequence[VirtQueue | None] = [
            # Duck-typed: a _ServedQueue does everything a device asks of a VirtQueue.
            cast(VirtQueue, _ServedQueue(queue, slot.gate, slot._metrics, slot._count_lock))
            if queue.state.ready else None for queue in transport.queues
        ]
        # The first wait returns at once: the driver may have queued buffers before it
        # set DRIVER_OK, and kicked before we were waiting.
        self._primed = [True] * len(self.queues)

    async def wait_kick(self, queue_index: int) -> None:
        """Wait for the driver's kick (counting the notifications the eventfd holds),
        then for the VM to be running."""
        fd = self._slot.kick_fds[queue_index]
        primed = self._primed[queue_index]
        self._primed[queue_index] = False
        while True:
            try:
                kicks = os.eventfd_read(fd)
            except BlockingIOError:
                if primed:  # nothing to count: the first look happens anyway
                    break
                await trio.lowlevel.wait_readable(fd)
                continue
            self.kicks_received(queue_index, kicks)
            break
        await self._gate.wait_open()

    def kicks_received(self, queue_index: int, count: int) -> None:
        """A device that reads its kick eventfd itself (blk's I/O thread) reports how
        many notifications one read took; any thread. The slot's own resume kicks are
        not the driver's and are not counted."""
        self._slot.count_kicks(queue_index, count)

    def signal_used(self, queue_index: int) -> None:
        queue = self.queues[queue_index]
        if queue is not None and queue.should_notify(self.memory):
            self._slot.transport.signal_used()

    def direct_used_fd(self, queue_index: int) -> int:
        """For a device that interrupts the driver from C rather than through
        :meth:`signal_used` (blk's I/O thread): the irqfd to write, after applying
        ``should_notify``'s rules itself. The transport then reports USED_BUFFER in
        InterruptStatus whenever the device is activated, as it does for a vhost-user
        device, since it no longer sees each notification: the slot built it so for a
        device whose ``interrupts_directly`` says yes."""
        if not self._slot.transport.reports_used_always:
            raise DeviceStateError(f"{self._slot.device.name}: the transport was not "
                                   "built for a device that interrupts directly")
        return self._slot.irq_fd

    def on_pause(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever the VM starts to pause (the gate closes), until
        the function returned is called: for a device thread that does not look at the
        gate before each request (blk's C run), so that it comes back and takes no new
        request while paused."""
        return self._gate.notify_on_close(callback)

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
