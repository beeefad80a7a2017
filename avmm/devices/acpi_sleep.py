"""Hardware-reduced ACPI sleep registers: how a guest powers the VM off.

The FADT points SLEEP_CONTROL_REG and SLEEP_STATUS_REG at two SystemIO bytes
(:data:`avmm.arch.x86.acpi.ACPI_SLEEP_CONTROL_PORT` and the port after it) and the DSDT's
``\\_S5_`` gives the soft-off sleep type. To power off, Linux (``acpi_hw_extended_sleep``)
clears WAK_STS in the status register, then writes ``(SLP_TYP << 2) | SLP_EN`` to the
control register. A control write with SLP_EN set and the S5 type calls ``on_poweroff()``
(on the vCPU thread; it must not block). Other sleep types are not offered (no ``\\_S3_``
etc.), so any other SLP_EN write is logged and ignored, as is everything without SLP_EN.
Reads of either register return 0: nothing is ever waking.

Snapshot state (:class:`AcpiSleepState`): neither register holds anything a guest can read
back (no PM1 event or control blocks exist in a hardware-reduced FADT; WAK_STS stays 0 and
SLP_TYP/SLP_EN act on the write), so the one field is the soft-off sleep type. It is not a
register but it is guest-visible all the same: the guest learned it from the ``\\_S5_``
package in the ACPI tables in its RAM, which a snapshot carries, so a restored device must
keep answering to that value even if this avmm's tables now use another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, final

import structlog

from avmm.devices._state import check_state_class, check_uint

__all__ = [
    "ACPI_SLEEP_PORT_COUNT",
    "SLP_EN",
    "AcpiSleep",
    "AcpiSleepState",
    "sleep_control_value",
]

log = structlog.get_logger(__name__)

#: Control byte, then status byte.
ACPI_SLEEP_PORT_COUNT: Final = 2
#: ACPI 6.5 §4.8.3.7: SLEEP_CONTROL_REG bits.
SLP_EN: Final = 1 << 5
_SLP_TYP_SHIFT: Final = 2
_SLP_TYP_MASK: Final = 0b111


def sleep_control_value(sleep_type: int) -> int:
    """The control byte a guest writes to enter ``sleep_type``."""
    return ((sleep_type & _SLP_TYP_MASK) << _SLP_TYP_SHIFT) | SLP_EN


@dataclass(frozen=True, slots=True)
class AcpiSleepState:
    """The sleep registers' snapshot state (see the module docstring for why this is all).

    ``soft_off_type`` is the SLP_TYP value (0..7) whose SLP_EN write powers the VM off.
    """

    STATE_VERSION: ClassVar[int] = 1

    soft_off_type: int


@final
class AcpiSleep:
    """A :class:`~avmm.bus.BusDevice` of length 2 (control at offset 0, status at 1)."""

    def __init__(self, *, soft_off_type: int, on_poweroff: Callable[[], None]) -> None:
        self._soft_off_type = soft_off_type
        self._on_poweroff = on_poweroff

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 1 or not data[0] & SLP_EN:
            return  # status writes (clearing WAK_STS) and writes without SLP_EN
        sleep_type = (data[0] >> _SLP_TYP_SHIFT) & _SLP_TYP_MASK
        if sleep_type != self._soft_off_type:
            log.warning("guest asked for an unsupported ACPI sleep state; ignored",
                        sleep_type=sleep_type)
            return
        self._on_poweroff()

    # -- snapshot --------------------------------------------------------------------------

    def save_state(self) -> AcpiSleepState:
        return AcpiSleepState(soft_off_type=self._soft_off_type)

    def restore_state(self, state: AcpiSleepState) -> None:
        """Answer to the saved soft-off type from now on; raises DeviceStateError (and
        changes nothing) for a state of another class or a type outside 0..7."""
        check_state_class(state, AcpiSleepState, "acpi-sleep")
        check_uint("acpi-sleep", "soft_off_type", state.soft_off_type, _SLP_TYP_MASK)
        if state.soft_off_type != self._soft_off_type:
            log.info("ACPI soft-off type taken from the snapshot",
                     saved=state.soft_off_type, built_with=self._soft_off_type)
        self._soft_off_type = state.soft_off_type
