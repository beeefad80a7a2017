"""The boot-time marker: the guest tells the VMM "userspace is up" with one port write.

Like Firecracker's boot timer, but on the PIO bus so that a shell script can reach it
through ``/dev/port`` (CONFIG_DEVPORT, on in Debian's kernels and in avmm's minimal one)::

    printf '\\173' | dd of=/dev/port bs=1 seek=$((0x440)) count=1

A byte write of :data:`BOOT_MARKER` (123) to :data:`BOOT_TIMER_PORT` calls
``on_marker()`` once; other values, sizes and later writes are ignored (a guest that
writes the port in a loop costs one log line, not one per write). Reads return zeros.

Snapshot state (:class:`BootTimerState`): whether the marker was seen. Nothing of it is
guest-visible (reads are zeros either way); it is host bookkeeping, saved so that the
"once" above holds for the guest's whole life: a restored guest that writes the marker
again (a script that runs on every resume, say) does not report a second boot. Restoring
never calls ``on_marker``: the boot it measured happened in the process that saved it.

Port choice: 0x440 is unclaimed on every PC avmm models (the FADT is hardware-reduced, so
there are no ACPI PM blocks) and clear of 0x80 (Linux's I/O delay port), 0x402 (QEMU's
debugcon), 0x501 (debug-exit) and 0x510 (QEMU's fw_cfg).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, final

from avmm.devices._state import check_bool, check_state_class

__all__ = [
    "BOOT_MARKER",
    "BOOT_TIMER_PORT",
    "BOOT_TIMER_PORT_COUNT",
    "BootTimer",
    "BootTimerState",
]

BOOT_TIMER_PORT = 0x440
BOOT_TIMER_PORT_COUNT = 1
BOOT_MARKER = 123  # Firecracker's magic value, so guest images can share their /init


@dataclass(frozen=True, slots=True)
class BootTimerState:
    """The boot timer's snapshot state: ``marker_seen``, whether the guest already wrote
    the marker (host-side only; see the module docstring)."""

    STATE_VERSION: ClassVar[int] = 1

    marker_seen: bool = False


@final
class BootTimer:
    """A :class:`~avmm.bus.BusDevice` of length 1; ``on_marker`` runs on the vCPU thread
    (it must not block) the first time the guest writes the marker."""

    def __init__(self, *, on_marker: Callable[[], None]) -> None:
        self._on_marker = on_marker
        self.reached = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if self.reached or data != bytes([BOOT_MARKER]):
            return
        self.reached = True
        self._on_marker()

    # -- snapshot --------------------------------------------------------------------------

    def save_state(self) -> BootTimerState:
        return BootTimerState(marker_seen=self.reached)

    def restore_state(self, state: BootTimerState) -> None:
        """Take over whether the marker was seen (never calling ``on_marker``); raises
        DeviceStateError for a state of another class or a non-bool field."""
        check_state_class(state, BootTimerState, "boot-timer")
        check_bool("boot-timer", "marker_seen", state.marker_seen)
        self.reached = state.marker_seen
