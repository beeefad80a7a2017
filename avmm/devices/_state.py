"""How the legacy devices save and restore their state, and the checks restore makes.

The convention, followed by every device in :mod:`avmm.devices`:

* ``<Device>State`` is a frozen, slotted dataclass of plain values only (``int``,
  ``bool``, ``bytes``): no lock, callback or other live object is ever inside, so the
  snapshot codec can write it and :func:`dataclasses.asdict` turns it into plain data.
* The class attribute ``STATE_VERSION: ClassVar[int]`` is the version of that layout (the
  name avmm's snapshot codec reads). It belongs to the class, not to each saved value: the
  snapshot file records it beside the fields and refuses (or upgrades, through an
  ``upgrade_state(version, fields)`` classmethod) a version this avmm does not read before
  any state object is built. Bump it when a field is added, removed or changes meaning.
* ``device.save_state()`` returns a copy, never a view. Take it while the VM is paused:
  a vCPU or the host input may change the device right after.
* ``device.restore_state(state)`` checks all of the state before it changes anything, and
  raises :class:`DeviceStateError` (one line naming the device and the field) for a state
  this avmm could not have saved: another class or version, a register with reserved bits
  set, a FIFO longer than the device's. What happens to interrupts is each device's
  business and is documented on its method.
* A device with nothing to save still has a state class, without fields, so the VM saves
  and restores every device the same way and a later version can add fields behind an
  upgrade from version 1.
"""

from __future__ import annotations

from avmm.errors import StateError

__all__ = ["DeviceStateError", "check_bool", "check_bytes", "check_state_class", "check_uint"]


class DeviceStateError(StateError):
    """A saved device state cannot be restored: it is of another class or version, or a
    field is out of range or of the wrong type (the snapshot is corrupt or not avmm's)."""


def check_state_class(state: object, expected: type, device: str) -> None:
    """Refuse anything but an instance of exactly ``expected`` at its current version."""
    if not isinstance(state, expected):
        raise DeviceStateError(
            f"{device} state: expected {expected.__name__}, got {type(state).__name__}"
        )
    version = getattr(type(state), "STATE_VERSION", None)
    current = getattr(expected, "STATE_VERSION", None)
    if version != current:
        raise DeviceStateError(
            f"{device} state: version {version!r}, this avmm restores version {current}"
        )
    if type(state) is not expected:
        # A subclass may carry fields restore would silently drop.
        raise DeviceStateError(
            f"{device} state: expected {expected.__name__}, got {type(state).__name__}"
        )


def check_uint(device: str, name: str, value: object, mask: int) -> None:
    """``value`` is an int (not a bool) with no bit outside ``mask``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value & ~mask:
        raise DeviceStateError(
            f"{device} state: {name}={value!r:.40} is not an integer within bits 0x{mask:x}"
        )


def check_bool(device: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise DeviceStateError(f"{device} state: {name}={value!r:.40} is not a bool")


def check_bytes(device: str, name: str, value: object, max_length: int) -> None:
    """``value`` is ``bytes`` (immutable, as a frozen state holds) of at most
    ``max_length`` bytes."""
    if not isinstance(value, bytes):
        raise DeviceStateError(
            f"{device} state: {name} must be bytes, got a {type(value).__name__}"
        )
    if len(value) > max_length:
        raise DeviceStateError(
            f"{device} state: {name} holds {len(value)} bytes, at most {max_length} fit"
        )
