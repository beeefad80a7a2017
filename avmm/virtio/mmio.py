"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2): one device's register file.

A :class:`MmioTransport` is the :class:`~avmm.bus.BusDevice` mapped at a device's 4 KiB
MMIO window. It owns one :class:`~avmm.virtio.device.VirtioDevice` and its
:class:`~avmm.virtio.queue.VirtQueue` objects, and implements what every device shares:
the identification registers, feature negotiation, the device status state machine
(§2.1, §3.1), queue setup, InterruptStatus/InterruptACK, ConfigGeneration, the device
configuration space at 0x100 (delegated to the device) and reset. It knows nothing about
KVM, eventfds or trio: it reaches the VM only through :class:`TransportCallbacks`.

Register layout (all control registers are 32 bits, little-endian)::

    0x000 MagicValue R        0x050 QueueNotify W           0x0a0 QueueDeviceLow W
    0x004 Version R           0x060 InterruptStatus R       0x0a4 QueueDeviceHigh W
    0x008 DeviceID R          0x064 InterruptACK W          0x0ac SHMSel W
    0x00c VendorID R          0x070 Status RW               0x0b0 SHMLenLow/High R
    0x010 DeviceFeatures R    0x080 QueueDescLow W          0x0b8 SHMBaseLow/High R
    0x014 DeviceFeaturesSel W 0x084 QueueDescHigh W         0x0c0 QueueReset RW
    0x020 DriverFeatures W    0x090 QueueDriverLow W        0x0fc ConfigGeneration R
    0x024 DriverFeaturesSel W 0x094 QueueDriverHigh W       0x100+ device config RW
    0x030 QueueSel W          0x034 QueueNumMax R
    0x038 QueueNum W          0x044 QueueReady RW

Where the spec leaves the device room, this transport decides as follows:

* Status bits are only ever added by the driver (``new = old | written``); only a write
  of 0 clears them (a reset). The steps must come in order (ACKNOWLEDGE, DRIVER,
  FEATURES_OK, DRIVER_OK; several may be set by one write); a bit whose predecessors are
  missing does not stick. FAILED sticks at any time and stops the device; every later
  non-zero Status write is ignored until the reset. DEVICE_NEEDS_RESET is the device's
  bit: a driver cannot set it.
* FEATURES_OK sticks only if the driver's features are a subset of the offered ones and
  include VIRTIO_F_VERSION_1 (§2.2.2, §6.1); otherwise the bit stays clear, which is how
  §3.1.1 tells the driver the device refused. Driver feature words above 1 would only
  hold features never offered: non-zero writes there are ignored and logged.
* DRIVER_OK sticks only if every ready queue passes :meth:`VirtQueue.validate`; if one
  does not, DEVICE_NEEDS_RESET is set instead (DRIVER_OK stays clear, so no config
  change interrupt) and the device is not activated. While DEVICE_NEEDS_RESET is set,
  DRIVER_OK cannot be set: the driver must reset first.
* Queue configuration (QueueNum, the ring addresses, QueueReady) cannot change while
  the queue is ready (§4.2.2.2) or once DRIVER_OK is set: without VIRTIO_F_RING_RESET
  (not offered) a running device's queues are fixed. Such writes are ignored and
  logged; a QueueReady write of 0 that is ignored reads back as 1, which is how the
  driver, which must read QueueReady back (§4.2.2.2), learns it did not take effect.
* QueueNum takes the value written: a split queue's size must be a power of two no
  larger than QueueNumMax (§2.7), and one that is not is logged at once and then makes
  DRIVER_OK fail validation (DEVICE_NEEDS_RESET), rather than leaving the device on a
  size the driver is not using.
* QueueNotify is forwarded for a ready queue whether or not DRIVER_OK is set yet: an
  ioeventfd registered at :attr:`MmioTransport.NOTIFY_OFFSET` forwards it regardless,
  and both paths should behave alike. The value is the queue index in its low 16 bits
  (VIRTIO_F_NOTIFICATION_DATA is not offered, so the upper half is ignored).
* ConfigGeneration changes (by one, modulo 2^32) whenever the device reports a config
  change, whenever DEVICE_NEEDS_RESET is raised while DRIVER_OK is set, and on every
  reset (the device's reset may rewrite its config space; a value that only ever moves
  forward never repeats one a driver may hold from before). It is never set back to 0.
* A config change before DRIVER_OK bumps ConfigGeneration but sends no interrupt (there
  is no driver interrupt handler to tell yet); the driver reads config under the
  generation check anyway.
* A reset completes only once the device has stopped touching guest memory (§2.4.1): the
  ``reset`` callback stops it and says whether it has. If it has not, the reset is
  *pending*: Status keeps reading what it read before (non-zero), the driver, which must
  wait for a read of 0 before it initialises the device again, polls it, and each
  Status read asks the ``stopped`` callback; the first read after the device has
  stopped completes the reset and reads 0. Until then non-zero Status writes are
  ignored (and logged); a write of 0 asks the ``reset`` callback again. A device that
  never stops leaves Status non-zero for good, with a log line saying so.
* Used buffer notifications are only sent while the device is activated, so a device
  task that outlives a reset can never interrupt the driver (§2.4).
* A device whose queues are served outside this process (a vhost-user back-end that
  writes the irqfd itself) never calls :meth:`~MmioTransport.signal_used`. Built with
  ``external_used_notifications=True``, the transport reports USED_BUFFER in
  InterruptStatus whenever the device is activated, so a driver whose interrupt handler
  checks the bit (Linux's virtio-mmio does) looks at its used rings on every interrupt;
  at worst it finds nothing new. ``common_features`` (default COMMON_FEATURES) is what
  the transport adds to the device's features; such a device passes 0 and offers its
  back-end's features as they are.
  The in-process slot builds it so as well for a device whose data path writes the
  irqfd from C (virtio-blk's ``interrupts_directly``).
* No shared memory regions: SHMLen and SHMBase read as all ones, as the spec says for a
  region that does not exist. QueueReset reads 0 and ignores writes (RING_RESET is not
  offered). The legacy registers (GuestPageSize, QueueAlign, QueuePFN) do not exist.
* Control registers must be read and written with aligned 4-byte accesses; any other
  access, an access to an undefined offset, a read of a write-only register or a write
  to a read-only one reads as zeros or is dropped, and is logged once. The config space
  takes 1-, 2-, 4- and 8-byte accesses at any offset.

Threading: :meth:`~MmioTransport.read` and :meth:`~MmioTransport.write` run on vCPU
threads, several at once; :meth:`~MmioTransport.signal_used`,
:meth:`~MmioTransport.signal_config_change` and :meth:`~MmioTransport.set_needs_reset`
run on whichever thread serves the device (usually the event loop's). One lock guards
the register state and is never held while a callback or device method runs. Status
transitions (the only writes that call ``activate`` and ``reset``) are serialised by a
second, re-entrant lock, so two vCPUs cannot activate or reset the device at once.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar, final

import structlog

from ..devices._state import DeviceStateError
from ..memory import MemoryAccess
from ..state._widths import U8, U32, U64
from .device import (
    COMMON_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from .queue import QueueError, SavedQueueState, VirtQueue

__all__ = [
    "CONFIG_SPACE_OFFSET",
    "MAGIC_VALUE",
    "MMIO_VERSION",
    "VENDOR_ID",
    "WINDOW_SIZE",
    "DeviceStatus",
    "InterruptReason",
    "MmioTransport",
    "MmioTransportState",
    "Register",
    "TransportCallbacks",
    "TransportStateError",
]

log = structlog.get_logger(__name__)

#: "virt" as a little-endian u32.
MAGIC_VALUE = 0x74726976
#: The virtio-mmio register layout version (2: virtio 1.0 and later; 1 was legacy).
MMIO_VERSION = 2
#: "AVMM" as a little-endian u32.
VENDOR_ID = 0x4D4D5641
#: The size of one device's MMIO window.
WINDOW_SIZE = 0x1000
#: Where the device-specific configuration space starts in the window.
CONFIG_SPACE_OFFSET = 0x100

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
#: How many distinct guest mistakes one transport logs before it only drops them.
_LOGGED_KEYS_LIMIT = 256


class Register(IntEnum):
    """Control register offsets in the window (virtio 1.2 §4.2.2, version 2 layout)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


_READABLE = frozenset({
    Register.MAGIC_VALUE, Register.VERSION, Register.DEVICE_ID, Register.VENDOR_ID,
    Register.DEVICE_FEATURES, Register.QUEUE_NUM_MAX, Register.QUEUE_READY,
    Register.INTERRUPT_STATUS, Register.STATUS, Register.SHM_LEN_LOW, Register.SHM_LEN_HIGH,
    Register.SHM_BASE_LOW, Register.SHM_BASE_HIGH, Register.QUEUE_RESET,
    Register.CONFIG_GENERATION,
})
_WRITABLE = frozenset({
    Register.DEVICE_FEATURES_SEL, Register.DRIVER_FEATURES, Register.DRIVER_FEATURES_SEL,
    Register.QUEUE_SEL, Register.QUEUE_NUM, Register.QUEUE_READY, Register.QUEUE_NOTIFY,
    Register.INTERRUPT_ACK, Register.STATUS, Register.QUEUE_DESC_LOW,
    Register.QUEUE_DESC_HIGH, Register.QUEUE_DRIVER_LOW, Register.QUEUE_DRIVER_HIGH,
    Register.QUEUE_DEVICE_LOW, Register.QUEUE_DEVICE_HIGH, Register.SHM_SEL,
    Register.QUEUE_RESET,
})
_REGISTERS = {register.value: register for register in Register}

#: The queue registers that hold an address half: which QueueState field, which half.
_ADDRESS_REGISTERS = {
    Register.QUEUE_DESC_LOW: ("descriptor_table", 0),
    Register.QUEUE_DESC_HIGH: ("descriptor_table", 32),
    Register.QUEUE_DRIVER_LOW: ("available_ring", 0),
    Register.QUEUE_DRIVER_HIGH: ("available_ring", 32),
    Register.QUEUE_DEVICE_LOW: ("used_ring", 0),
    Register.QUEUE_DEVICE_HIGH: ("used_ring", 32),
}


class DeviceStatus(IntFlag):
    """The device status field (virtio 1.2 §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


#: The bits a driver may set, and the steps each one needs before it (§3.1.1).
_STEPS = (
    (DeviceStatus.ACKNOWLEDGE, 0),
    (DeviceStatus.DRIVER, DeviceStatus.ACKNOWLEDGE),
    (DeviceStatus.FEATURES_OK, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER),
    (DeviceStatus.DRIVER_OK,
     DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK),
)
_DRIVER_BITS = int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                   | DeviceStatus.DRIVER_OK | DeviceStatus.FAILED)


class InterruptReason(IntFlag):
    """InterruptStatus / InterruptACK bits (virtio 1.2 §4.2.2)."""

    USED_BUFFER = 1
    CONFIG_CHANGE = 2


_INTERRUPT_BITS = int(InterruptReason.USED_BUFFER | InterruptReason.CONFIG_CHANGE)


class TransportStateError(DeviceStateError):
    """A saved transport state does not fit this transport (wrong number of queues, a
    queue's maximum size differs, a field out of range): the snapshot belongs to
    another device, or is corrupt."""


@final
@dataclass(frozen=True)
class TransportCallbacks:
    """How a transport reaches the VM. The thread each one runs on is documented; none
    is called with the transport's register lock held, so each may call back into the
    transport (``activate`` typically reads :attr:`MmioTransport.queues` and
    :attr:`MmioTransport.negotiated_features`).

    An exception from ``activate``, ``reset`` or ``queue_notify`` is logged and sets
    DEVICE_NEEDS_RESET; one from ``interrupt`` is logged once (raising DEVICE_NEEDS_RESET
    would need the very interrupt that failed). None reaches the vCPU.
    """

    #: The driver set DRIVER_OK (features accepted, every ready queue valid): start
    #: serving. Called once per activation, on the vCPU thread that wrote Status.
    activate: Callable[[MmioTransport], None]
    #: Stop serving, and return once the device has stopped touching guest memory (the
    #: driver reuses the rings' memory as soon as it reads status 0), or once it has
    #: waited as long as it sensibly may: then return False, and the reset stays
    #: pending until ``stopped`` says the device has stopped. Any other return value
    #: means stopped. Called on the thread that wrote 0 (or FAILED) to Status, or that
    #: called :meth:`MmioTransport.reset`; it may come when nothing is being served (a
    #: driver that fails or resets before DRIVER_OK), and must then just return.
    reset: Callable[[MmioTransport], bool | None]
    #: Pulse the device's interrupt line (an edge). Called on whichever thread signalled:
    #: the device's for used buffers and config changes, a vCPU's rarely.
    interrupt: Callable[[], None]
    #: A QueueNotify write for queue N reached the transport (no ioeventfd caught it):
    #: wake the task serving queue N. Called on the vCPU thread; must not block.
    queue_notify: Callable[[int], None]
    #: While a reset is pending (``reset`` returned False): has the device stopped
    #: touching guest memory now? Called on the vCPU thread that reads Status; must not
    #: block. None: only a new write of 0 (``reset`` again) can complete the reset.
    stopped: Callable[[], bool] | None = None


@dataclass(frozen=True)
class MmioTransportState:
    """Everything a snapshot of the transport needs, as plain values (the device's own
    state and guest memory are saved separately): frozen, versioned, and encodable by
    the snapshot codec (avmm/state/codec.py)."""

    STATE_VERSION: ClassVar[int] = 1

    status: U8 = 0
    device_features_sel: U32 = 0
    driver_features_sel: U32 = 0
    #: The driver's feature bits as written so far (negotiated once FEATURES_OK is set).
    driver_features: U64 = 0
    queue_sel: U32 = 0
    interrupt_status: U8 = 0
    config_generation: U32 = 0
    #: The features the device offered (the driver's must be among them on restore).
    device_features: U64 = 0
    #: The driver asked for a reset that waited for the device to stop: the first Status
    #: read after the restore completes it (the restored device is not running).
    reset_pending: bool = False
    queues: list[SavedQueueState] = field(default_factory=list)


@final
class MmioTransport:
    """The virtio-mmio register file of one device (see the module docstring for the
    rules). ``read``/``write`` never raise, whatever the guest does."""

    #: Where QueueNotify lives in the window: the VM may register a 4-byte ioeventfd here
    #: per queue with datamatch = queue index, so notifications stay in the kernel.
    NOTIFY_OFFSET = int(Register.QUEUE_NOTIFY)

    def __init__(self, device: VirtioDevice, memory: MemoryAccess,
                 callbacks: TransportCallbacks, *, name: str | None = None,
                 common_features: int = COMMON_FEATURES,
                 external_used_notifications: bool = False) -> None:
        self.device = device
        self.memory = memory
        self.name = name or device.name
        self.queues: list[VirtQueue] = [VirtQueue(size) for size in device.queue_max_sizes]
        self._callbacks = callbacks
        self._log = log.bind(device=self.name)
        self._device_id = int(device.device_id) & _U32
        self._offered_features = (device.device_features() | common_features) & _U64
        self._external_used = external_used_notifications
        self._initial_queue_states = [copy.copy(queue.state) for queue in self.queues]
        # Register state; guarded by _lock (never held while calling out).
        self._lock = threading.Lock()
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._interrupt_status = 0
        self._config_generation = 0
        # Between ``activate`` and ``reset``: the VM is (or may be) serving the device.
        self._activated = False
        # The driver wrote 0 but the device has not stopped yet (see the docstring).
        self._reset_pending = False
        # Serialises status transitions, which call activate/reset outside _lock.
        self._transition_lock = threading.RLock()
        self._logged: set[tuple[object, ...]] = set()
        self._logged_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"<MmioTransport {self.name!r} status=0x{self._status:02x} "
                f"queues={len(self.queues)}>")

    # -- what the VM and the device see ------------------------------------------------

    @property
    def status(self) -> int:
        """The device status byte as the driver reads it."""
        return self._status

    @property
    def driver_ok(self) -> bool:
        """The driver has set DRIVER_OK (and not reset since)."""
        return bool(self._status & DeviceStatus.DRIVER_OK)

    @property
    def activated(self) -> bool:
        """``activate`` was called and ``reset`` has not been since (after
        :meth:`restore`: the state had DRIVER_OK without FAILED or DEVICE_NEEDS_RESET)."""
        return self._activated

    @property
    def reset_pending(self) -> bool:
        """The driver (or the VM) asked for a reset that waits for the device to stop;
        Status reads non-zero until it completes."""
        return self._reset_pending

    @property
    def offered_features(self) -> int:
        """The 64 feature bits offered: the device's own plus COMMON_FEATURES."""
        return self._offered_features

    @property
    def negotiated_features(self) -> int:
        """The features the driver accepted, once FEATURES_OK has stuck; 0 before."""
        with self._lock:
            if self._status & DeviceStatus.FEATURES_OK:
                return self._driver_features
            return 0

    @property
    def interrupt_status(self) -> int:
        """InterruptStatus as the driver would read it."""
        return self._interrupt_status

    @property
    def config_generation(self) -> int:
        return self._config_generation

    @property
    def reports_used_always(self) -> bool:
        """Built with ``external_used_notifications``: InterruptStatus reads
        USED_BUFFER whenever the device is activated."""
        return self._external_used

    def signal_used(self) -> None:
        """Used buffers were added (and the queue's suppression allows a notification):
        set InterruptStatus bit 0 and pulse the interrupt. Dropped unless the device is
        activated."""
        with self._lock:
            if not self._activated:
                return
            self._interrupt_status |= int(InterruptReason.USED_BUFFER)
        self._interrupt()

    def signal_config_change(self) -> None:
        """The device changed its config space: bump ConfigGeneration and, once the
        driver has set DRIVER_OK, set InterruptStatus bit 1 and pulse the interrupt."""
        with self._lock:
            notify = self._config_changed_locked()
        if notify:
            self._interrupt()

    def set_needs_reset(self, reason: str) -> None:
        """The device cannot go on until the driver resets it: set DEVICE_NEEDS_RESET,
        log ``reason``, and if DRIVER_OK is set send a config change notification
        (§2.1.2). Only the first call before a reset notifies. Does not stop the device:
        whoever calls this has stopped it or is about to."""
        with self._lock:
            first = not self._status & DeviceStatus.DEVICE_NEEDS_RESET
            notify = self._needs_reset_locked()
        if first:
            self._log.warning("virtio device needs reset", reason=reason)
        else:
            self._log.debug("virtio device needs reset again", reason=reason)
        if notify:
            self._interrupt()

    def reset(self) -> None:
        """Reset the device as a driver's write of 0 to Status does (for a VM reset):
        the ``reset`` callback (unless nothing was ever set up), the device's own
        :meth:`~VirtioDevice.reset`, then every register back to its initial value
        except ConfigGeneration, which moves on by one. If the device has not stopped,
        the reset stays pending (:attr:`reset_pending`) as a driver's would. Never
        raises."""
        try:
            self._reset()
        except Exception:
            self._internal_error("reset")

    # -- snapshots ---------------------------------------------------------------------

    def save_state(self) -> MmioTransportState:
        """A copy of the transport's state (take it while the device is not served, or
        the queue positions may move on)."""
        with self._lock:
            return MmioTransportState(
                status=self._status,
                device_features_sel=self._device_features_sel,
                driver_features_sel=self._driver_features_sel,
                driver_features=self._driver_features,
                queue_sel=self._queue_sel,
                interrupt_status=self._interrupt_status,
                config_generation=self._config_generation,
                device_features=self._offered_features,
                reset_pending=self._reset_pending,
                queues=[SavedQueueState.of(queue.state) for queue in self.queues],
            )

    def restore_state(self, state: MmioTransportState) -> None:
        """Load ``state`` (from :meth:`save_state`, maybe of another process). Calls no
        callback: if :attr:`activated` is true afterwards, the caller starts serving the
        device as ``activate`` would have. Only while the device is not being served.

        Everything is checked before anything changes (the state may come from a
        hostile file): TransportStateError (one line) if it does not fit this device's
        queues and features or holds a value this transport could not have saved. The
        rings of an activated device must lie in guest RAM as :meth:`VirtQueue.validate`
        checks at DRIVER_OK, so guest memory must hold the saved contents already.
        """
        self._check_state(state)
        with self._lock:
            self._status = state.status
            self._device_features_sel = state.device_features_sel
            self._driver_features_sel = state.driver_features_sel
            self._driver_features = state.driver_features
            self._queue_sel = state.queue_sel
            self._interrupt_status = state.interrupt_status
            self._config_generation = state.config_generation
            for saved, queue in zip(state.queues, self.queues, strict=True):
                queue.load_state(saved.live())
            stopped = DeviceStatus.FAILED | DeviceStatus.DEVICE_NEEDS_RESET
            self._reset_pending = state.reset_pending
            self._activated = bool(
                self._status & DeviceStatus.DRIVER_OK and not self._status & stopped
                and not state.reset_pending
            )

    # Older names, kept for callers of the first snapshot foundations.
    state = save_state
    restore = restore_state

    def _check_state(self, state: MmioTransportState) -> None:
        def refuse(reason: str) -> TransportStateError:
            return TransportStateError(f"{self.name}: saved transport state: {reason}")

        if type(state) is not MmioTransportState:
            raise refuse(f"expected an MmioTransportState, got {type(state).__name__}")
        for name, mask in (("status", 0xFF), ("device_features_sel", _U32),
                           ("driver_features_sel", _U32), ("driver_features", _U64),
                           ("queue_sel", _U32), ("interrupt_status", _INTERRUPT_BITS),
                           ("config_generation", _U32), ("device_features", _U64)):
            value = getattr(state, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 \
                    or value & ~mask:
                raise refuse(f"{name}={value!r:.40} is not an integer within 0x{mask:x}")
        if not isinstance(state.reset_pending, bool):
            raise refuse("reset_pending is not a bool")
        status = state.status
        if status & ~(_DRIVER_BITS | DeviceStatus.DEVICE_NEEDS_RESET):
            raise refuse(f"status 0x{status:02x} has bits no driver or device sets")
        for bit, needed in _STEPS:
            if status & bit and status & needed != needed:
                raise refuse(f"status 0x{status:02x} has {bit.name} without the steps "
                             "before it")
        if status & DeviceStatus.FEATURES_OK:
            unoffered = state.driver_features & ~self._offered_features
            if unoffered:
                raise refuse(f"the driver accepted features 0x{unoffered:x} that this "
                             "device does not offer")
        if not isinstance(state.queues, list | tuple):
            raise refuse("queues is not a list")
        if len(state.queues) != len(self.queues):
            raise refuse(f"{len(state.queues)} queues, the device has {len(self.queues)}")
        negotiated = state.driver_features if status & DeviceStatus.FEATURES_OK else None
        activated = bool(status & DeviceStatus.DRIVER_OK and not state.reset_pending
                         and not status & (DeviceStatus.FAILED
                                           | DeviceStatus.DEVICE_NEEDS_RESET))
        for index, (saved, queue) in enumerate(zip(state.queues, self.queues, strict=True)):
            self._check_queue_state(index, saved, queue, negotiated, activated, refuse)

    def _check_queue_state(self, index: int, saved: SavedQueueState, queue: VirtQueue,
                           negotiated: int | None, activated: bool,
                           refuse: Callable[[str], TransportStateError]) -> None:
        if type(saved) is not SavedQueueState:
            raise refuse(f"queue {index}: expected a SavedQueueState, got "
                         f"{type(saved).__name__}")
        if saved.max_size != queue.state.max_size:
            raise refuse(f"queue {index} has maximum size {saved.max_size!r:.20}, the "
                         f"device's has {queue.state.max_size}")
        for name, mask in (("size", _U32), ("descriptor_table", _U64),
                           ("available_ring", _U64), ("used_ring", _U64),
                           ("next_available", 0xFFFF), ("next_used", 0xFFFF)):
            value = getattr(saved, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 \
                    or value & ~mask:
                raise refuse(f"queue {index}: {name}={value!r:.40} is not an integer "
                             f"within 0x{mask:x}")
        for name in ("ready", "event_idx", "indirect"):
            if not isinstance(getattr(saved, name), bool):
                raise refuse(f"queue {index}: {name} is not a bool")
        signalled = saved.signalled_used
        if signalled is not None and (not isinstance(signalled, int)
                                      or isinstance(signalled, bool)
                                      or not 0 <= signalled <= 0xFFFF):
            raise refuse(f"queue {index}: signalled_used={signalled!r:.40} is not a u16")
        if negotiated is not None and (
                saved.event_idx != bool(negotiated & VIRTIO_F_EVENT_IDX)
                or saved.indirect != bool(negotiated & VIRTIO_F_INDIRECT_DESC)):
            raise refuse(f"queue {index}: event_idx/indirect do not match the negotiated "
                         "features")
        if activated and saved.ready:
            # What DRIVER_OK checked; a device served from here trusts it.
            probe = VirtQueue(queue.state.max_size)
            probe.state = saved.live()
            try:
                probe.validate(self.memory)
            except QueueError as e:
                raise refuse(f"queue {index}: {e}") from None

    # -- the bus side ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """A guest read of ``size`` bytes at ``offset`` in the window. Never raises."""
        try:
            if offset >= CONFIG_SPACE_OFFSET:
                return self._read_config(offset, size)
            if size != 4 or offset % 4 or offset < 0:
                self._guest_error("misaligned or odd-sized register read",
                                  offset=offset, size=size)
                return bytes(max(size, 0))
            value = self._read_register(offset)
            return (value & _U32).to_bytes(4, "little")
        except Exception:
            self._internal_error("read", offset=offset, size=size)
            return bytes(max(size, 0)) if isinstance(size, int) else b""

    def write(self, offset: int, data: bytes) -> None:
        """A guest write of ``data`` at ``offset`` in the window. Never raises."""
        try:
            if offset >= CONFIG_SPACE_OFFSET:
                self._write_config(offset, data)
                return
            if len(data) != 4 or offset % 4 or offset < 0:
                self._guest_error("misaligned or odd-sized register write",
                                  offset=offset, size=len(data))
                return
            self._write_register(offset, int.from_bytes(data, "little"))
        except Exception:
            self._internal_error("write", offset=offset, size=len(data))

    # -- config space ------------------------------------------------------------------

    def _read_config(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4, 8) or offset + size > WINDOW_SIZE:
            self._guest_error("bad config space read", offset=offset, size=size)
            return bytes(max(size, 0))
        data = self.device.read_config(offset - CONFIG_SPACE_OFFSET, size)
        if len(data) != size:
            self._once(("config size", size, len(data)), "error",
                       "device config read returned the wrong number of bytes",
                       offset=offset, size=size, returned=len(data))
            data = bytes(data[:size]).ljust(size, b"\0")
        return bytes(data)

    def _write_config(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (1, 2, 4, 8) or offset + size > WINDOW_SIZE:
            self._guest_error("bad config space write", offset=offset, size=size)
            return
        self.device.write_config(offset - CONFIG_SPACE_OFFSET, bytes(data))

    # -- register reads ----------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        register = _REGISTERS.get(offset)
        if register is None:
            self._guest_error("read of an undefined register", offset=offset)
            return 0
        if register not in _READABLE:
            self._guest_error("read of a write-only register", register=register.name)
            return 0
        if register is Register.STATUS and self._reset_pending:
            self._poll_pending_reset()
        with self._lock:
            return self._register_value_locked(register)

    def _register_value_locked(self, register: Register) -> int:
        match register:
            case Register.MAGIC_VALUE:
                return MAGIC_VALUE
            case Register.VERSION:
                return MMIO_VERSION
            case Register.DEVICE_ID:
                return self._device_id
            case Register.VENDOR_ID:
                return VENDOR_ID
            case Register.DEVICE_FEATURES:
                word = self._device_features_sel
                return self._offered_features >> (32 * word) & _U32 if word < 2 else 0
            case Register.QUEUE_NUM_MAX:
                queue = self._selected_queue_locked()
                return queue.state.max_size if queue is not None else 0
            case Register.QUEUE_READY:
                queue = self._selected_queue_locked()
                return int(queue is not None and queue.state.ready)
            case Register.INTERRUPT_STATUS:
                if self._external_used and self._activated:
                    return self._interrupt_status | int(InterruptReason.USED_BUFFER)
                return self._interrupt_status
            case Register.STATUS:
                return self._status
            case (Register.SHM_LEN_LOW | Register.SHM_LEN_HIGH | Register.SHM_BASE_LOW
                  | Register.SHM_BASE_HIGH):
                return _U32  # no shared memory regions: length and base read as -1
            case Register.CONFIG_GENERATION:
                return self._config_generation
            case _:  # QUEUE_RESET: VIRTIO_F_RING_RESET is not offered
                return 0

    # -- register writes ---------------------------------------------------------------

    def _write_register(self, offset: int, value: int) -> None:
        register = _REGISTERS.get(offset)
        if register is None:
            self._guest_error("write to an undefined register", offset=offset, value=value)
            return
        if register not in _WRITABLE:
            self._guest_error("write to a read-only register", register=register.name)
            return
        if register is Register.STATUS:
            self._write_status(value)
        elif register is Register.QUEUE_NOTIFY:
            self._notify(value)
        else:
            with self._lock:
                self._write_simple_locked(register, value)

    def _write_simple_locked(self, register: Register, value: int) -> None:
        """Writes that only change register state (no callbacks)."""
        match register:
            case Register.DEVICE_FEATURES_SEL:
                self._device_features_sel = value
            case Register.DRIVER_FEATURES_SEL:
                self._driver_features_sel = value
            case Register.DRIVER_FEATURES:
                self._write_driver_features_locked(value)
            case Register.QUEUE_SEL:
                self._queue_sel = value
            case Register.QUEUE_NUM:
                queue = self._configurable_queue_locked(register)
                if queue is None:
                    return
                if not 0 < value <= queue.state.max_size or value & (value - 1):
                    self._guest_error("queue size is not a power of two up to the maximum",
                                      queue=self._queue_sel, size=value,
                                      max_size=queue.state.max_size)
                queue.state.size = value
            case Register.QUEUE_READY:
                self._write_queue_ready_locked(value)
            case Register.INTERRUPT_ACK:
                if value & ~_INTERRUPT_BITS:
                    self._guest_error("InterruptACK with undefined bits", value=value)
                self._interrupt_status &= ~value
            case Register.SHM_SEL:
                pass  # there are no regions to select
            case Register.QUEUE_RESET:
                self._guest_error("QueueReset without VIRTIO_F_RING_RESET", value=value)
            case _:
                queue = self._configurable_queue_locked(register)
                if queue is None:
                    return
                name, shift = _ADDRESS_REGISTERS[register]
                address = getattr(queue.state, name)
                address = address & ~(_U32 << shift) | value << shift
                setattr(queue.state, name, address)

    def _write_driver_features_locked(self, value: int) -> None:
        if self._status & DeviceStatus.FEATURES_OK:
            self._guest_error("DriverFeatures written after FEATURES_OK", value=value)
            return
        word = self._driver_features_sel
        if word >= 2:
            if value:
                self._guest_error("driver accepted features beyond bit 63",
                                  word=word, value=value)
            return
        shift = 32 * word
        self._driver_features = self._driver_features & ~(_U32 << shift) | value << shift

    def _write_queue_ready_locked(self, value: int) -> None:
        queue = self._selected_queue_locked()
        if queue is None:
            self._guest_error("QueueReady written for a queue that does not exist",
                              queue=self._queue_sel)
            return
        if value not in (0, 1):
            self._guest_error("QueueReady written with a value other than 0 or 1",
                              queue=self._queue_sel, value=value)
            return
        if value == int(queue.state.ready):
            return
        if self._status & DeviceStatus.DRIVER_OK:
            self._guest_error("QueueReady changed after DRIVER_OK (no VIRTIO_F_RING_RESET)",
                              queue=self._queue_sel, value=value)
            return
        queue.state.ready = bool(value)

    def _configurable_queue_locked(self, register: Register) -> VirtQueue | None:
        """The selected queue, if the driver may change its configuration now."""
        queue = self._selected_queue_locked()
        if queue is None:
            self._guest_error("queue register written for a queue that does not exist",
                              register=register.name, queue=self._queue_sel)
            return None
        if self._status & DeviceStatus.DRIVER_OK:
            self._guest_error("queue register written after DRIVER_OK",
                              register=register.name, queue=self._queue_sel)
            return None
        if queue.state.ready:
            self._guest_error("queue register written while the queue is ready",
                              register=register.name, queue=self._queue_sel)
            return None
        return queue

    def _selected_queue_locked(self) -> VirtQueue | None:
        if self._queue_sel < len(self.queues):
            return self.queues[self._queue_sel]
        return None

    def _notify(self, value: int) -> None:
        index = value & 0xFFFF
        with self._lock:
            ready = index < len(self.queues) and self.queues[index].state.ready
        if not ready:
            self._guest_error("QueueNotify for a queue that is not ready", queue=index)
            return
        try:
            self._callbacks.queue_notify(index)
        except Exception:
            self._callback_failed("queue_notify")

    # -- the status state machine ------------------------------------------------------

    def _write_status(self, value: int) -> None:
        with self._transition_lock:
            if value == 0:
                self._reset()
                return
            if self._reset_pending:
                self._guest_error("Status written while a reset is still in progress "
                                  "(wait for Status to read 0 first)", value=value)
                return
            with self._lock:
                activate, stop = self._update_status_locked(value)
            if stop:
                self._stop()
            if activate:
                self._log.debug("virtio device activated",
                                features=hex(self._driver_features))
                try:
                    self._callbacks.activate(self)
                except Exception:
                    self._callback_failed("activate")

    def _update_status_locked(self, value: int) -> tuple[bool, bool]:
        """Apply a non-zero Status write; return (activate, stop)."""
        status = self._status
        # A driver that writes back what it read may echo DEVICE_NEEDS_RESET: not an error.
        echoed = status & DeviceStatus.DEVICE_NEEDS_RESET
        if value & ~(_DRIVER_BITS | echoed):
            self._guest_error("Status written with bits a driver cannot set", value=value)
        wanted = value & _DRIVER_BITS
        if status & _DRIVER_BITS & ~wanted:
            self._guest_error("Status write would clear bits (only a reset clears them)",
                              status=status, value=value)
        new = wanted & ~status
        if not new:
            return False, False
        if status & DeviceStatus.FAILED:
            self._guest_error("Status written after FAILED (reset first)", value=value)
            return False, False
        if new & DeviceStatus.FAILED:
            self._status = status | int(DeviceStatus.FAILED)
            self._log.warning("virtio driver set FAILED", status=hex(status))
            return False, self._activated
        for bit, needed in _STEPS:
            if not new & bit:
                continue
            if self._status & needed != needed:
                self._guest_error("Status step set out of order", step=bit.name,
                                  status=self._status)
                break
            if bit is DeviceStatus.FEATURES_OK and not self._accept_features_locked():
                break
            if bit is DeviceStatus.DRIVER_OK and not self._queues_valid_locked():
                break
            self._status |= int(bit)
            if bit is DeviceStatus.DRIVER_OK:
                self._activated = True
                return True, False
        return False, False

    def _accept_features_locked(self) -> bool:
        features = self._driver_features
        unoffered = features & ~self._offered_features
        if unoffered:
            self._log.warning("FEATURES_OK refused: driver accepted features not offered",
                              features=hex(features), not_offered=hex(unoffered))
            return False
        if not features & VIRTIO_F_VERSION_1:
            self._log.warning("FEATURES_OK refused: driver did not accept VIRTIO_F_VERSION_1",
                              features=hex(features))
            return False
        for queue in self.queues:
            queue.state.event_idx = bool(features & VIRTIO_F_EVENT_IDX)
            queue.state.indirect = bool(features & VIRTIO_F_INDIRECT_DESC)
        return True

    def _queues_valid_locked(self) -> bool:
        if self._status & DeviceStatus.DEVICE_NEEDS_RESET:
            self._guest_error("DRIVER_OK refused: the device needs a reset first")
            return False
        for index, queue in enumerate(self.queues):
            if not queue.state.ready:
                continue
            try:
                queue.validate(self.memory)
            except QueueError as e:
                reason = f"queue {index}: {e}"
                self._log.warning("DRIVER_OK refused: invalid queue", reason=reason)
                self._needs_reset_locked()
                return False
        return True

    def _stop(self) -> None:
        """The driver set FAILED: stop serving, leave the registers as they are. A device
        that has not stopped yet stays activated, so the reset that follows asks again."""
        if self._stop_device():
            with self._lock:
                self._activated = False
        else:
            self._log.warning("virtio device still running after FAILED; the reset "
                              "will wait for it to stop")

    def _stop_device(self) -> bool:
        """The ``reset`` callback: whether the device has stopped. A callback that
        raised has done what it could; the reset goes on (DEVICE_NEEDS_RESET is set)."""
        try:
            return self._callbacks.reset(self) is not False
        except Exception:
            self._callback_failed("reset")
            return True

    def _reset(self) -> None:
        with self._transition_lock:
            with self._lock:
                pristine = (
                    not self._activated and not self._status and not self._driver_features
                    and not self._reset_pending
                    and all(queue.state == initial for queue, initial
                            in zip(self.queues, self._initial_queue_states, strict=True))
                )
            if not pristine and not self._stop_device():
                with self._lock:
                    first = not self._reset_pending
                    self._reset_pending = True
                if first:
                    self._log.warning("virtio reset waits for the device to stop; Status "
                                      "reads non-zero until it has", status=hex(self._status))
                return
            self._complete_reset(logged=not pristine)

    def _poll_pending_reset(self) -> None:
        """A Status read while a reset is pending (vCPU thread): complete the reset if
        the device has stopped. Skipped while another vCPU is in a status transition
        (it may be the one waiting for the device): the driver reads again."""
        stopped = self._callbacks.stopped
        if stopped is None or not self._transition_lock.acquire(blocking=False):
            return
        try:
            if not self._reset_pending:
                return
            try:
                done = stopped()
            except Exception:
                self._once(("callback", "stopped"), "exception",
                           "virtio transport callback raised", callback="stopped")
                return
            if done:
                self._log.info("virtio reset completed: the device has stopped")
                self._complete_reset(logged=False)
        finally:
            self._transition_lock.release()

    def _complete_reset(self, *, logged: bool) -> None:
        """The device has stopped: reset it and every register (transition lock held)."""
        device_failed = False
        try:
            self.device.reset()
        except Exception:
            self._log.exception("virtio device reset failed")
            device_failed = True
        with self._lock:
            for queue in self.queues:
                queue.reset()
            self._status = 0
            self._device_features_sel = 0
            self._driver_features_sel = 0
            self._driver_features = 0
            self._queue_sel = 0
            self._interrupt_status = 0
            self._config_generation = (self._config_generation + 1) & _U32
            self._activated = False
            self._reset_pending = False
            if device_failed:
                self._status = int(DeviceStatus.DEVICE_NEEDS_RESET)
        if logged:
            self._log.debug("virtio device reset")

    # -- helpers -----------------------------------------------------------------------

    def _config_changed_locked(self) -> bool:
        """Bump ConfigGeneration; return whether to interrupt (DRIVER_OK is set)."""
        self._config_generation = (self._config_generation + 1) & _U32
        if not self._status & DeviceStatus.DRIVER_OK:
            return False
        self._interrupt_status |= int(InterruptReason.CONFIG_CHANGE)
        return True

    def _needs_reset_locked(self) -> bool:
        """Set DEVICE_NEEDS_RESET; return whether to interrupt (first time, DRIVER_OK)."""
        if self._status & DeviceStatus.DEVICE_NEEDS_RESET:
            return False
        self._status |= int(DeviceStatus.DEVICE_NEEDS_RESET)
        return self._config_changed_locked()

    def _interrupt(self) -> None:
        try:
            self._callbacks.interrupt()
        except Exception:
            self._once(("callback", "interrupt"), "exception",
                       "virtio transport callback raised", callback="interrupt")

    def _callback_failed(self, callback: str) -> None:
        """Log (from inside an ``except`` block) and set DEVICE_NEEDS_RESET."""
        self._log.exception("virtio transport callback raised", callback=callback)
        self.set_needs_reset(f"the {callback} callback raised")

    def _internal_error(self, access: str, **fields: object) -> None:
        """A bug of ours (or the device's) surfaced in a register access: log it, tell
        the driver the device needs a reset, and never let it reach the vCPU."""
        try:
            self._log.exception("virtio-mmio internal error", access=access, **fields)
            self.set_needs_reset(f"internal error during a register {access}")
        except Exception:
            pass

    def _guest_error(self, event: str, **fields: object) -> None:
        """A driver broke a rule; the access was dropped or refused. Logged once per
        event and register (or offset and size), whatever the values written."""
        key = (event, fields.get("register"), fields.get("offset"), fields.get("size"))
        self._once(key, "warning", event, **fields)

    def _once(self, key: tuple[object, ...], level: str, event: str,
              **fields: object) -> None:
        # Guests repeat the same mistake in a loop; a log line each time would cost more
        # than the exit. Its own lock: called with and without _lock held.
        with self._logged_lock:
            if key in self._logged or len(self._logged) >= _LOGGED_KEYS_LIMIT:
                return
            self._logged.add(key)
        getattr(self._log, level)(event, **fields)
