"""What an avmm vhost-user back-end hands out with VHOST_USER_PROTOCOL_F_DEVICE_STATE.

The bytes that travel through the SET_DEVICE_STATE_FD pipe are one
:class:`BackendState` in avmm's snapshot encoding (:mod:`avmm.state.codec`: tagged,
versioned, strict), so a damaged or foreign blob is refused field by field, never
half-applied. It says which device it belongs to (device ID, queue count, the virtio
features the front-end had set) and carries the device's own part as nested bytes,
also a codec value, of a kind named beside it:

* ``"blk"`` (:class:`~avmm.virtio.blk.BlockDevice`): :class:`BlockBackendState`. The
  disk's identity as the guest knows it (the serial GET_ID answers) travels and is
  restored, so a back-end started on a copy of the image at another path still answers
  the same ID; its capacity and read-only flag are *checked* (a back-end serving another
  disk is refused, since the guest's file systems would read garbage); the write-cache
  mode, what the file system was found to support (hole punching, zeroing) and the
  request counters travel, so the metrics of a restored back-end go on from where the
  saved one was. (The in-process snapshot uses BlockDevice's own ``BlockState``, which
  checks the serial instead: in-process, the image path is the VM config's, while a
  back-end may well be started on a moved copy.)
* ``"device"``: a device that implements the snapshot interface of
  :class:`~avmm.virtio.device.VirtioDevice` (``save_state``/``restore_state``/
  ``state_class``): its own state class.
* ``"none"``: a device with no state of its own.

:func:`load_backend_state` checks everything before it changes anything and raises
:class:`~avmm.devices._state.DeviceStateError` with one line; the back-end answers
CHECK_DEVICE_STATE with failure then, and logs that line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..devices._state import DeviceStateError
from ..state import codec
from ..state._errors import SnapshotError
from ..state.codec import U16, U32, U64
from ..virtio.device import VirtioDevice

__all__ = [
    "MAX_DEVICE_STATE_SIZE",
    "BackendState",
    "BlockBackendState",
    "load_backend_state",
    "save_backend_state",
]

#: The most a device state transfer may carry, either way (avmm's own are < 1 KiB; the
#: bound is what a hostile peer can make the other side buffer).
MAX_DEVICE_STATE_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class BackendState:
    """A back-end's device state as it travels (see the module docstring)."""

    STATE_VERSION: ClassVar[int] = 1
    STATE_NAME: ClassVar[str] = "VhostBackendState"

    device_id: U32
    queue_count: U16
    #: The virtio features the front-end had set (SET_FEATURES) at the save; 0 if none.
    features: U64
    #: "blk", "device" or "none" (see the module docstring).
    kind: str
    #: The device's own part, one codec value (empty for "none").
    device: bytes


@dataclass(frozen=True, slots=True)
class BlockBackendState:
    """avmm's virtio-blk behind vhost-user (see the module docstring)."""

    STATE_VERSION: ClassVar[int] = 1
    STATE_NAME: ClassVar[str] = "VhostBlockBackendState"

    capacity: U64
    read_only: bool
    serial: str
    writeback: bool
    can_punch_holes: bool
    can_zero_range: bool
    #: :class:`~avmm.virtio.blk.BlockStats` by field name.
    stats: dict[str, U64]


def _is_block(device: VirtioDevice) -> bool:
    from ..virtio.blk import BlockDevice

    return isinstance(device, BlockDevice)


def _has_state_interface(device: VirtioDevice) -> bool:
    return all(callable(getattr(device, name, None))
               for name in ("save_state", "restore_state")) \
        and isinstance(getattr(device, "state_class", None), type)


def _kind_of(device: VirtioDevice) -> str:
    if _is_block(device):
        return "blk"
    return "device" if _has_state_interface(device) else "none"


def save_backend_state(device: VirtioDevice, features: int) -> bytes:
    """The bytes that describe ``device`` now (its rings must be stopped)."""
    kind = _kind_of(device)
    own = b""
    if kind == "blk":
        own = codec.encode(_save_block(device))
    elif kind == "device":
        own = codec.encode(device.save_state())  # type: ignore[attr-defined]
    return codec.encode(BackendState(
        device_id=int(device.device_id), queue_count=len(device.queue_max_sizes),
        features=features, kind=kind, device=own))


def load_backend_state(device: VirtioDevice, data: bytes, offered_features: int) -> None:
    """Check ``data`` against ``device`` and this back-end, then apply it; a
    DeviceStateError with one line for anything that does not fit."""
    name = device.name
    if len(data) > MAX_DEVICE_STATE_SIZE:
        raise DeviceStateError(f"{name} state: {len(data)} bytes, at most "
                               f"{MAX_DEVICE_STATE_SIZE} are accepted")
    try:
        state = codec.decode(data, BackendState)
    except SnapshotError as e:
        raise DeviceStateError(f"{name} state: {e}") from None
    if state.device_id != int(device.device_id):
        raise DeviceStateError(f"{name} state: saved from a device of type "
                               f"{state.device_id}, this back-end serves type "
                               f"{int(device.device_id)}")
    if state.queue_count != len(device.queue_max_sizes):
        raise DeviceStateError(f"{name} state: saved with {state.queue_count} queues, this "
                               f"back-end has {len(device.queue_max_sizes)}")
    missing = state.features & ~offered_features
    if missing:
        raise DeviceStateError(f"{name} state: the front-end had set features 0x{missing:x} "
                               "that this back-end does not offer")
    kind = _kind_of(device)
    if state.kind != kind:
        raise DeviceStateError(f"{name} state: of kind {state.kind!r}, this back-end's "
                               f"device keeps {kind!r}")
    if kind == "blk":
        block = _decode(state.device, BlockBackendState, name)
        _check_block(device, block)
        _apply_block(device, block)
    elif kind == "device":
        own = _decode(state.device, device.state_class, name)  # type: ignore[attr-defined]
        device.restore_state(own)  # type: ignore[attr-defined]
    elif state.device:
        raise DeviceStateError(f"{name} state: {len(state.device)} bytes of device state "
                               "for a device that keeps none")


def _decode(data: bytes, cls: type[Any], name: str) -> Any:
    try:
        return codec.decode(data, cls)
    except SnapshotError as e:
        raise DeviceStateError(f"{name} state: {e}") from None


def _save_block(device: Any) -> BlockBackendState:
    return BlockBackendState(
        capacity=device.capacity, read_only=bool(device.read_only), serial=device.serial,
        writeback=bool(device.writeback), can_punch_holes=bool(device.can_punch_holes),
        can_zero_range=bool(device.can_zero_range),
        stats={field.name: int(getattr(device.stats, field.name))
               for field in dataclasses.fields(device.stats)})


def _check_block(device: Any, state: BlockBackendState) -> None:
    name = device.name
    if state.capacity != device.capacity:
        raise DeviceStateError(
            f"{name} state: saved from a disk of {state.capacity} sectors, this back-end's "
            f"image has {device.capacity} (start it on the disk the snapshot used)")
    if state.read_only != bool(device.read_only):
        raise DeviceStateError(
            f"{name} state: saved from a {'read-only' if state.read_only else 'writable'} "
            f"disk, this back-end's is {'read-only' if device.read_only else 'writable'}")
    try:
        serial = state.serial.encode("ascii")
    except UnicodeEncodeError:
        raise DeviceStateError(f"{name} state: the disk serial is not ASCII") from None
    from ..virtio.blk import ID_BYTES

    if len(serial) > ID_BYTES:
        raise DeviceStateError(f"{name} state: a disk serial of {len(serial)} bytes "
                               f"(at most {ID_BYTES})")
    known = {field.name for field in dataclasses.fields(device.stats)}
    unknown = sorted(set(state.stats) - known)
    if unknown:
        raise DeviceStateError(f"{name} state: unknown counters {', '.join(unknown)[:80]}")


def _apply_block(device: Any, state: BlockBackendState) -> None:
    device.serial = state.serial
    device.writeback = state.writeback
    device.can_punch_holes = state.can_punch_holes
    device.can_zero_range = state.can_zero_range
    for counter, value in state.stats.items():
        setattr(device.stats, counter, value)
