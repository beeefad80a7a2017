"""A minimal i8042 keyboard controller: just enough for a guest to reset the machine.

The VM maps it as one range, ports 0x60..0x64 (base :data:`I8042_BASE_PORT`, length
:data:`I8042_PORT_COUNT`), so offsets are ``port - 0x60``: offset 0 is the data port
(0x60) and offset 4 the command/status port (0x64). One range is needed because a device
only sees offsets: two separate one-port mappings would both show up as offset 0.

Behaviour:

* Reading the status port gives 0 (output buffer empty, input buffer empty): the guest may
  send a command at any time and there is never a byte to read. The data port reads 0.
* Writing command 0xFE (pulse the reset line) to the command port calls ``on_reset()``.
  Other commands and data-port writes are ignored (logged at debug level). A guest driver
  that waits for replies (Linux's i8042 self-test) times out and gives up, which is the
  point: there is no keyboard.
* Ports 0x61..0x63 fall inside the range but are not the i8042's; they read 0 and ignore
  writes. (0x61 is the PC's "system control port B"; if the in-kernel PIT is created
  without KVM_PIT_SPEAKER_DUMMY, KVM answers 0x61 itself and it never reaches this device.)

The device keeps nothing between accesses (no command byte, no output buffer, no pending
reply), so it needs no lock and its snapshot state, :class:`I8042State`, has no fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, final

import structlog

from avmm.devices._state import check_state_class

log = structlog.get_logger(__name__)

__all__ = ["I8042", "I8042_BASE_PORT", "I8042_PORT_COUNT", "I8042State"]

I8042_BASE_PORT = 0x60
"""Where the VM maps the controller on the PIO bus."""

I8042_PORT_COUNT = 5
"""Bus length: ports 0x60..0x64."""

_DATA_OFFSET = 0x60 - I8042_BASE_PORT
_COMMAND_OFFSET = 0x64 - I8042_BASE_PORT
_COMMAND_PULSE_RESET = 0xFE


@dataclass(frozen=True, slots=True)
class I8042State:
    """The i8042's snapshot state: empty, because every read answers 0 and every write
    is acted on (the reset) or dropped at once. A later version that models the command
    byte or a keyboard adds fields here (see :mod:`avmm.devices._state`)."""

    STATE_VERSION: ClassVar[int] = 1


@final
class I8042:
    """The reset-only i8042; a :class:`~avmm.bus.BusDevice` of length 5 at port 0x60.

    ``on_reset()`` is called on the vCPU thread when the guest asks for a CPU reset
    (command 0xFE); the VM decides what a reset means (typically: stop or reboot).
    It must not block.
    """

    def __init__(self, *, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        """Status and data ports both read as 0 (nothing to read, ready for commands)."""
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        """Command 0xFE at the command port resets; everything else is ignored."""
        for index, value in enumerate(data):
            port_offset = offset + index
            if port_offset == _COMMAND_OFFSET and value == _COMMAND_PULSE_RESET:
                log.info("i8042 reset requested")
                self._on_reset()
            elif port_offset == _COMMAND_OFFSET:
                log.debug("i8042 command ignored", command=hex(value))
            elif port_offset == _DATA_OFFSET:
                log.debug("i8042 data write ignored", value=hex(value))
            else:
                log.debug("i8042 write to unmodelled port ignored", offset=port_offset)

    # -- snapshot --------------------------------------------------------------------------

    def save_state(self) -> I8042State:
        """The (empty) state: there is nothing the guest could read back."""
        return I8042State()

    def restore_state(self, state: I8042State) -> None:
        """Check that ``state`` is an :class:`I8042State`; raises DeviceStateError if not."""
        check_state_class(state, I8042State, "i8042")
