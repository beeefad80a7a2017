"""Legacy PC devices served on the PIO bus: UART, i8042 reset, debug-exit port."""

from avmm.devices._common import DeviceStateError as DeviceStateError
from avmm.devices.debug_exit import DEBUG_EXIT_DEFAULT_PORT as DEBUG_EXIT_DEFAULT_PORT
from avmm.devices.debug_exit import DEBUG_EXIT_PORT_COUNT as DEBUG_EXIT_PORT_COUNT
from avmm.devices.debug_exit import DebugExit as DebugExit
from avmm.devices.i8042 import I8042 as I8042
from avmm.devices.i8042 import I8042_BASE_PORT as I8042_BASE_PORT
from avmm.devices.i8042 import I8042_PORT_COUNT as I8042_PORT_COUNT
from avmm.devices.serial import COM1_BASE_PORT as COM1_BASE_PORT
from avmm.devices.serial import COM1_IRQ as COM1_IRQ
from avmm.devices.serial import RX_FIFO_SIZE as RX_FIFO_SIZE
from avmm.devices.serial import SERIAL_PORT_COUNT as SERIAL_PORT_COUNT
from avmm.devices.serial import Serial8250 as Serial8250
from avmm.devices.serial import Serial8250State as Serial8250State
