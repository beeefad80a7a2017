"""QEMU's isa-debug-exit port: a guest ends the VM with a status of its choosing.

A write of value ``v`` (1, 2 or 4 bytes, little-endian) anywhere in the device's range ends
the VM with exit status ``(v << 1) | 1``, exactly what QEMU computes before calling
``exit()``. The status is therefore always odd, and a guest cannot produce 0: test guests
conventionally write 0 for success (status 1) and anything else for failure.

Mapping: the VM maps it on the PIO bus at :data:`DEBUG_EXIT_DEFAULT_PORT` (0x501, QEMU's
default ``iobase``) with length :data:`DEBUG_EXIT_PORT_COUNT` (4). QEMU's default
``iosize`` is 2, but with only two ports a 4-byte ``outl`` to the base would run over the
end of the range and the bus would drop it; four ports let ``outb``/``outw``/``outl`` all
work. Like QEMU, the offset of the write inside the range is ignored.

Reads return 0 bytes, as QEMU's device does.

The device is stateless: a write ends the VM at once and nothing is remembered, so its
snapshot state, :class:`DebugExitState`, has no fields. It exists so that every legacy
device is saved and restored the same way (see :mod:`avmm.devices._state`).

``on_exit(status)`` receives the full status, not reduced mod 256: for ``outl`` values the
status can exceed 8 bits. A process exit status only keeps the low 8 bits, so the CLI, when
it turns the VM's status into its own, takes it mod 256 (as a shell sees QEMU's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, final

import structlog

from avmm.devices._state import check_state_class

log = structlog.get_logger(__name__)

__all__ = [
    "DEBUG_EXIT_DEFAULT_PORT",
    "DEBUG_EXIT_PORT_COUNT",
    "DebugExit",
    "DebugExitState",
    "exit_status",
]

DEBUG_EXIT_DEFAULT_PORT = 0x501
"""QEMU's default isa-debug-exit ``iobase``."""

DEBUG_EXIT_PORT_COUNT = 4
"""Bus length: wide enough for a 4-byte write at the base."""


def exit_status(value: int) -> int:
    """The VM exit status for a written value: ``(value << 1) | 1``."""
    return (value << 1) | 1


@dataclass(frozen=True, slots=True)
class DebugExitState:
    """The debug-exit port's snapshot state: empty, the device is stateless."""

    STATE_VERSION: ClassVar[int] = 1


@final
class DebugExit:
    """The isa-debug-exit device; a :class:`~avmm.bus.BusDevice` of length 4.

    ``on_exit(status)`` is called on the vCPU thread for every write, with the full
    ``(value << 1) | 1``; the VM should stop with the first status it receives. It must not
    block.
    """

    def __init__(self, *, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        """Reads return zeros (QEMU's behaviour)."""
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        """Any write ends the VM with ``(value << 1) | 1``."""
        value = int.from_bytes(data, "little")
        status = exit_status(value)
        log.info("debug exit requested", value=hex(value), status=status, size=len(data))
        self._on_exit(status)

    # -- snapshot --------------------------------------------------------------------------

    def save_state(self) -> DebugExitState:
        """The (empty) state of a stateless device."""
        return DebugExitState()

    def restore_state(self, state: DebugExitState) -> None:
        """Check that ``state`` is a :class:`DebugExitState`; raises DeviceStateError if
        not."""
        check_state_class(state, DebugExitState, "debug-exit")
