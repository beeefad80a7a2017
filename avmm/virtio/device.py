"""What every virtio device implements, whichever transport or process carries it.

A device knows what requests mean (read a sector, send a frame) and nothing about
registers, KVM or eventfds. A transport (virtio-mmio in this process, later virtio-pci
or a vhost-user backend in another process) owns the device, negotiates features, lets
the driver set up the queues and, once the driver sets DRIVER_OK, calls
:meth:`VirtioDevice.run` with a :class:`DeviceContext`. ``run`` serves the queues until
the transport cancels it. A driver reset then calls :meth:`VirtioDevice.reset`; a stop
that is not a reset (a vhost-user ring stop, QEMU's ``stop``/``cont``, later a
snapshot) does not: the transport gives every chain the device took and did not return
back to the driver (:meth:`VirtQueue.give_back`) and may call ``run`` again later, on
the same rings, from the position the queue then records.

Errors: a request the device cannot satisfy (an I/O error, an unknown request type) is
answered in-band with the device's error status. A driver that breaks the rules (a
looping or out-of-RAM descriptor chain, a request too short to parse) raises
:class:`DeviceNeedsReset` (the queue raises its subclass ``QueueError``): the transport
logs it, stops the device and sets DEVICE_NEEDS_RESET for the driver to see. Nothing a
guest does may escape as any other exception.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import trio

from .. import concurrency
from ..devices._state import DeviceStateError
from ..errors import AvmmError

if TYPE_CHECKING:
    from ..memory import MemoryAccess
    from .queue import DescriptorChain, VirtQueue

# Feature bits shared by all devices (virtio 1.2 §6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34

#: Features every avmm device offers; the transport adds them to the device's own.
COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX


class DeviceId(IntEnum):
    """Virtio device IDs (virtio 1.2 §5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4


class DeviceNeedsReset(AvmmError):
    """The driver broke the protocol; the device cannot go on until it is reset."""


class DeviceContext(Protocol):
    """What a transport gives a running device. Valid from ``run()`` until it returns."""

    #: Guest memory; every address a driver hands over is checked against it.
    memory: MemoryAccess
    #: The queues the driver set up, by index (queues it did not enable are absent: None).
    queues: Sequence[VirtQueue | None]
    #: The feature bits the driver accepted.
    features: int

    async def wait_kick(self, queue_index: int) -> None:
        """Wait until the driver notifies queue ``queue_index`` (at once if a
        notification arrived since the last call)."""
        ...

    def signal_used(self, queue_index: int) -> None:
        """Used buffers were added to the queue: interrupt the driver if the queue's
        notification suppression allows it."""
        ...

    def signal_config_change(self) -> None:
        """The device's configuration space changed."""
        ...


class VirtioDevice(abc.ABC):
    """One virtio device model.

    Subclasses set :attr:`device_id` and :attr:`queue_max_sizes`, report their feature
    bits and config space, and serve their queues in :meth:`run`. All state a snapshot
    would need lives in plain attributes of the device object (never in task locals).
    """

    device_id: DeviceId
    #: Maximum size of each queue, by index; the device has ``len(...)`` queues.
    queue_max_sizes: tuple[int, ...]
    #: Name for logs and metrics ("blk0", "net0").
    name: str = "virtio"

    @abc.abstractmethod
    def device_features(self) -> int:
        """Device-specific feature bits offered (the transport adds COMMON_FEATURES)."""

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the config space at ``offset``; out of range reads are
        zero-filled (never an exception)."""

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - optional
        """A driver write to the config space; most devices ignore it."""

    @abc.abstractmethod
    async def run(self, context: DeviceContext) -> None:
        """Serve the queues until cancelled. May raise DeviceNeedsReset.

        However it ends, ``run`` leaves no chain in the device: chains it took and did
        not return belong to the transport then, which gives them back to the driver
        (the next ``run`` takes them again) or resets the queues. So a device keeps no
        reference to a chain across runs; whatever it wrote into such a chain counts as
        not written. Host-side state (console input not yet delivered, counters) may
        stay: a stop is not a reset."""

    def reset(self) -> None:  # noqa: B027 - optional
        """Back to the state before the driver first touched the device (after ``run``
        has ended, or before it ever ran): a driver reset, or a new front-end."""

    # -- snapshots ------------------------------------------------------------------------
    #
    # The device's own state (the transport's registers and queue positions are saved by
    # the transport). The legacy devices' convention (avmm/devices/_state.py): a frozen
    # dataclass of plain values with ``STATE_VERSION: ClassVar[int]``, which the snapshot
    # codec (avmm/state/codec.py) encodes; ``restore_state`` checks everything before it
    # changes anything and raises DeviceStateError with one line.

    #: The class :meth:`save_state` returns and :meth:`restore_state` takes; None: this
    #: device cannot be saved (the default, so that a device whose state nobody wrote
    #: down is refused rather than silently restored without it).
    state_class: ClassVar[type | None] = None

    def save_state(self) -> Any:
        """The device's own state, an instance of :attr:`state_class`. Called only while
        ``run`` is not running (the slot paused the device), so nothing is in flight.
        A device with nothing to save returns an instance of an empty state class of its
        own. Raises DeviceStateError for a device that cannot be saved."""
        raise DeviceStateError(f"{self.name}: a {type(self).__name__} cannot be saved in "
                               "a snapshot")

    def restore_state(self, state: Any) -> None:
        """Load ``state`` (from :meth:`save_state`, maybe of another process) before the
        device is served again (``run`` is not running). Checks all of it first and
        raises DeviceStateError (one line) for a state that does not fit this device."""
        raise DeviceStateError(f"{self.name}: a {type(self).__name__} cannot be restored "
                               "from a snapshot")


ChainHandler = Callable[["DescriptorChain"], Awaitable[int]]


def offered_queue_size(size: int, largest: int) -> int:
    """``size`` if it is a queue size a device may offer (a power of two from 1 to
    ``largest``), else ValueError naming it."""
    if not isinstance(size, int) or not 0 < size <= largest or size & (size - 1):
        raise ValueError(f"queue size must be a power of two from 1 to {largest}, "
                         f"got {size!r}")
    return size


class PauseGate:
    """Open while the VM runs, closed while it is paused (event-loop side only).

    A transport that supports pausing holds its devices' queue tasks here: it makes
    ``wait_kick`` wait for the gate and ``pop`` take nothing while the gate is closed,
    so a pausing VM's devices take no new requests (requests in flight still finish)
    until the transport has stopped them (avmm's virtio-mmio slot stops the device
    task on a pause, so a paused device does nothing at all; the gate covers the time
    between the VM's decision to pause and that stop).
    ``resumes`` counts openings, so a transport can tell that it must look at the rings
    again: buffers made available during the pause were not taken and will not be
    notified again.
    """

    def __init__(self) -> None:
        self._opened = trio.Event()
        self._opened.set()
        #: A plain attribute, not a property: queues look at it for every request, on
        #: whatever thread serves them.
        self.is_open = True
        self.resumes = 0
        self._on_close: list[Callable[[], None]] = []

    def notify_on_close(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on the closing thread, after ``is_open`` went False) each
        time the gate closes, until the function returned is called: for a device
        thread that serves without looking at the gate before each request (blk's C
        run), so that it comes back and looks. Any thread."""
        self._on_close.append(callback)

        def forget() -> None:
            with contextlib.suppress(ValueError):
                self._on_close.remove(callback)

        return forget

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self._opened = trio.Event()
            for callback in list(self._on_close):
                callback()

    def open(self) -> None:
        if not self.is_open:
            self.is_open = True
            self.resumes += 1
            self._opened.set()

    async def wait_open(self) -> None:
        """Return once the gate is open (a checkpoint either way)."""
        await self._opened.wait()


async def serve_queue(context: DeviceContext, queue_index: int, handle: ChainHandler) -> None:
    """The usual queue loop: wait for a kick, handle every available chain, return each
    to the used ring with the byte count ``handle`` reports written, and signal the
    driver once per batch.

    Pausing needs nothing here: a transport that pauses its devices hands out queues
    whose ``pop`` takes nothing while paused, and a ``wait_kick`` that waits for the
    resume (see :class:`PauseGate`).

    While a batch is being drained the driver is asked not to notify (flags or
    avail_event, whichever was negotiated); notifications are re-enabled before waiting,
    and the ring is checked once more so a buffer added in between is not missed.

    Cancelled while ``handle`` works on a chain (a stop), the chain is not returned
    here: the transport gives it back to the driver, and the next run hands it to
    ``handle`` again.
    """
    queue = context.queues[queue_index]
    if queue is None:
        return
    memory = context.memory
    batch_limit = queue.state.size
    while True:
        await context.wait_kick(queue_index)
        while True:
            queue.disable_notifications(memory)
            handled = 0
            # A batch is at most one ring's worth, so that a driver that keeps refilling
            # still gets its interrupts and other tasks get to run.
            while handled < batch_limit and (chain := queue.pop(memory)) is not None:
                written = await handle(chain)
                queue.push(memory, chain.head, written)
                handled += 1
            if handled:
                context.signal_used(queue_index)
            await trio.lowlevel.checkpoint()
            if handled < batch_limit and not queue.enable_notifications(memory):
                break


async def run_together(*tasks: Callable[[], Awaitable[object]]) -> None:
    """Run the tasks in one nursery. When one fails the others are cancelled, and its
    exception propagates as itself rather than inside an ExceptionGroup, so that the
    transport sees a DeviceNeedsReset as one (preferred when several fail)."""
    await concurrency.run_together(*tasks, prefer=(DeviceNeedsReset,))
