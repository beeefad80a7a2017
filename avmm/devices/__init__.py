"""Legacy PC devices served on the PIO bus: UART, i8042 reset, debug-exit port, ACPI sleep
registers, boot-time marker.

Snapshots: each device ``Foo`` has a frozen dataclass ``FooState`` of plain values whose
layout version is the class attribute ``STATE_VERSION``, and the methods
``save_state() -> FooState`` and ``restore_state(state)``; restore raises
:class:`DeviceStateError` for a state the device could not be in. A device with nothing to
save (debug-exit, i8042) has a state class without fields, so every device is handled
alike. :mod:`avmm.devices._state` spells out the convention.
"""

from avmm.devices._state import DeviceStateError as DeviceStateError
from avmm.devices.acpi_sleep import AcpiSleep as AcpiSleep
from avmm.devices.acpi_sleep import AcpiSleepState as AcpiSleepState
from avmm.devices.boot_timer import BootTimer as BootTimer
from avmm.devices.boot_timer import BootTimerState as BootTimerState
from avmm.devices.debug_exit import DEBUG_EXIT_DEFAULT_PORT as DEBUG_EXIT_DEFAULT_PORT
from avmm.devices.debug_exit import DEBUG_EXIT_PORT_COUNT as DEBUG_EXIT_PORT_COUNT
from avmm.devices.debug_exit import DebugExit as DebugExit
from avmm.devices.debug_exit import DebugExitState as DebugExitState
from avmm.devices.i8042 import I8042 as I8042
from avmm.devices.i8042 import I8042_BASE_PORT as I8042_BASE_PORT
from avmm.devices.i8042 import I8042_PORT_COUNT as I8042_PORT_COUNT
from avmm.devices.i8042 import I8042State as I8042State
from avmm.devices.serial import COM1_BASE_PORT as COM1_BASE_PORT
from avmm.devices.serial import COM1_IRQ as COM1_IRQ
from avmm.devices.serial import RX_FIFO_SIZE as RX_FIFO_SIZE
from avmm.devices.serial import SERIAL_PORT_COUNT as SERIAL_PORT_COUNT
from avmm.devices.serial import Serial8250 as Serial8250
from avmm.devices.serial import Serial8250State as Serial8250State
