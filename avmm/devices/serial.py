"""An 8250/16550A UART, as a PC has at COM1 (I/O ports 0x3f8..0x3ff, IRQ 4).

The device sees eight register offsets (0..7); the VM maps it on the PIO bus with length 8
and wires ``raise_irq`` to the interrupt line (IRQ 4 for COM1).

What is modelled, and what is not:

* Transmission is instantaneous: a byte written to THR goes straight to ``output``, so
  LSR.THRE and LSR.TEMT always read as set and the "THR empty" interrupt is pending again
  right after every THR write. Baud rate, parity and word length (LCR, DLL/DLM) are stored
  and read back but change nothing.
* The receiver has one 64-byte FIFO, whether or not the guest enabled FIFOs with FCR (a
  real chip then holds a single byte); FCR only decides the IIR "FIFOs enabled" bits and
  when the FIFO is cleared. Received-data interrupts are reported as soon as one byte is
  there (IIR 0x04); the trigger level is stored but not used, and there is no character
  timeout interrupt.
* Host input never overruns: :meth:`Serial8250.push_input` accepts only what fits, so the
  VM applies back-pressure to its input source. LSR.OE is only set when bytes written in
  loopback mode find the FIFO full.
* Loopback (MCR bit 4): THR bytes go to the receive FIFO instead of ``output``, the modem
  status inputs follow the modem control outputs (RTS->CTS, DTR->DSR, OUT1->RI,
  OUT2->DCD) and the receiver is cut off from the host (``push_input`` accepts nothing).
  Outside loopback, CTS, DSR and DCD read as asserted and RI as not.
* The interrupt output is not gated by MCR.OUT2 (as on a PC board); the guest masks
  interrupts through IER.

Interrupts are edges: ``raise_irq`` is called (outside the device lock, after any
``output`` of the same access) whenever an access makes an enabled interrupt condition
pending that was not pending before it, for example the first THR write after the guest
read IIR, the guest setting IER.ETBEI while THR is empty, input arriving in an empty
FIFO with IER.ERBFI set, or an overrun with IER.ELSI set. Restoring a saved state with
an enabled interrupt pending raises it once more (see :meth:`Serial8250.restore_state`).

Snapshots: :meth:`Serial8250.save_state` gives a :class:`Serial8250State`, plain values
following the convention in :mod:`avmm.devices._state`.

Threading: register accesses come from vCPU threads and ``push_input`` from the event-loop
thread; one :class:`threading.Lock` guards the registers and is held only while they
change. Callbacks (``output``, ``raise_irq``, ``on_rx_space``) run after the lock is
released, so they may call back into the device. ``output`` runs on the vCPU thread
that wrote THR before that vCPU returns to the guest, so bytes written by a guest that
serialises its own writers reach ``output`` in order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, final

import structlog

from avmm.devices._state import (
    DeviceStateError,
    check_bool,
    check_bytes,
    check_state_class,
    check_uint,
)

log = structlog.get_logger(__name__)

__all__ = [
    "COM1_BASE_PORT",
    "COM1_IRQ",
    "RX_FIFO_SIZE",
    "SERIAL_PORT_COUNT",
    "Serial8250",
    "Serial8250State",
]

COM1_BASE_PORT = 0x3F8
"""Where a PC has its first UART on the PIO bus."""

COM1_IRQ = 4
"""The ISA interrupt line COM1 uses (the VM wires ``raise_irq`` to it)."""

SERIAL_PORT_COUNT = 8
"""How many consecutive ports (bus length) the UART occupies."""

RX_FIFO_SIZE = 64
"""Capacity of the receive FIFO, in bytes."""

# Register offsets.
_RBR_THR_DLL = 0
_IER_DLM = 1
_IIR_FCR = 2
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7

# IER bits. The same bit positions name the four interrupt sources internally.
_IER_ERBFI = 0x01  # received data available
_IER_ETBEI = 0x02  # transmitter holding register empty
_IER_ELSI = 0x04  # receiver line status
_IER_EDSSI = 0x08  # modem status
_IER_MASK = 0x0F

# IIR values.
_IIR_NO_INT = 0x01
_IIR_MODEM_STATUS = 0x00
_IIR_THR_EMPTY = 0x02
_IIR_RX_DATA = 0x04
_IIR_LINE_STATUS = 0x06
_IIR_FIFOS_ENABLED = 0xC0

# FCR bits.
_FCR_ENABLE = 0x01
_FCR_CLEAR_RX = 0x02
_FCR_CLEAR_TX = 0x04
_FCR_STORED = 0xC9  # enable, DMA mode, trigger level; the clear bits self-clear

# LCR bits.
_LCR_DLAB = 0x80

# MCR bits.
_MCR_DTR = 0x01
_MCR_RTS = 0x02
_MCR_OUT1 = 0x04
_MCR_OUT2 = 0x08
_MCR_LOOP = 0x10
_MCR_MASK = 0x1F

# LSR bits.
_LSR_DR = 0x01
_LSR_OE = 0x02
_LSR_ERRORS = 0x1E  # OE, PE, FE, BI: sticky until LSR is read
_LSR_THRE = 0x20
_LSR_TEMT = 0x40

# MSR bits.
_MSR_DCTS = 0x01
_MSR_DDSR = 0x02
_MSR_TERI = 0x04
_MSR_DDCD = 0x08
_MSR_DELTAS = 0x0F
_MSR_CTS = 0x10
_MSR_DSR = 0x20
_MSR_RI = 0x40
_MSR_DCD = 0x80
_MSR_LINES_NOT_LOOPBACK = _MSR_CTS | _MSR_DSR | _MSR_DCD

_DEFAULT_DIVISOR_LOW = 0x0C  # 9600 baud from the PC's 1.8432 MHz clock

_BYTES = tuple(bytes([value]) for value in range(256))


@dataclass(frozen=True, slots=True)
class Serial8250State:
    """Everything the guest can observe of the UART, as plain values (for snapshots).

    The stored registers: ``ier``, ``lcr``, ``mcr``, ``scr``, the divisor latch ``dll`` and
    ``dlm``, and ``fcr`` (its stored bits: enable, DMA mode, trigger level; 0 while FIFOs
    are off). ``lsr_errors`` holds the sticky LSR error bits (only OE is ever set) and
    ``msr_deltas`` the MSR delta bits 0..3, both cleared by reading their register.
    ``thr_empty_pending`` is whether the "THR empty" interrupt condition is pending
    (whatever IER says; reading IIR while it names it clears it). ``rx_fifo`` holds the
    received bytes the guest has not read yet, oldest first.

    Everything else a guest reads follows from these fields, so it is not stored twice:
    IIR (the highest-priority pending condition IER enables, plus the FIFO bits), LSR.DR
    (the FIFO is not empty), LSR.THRE/TEMT (always set: transmission is instant, so there
    is no transmit FIFO or shift register to save), the MSR line bits (from MCR in
    loopback, fixed otherwise). There is no character-timeout state because the model has
    no timeout interrupt, and no interrupt-line level because the line is driven as edges
    (see :meth:`Serial8250.restore_state` for how an owed interrupt survives a restore).
    """

    STATE_VERSION: ClassVar[int] = 1

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    fcr: int = 0
    lsr_errors: int = 0
    msr_deltas: int = 0
    scr: int = 0
    dll: int = _DEFAULT_DIVISOR_LOW
    dlm: int = 0
    thr_empty_pending: bool = False
    rx_fifo: bytes = b""


#: The bits each register field of a valid state may have set.
_STATE_MASKS = {
    "ier": _IER_MASK,
    "lcr": 0xFF,
    "mcr": _MCR_MASK,
    "fcr": _FCR_STORED,
    "lsr_errors": _LSR_ERRORS,
    "msr_deltas": _MSR_DELTAS,
    "scr": 0xFF,
    "dll": 0xFF,
    "dlm": 0xFF,
}
_STATE_NAME = "serial"


def _check_state(state: Serial8250State) -> None:
    check_state_class(state, Serial8250State, _STATE_NAME)
    for name, mask in _STATE_MASKS.items():
        check_uint(_STATE_NAME, name, getattr(state, name), mask)
    if state.fcr and not state.fcr & _FCR_ENABLE:
        # The device stores FCR as 0 whenever the guest turns FIFOs off.
        raise DeviceStateError(
            f"{_STATE_NAME} state: fcr=0x{state.fcr:x} keeps FIFO settings without the "
            "enable bit"
        )
    check_bool(_STATE_NAME, "thr_empty_pending", state.thr_empty_pending)
    check_bytes(_STATE_NAME, "rx_fifo", state.rx_fifo, RX_FIFO_SIZE)


@final
class Serial8250:
    """A 16550A UART; a :class:`~avmm.bus.BusDevice` of length :data:`SERIAL_PORT_COUNT`.

    ``raise_irq()`` pulses the UART's (edge-triggered) interrupt line. ``output(data)``
    receives each byte the guest transmits, one ``bytes`` of length 1 per THR write, on the
    vCPU thread: keep it fast and non-blocking. ``on_rx_space()``, if given, is called
    (on a vCPU thread) once after a :meth:`push_input` could not take all it was offered,
    as soon as the guest has emptied the receive FIFO: the moment to push more.
    """

    def __init__(
        self,
        *,
        raise_irq: Callable[[], None],
        output: Callable[[bytes], None],
        on_rx_space: Callable[[], None] | None = None,
    ) -> None:
        self._raise_irq = raise_irq
        self._output = output
        self._on_rx_space = on_rx_space
        self._lock = threading.Lock()
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._scr = 0
        self._dll = _DEFAULT_DIVISOR_LOW
        self._dlm = 0
        self._thr_empty_pending = False
        self._rx_fifo = bytearray()
        # Host-side, not guest state: a push_input fell short and waits for on_rx_space.
        self._input_blocked = False

    # -- BusDevice -------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` registers from ``offset`` on (wider accesses split into bytes)."""
        with self._lock:
            if size == 1:
                result = _BYTES[self._read_register(offset)]
            else:
                result = bytes(self._read_register(offset + i) for i in range(size))
            notify_rx_space = self._take_rx_space_notification()
        if notify_rx_space:
            self._notify_rx_space()
        return result

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` to the registers from ``offset`` on, one byte each."""
        transmitted: bytes | None = None
        with self._lock:
            before = self._enabled_pending()
            for index, value in enumerate(data):
                sent = self._write_register(offset + index, value)
                if sent is not None:
                    transmitted = sent if transmitted is None else transmitted + sent
            raise_irq = bool(self._enabled_pending() & ~before)
            notify_rx_space = self._take_rx_space_notification()
        if transmitted is not None:
            self._output(transmitted)
        if raise_irq:
            self._raise_irq()
        if notify_rx_space:
            self._notify_rx_space()

    # -- host input ------------------------------------------------------------------------

    def push_input(self, data: bytes) -> int:
        """Queue bytes the guest will receive; return how many were accepted.

        Takes at most :meth:`rx_space` bytes (none in loopback mode), never overwriting
        unread input; the caller keeps the rest and retries later (see ``on_rx_space``).
        Raises the interrupt if this makes received data pending with IER.ERBFI set.
        Thread-safe; meant for the event-loop thread.
        """
        with self._lock:
            before = self._enabled_pending()
            accepted = min(len(data), self._rx_space_locked())
            if accepted:
                self._rx_fifo += data[:accepted]
            if accepted < len(data):
                self._input_blocked = True
            raise_irq = bool(self._enabled_pending() & ~before)
        if raise_irq:
            self._raise_irq()
        return accepted

    def rx_space(self) -> int:
        """How many bytes :meth:`push_input` would accept now (0 in loopback mode)."""
        with self._lock:
            return self._rx_space_locked()

    # -- snapshot --------------------------------------------------------------------------

    def save_state(self) -> Serial8250State:
        """A copy of every register and of the receive FIFO (see :mod:`avmm.devices._state`).

        Host-side bookkeeping is not part of it: whether a :meth:`push_input` fell short
        and waits for ``on_rx_space`` belongs to this process's input source, and a
        restored device's source starts afresh.
        """
        with self._lock:
            return Serial8250State(
                ier=self._ier,
                lcr=self._lcr,
                mcr=self._mcr,
                fcr=self._fcr,
                lsr_errors=self._lsr_errors,
                msr_deltas=self._msr_deltas,
                scr=self._scr,
                dll=self._dll,
                dlm=self._dlm,
                thr_empty_pending=self._thr_empty_pending,
                rx_fifo=bytes(self._rx_fifo),
            )

    def restore_state(self, state: Serial8250State) -> None:
        """Load ``state`` (from :meth:`save_state`, perhaps in another process).

        Raises :class:`DeviceStateError`, changing nothing, if ``state`` is not one this
        UART can be in. The receive FIFO is replaced, so restore before attaching the host
        input source, or input it pushed earlier is lost.

        If ``state`` has an interrupt pending that IER enables (IIR would not read "no
        interrupt"), ``raise_irq`` is pulsed once, after the registers are loaded. The
        line carries edges and the UART raises one only for a new condition, so the edge
        the guest is owed must come from somewhere, and the saved interrupt controller
        may not have it: an irqfd signal that KVM had not injected yet when the irqchip
        was saved is lost, and the guest's driver would wait for "THR empty" forever.
        So call this after the interrupt controller's state is restored and the irqfd is
        registered (a later KVM_SET_IRQCHIP would erase the pulse), before vCPUs run. If
        the saved controller did hold the interrupt, the guest takes a second one and its
        handler finds IIR reporting the same condition or none, which drivers tolerate.
        """
        _check_state(state)
        with self._lock:
            self._ier = state.ier
            self._lcr = state.lcr
            self._mcr = state.mcr
            self._fcr = state.fcr
            self._lsr_errors = state.lsr_errors
            self._msr_deltas = state.msr_deltas
            self._scr = state.scr
            self._dll = state.dll
            self._dlm = state.dlm
            self._thr_empty_pending = state.thr_empty_pending
            self._rx_fifo = bytearray(state.rx_fifo)
            raise_irq = bool(self._enabled_pending())
            notify_rx_space = self._take_rx_space_notification()
        if raise_irq:
            self._raise_irq()
        if notify_rx_space:
            self._notify_rx_space()

    # -- internals (called with the lock held) ---------------------------------------------

    def _rx_space_locked(self) -> int:
        if self._mcr & _MCR_LOOP:
            return 0
        return RX_FIFO_SIZE - len(self._rx_fifo)

    def _enabled_pending(self) -> int:
        """The pending interrupt conditions IER enables, as IER bits."""
        pending = 0
        if self._rx_fifo:
            pending |= _IER_ERBFI
        if self._thr_empty_pending:
            pending |= _IER_ETBEI
        if self._lsr_errors:
            pending |= _IER_ELSI
        if self._msr_deltas:
            pending |= _IER_EDSSI
        return pending & self._ier

    def _iir(self) -> int:
        pending = self._enabled_pending()
        if pending & _IER_ELSI:
            iir = _IIR_LINE_STATUS
        elif pending & _IER_ERBFI:
            iir = _IIR_RX_DATA
        elif pending & _IER_ETBEI:
            iir = _IIR_THR_EMPTY
        elif pending & _IER_EDSSI:
            iir = _IIR_MODEM_STATUS
        else:
            iir = _IIR_NO_INT
        if self._fcr & _FCR_ENABLE:
            iir |= _IIR_FIFOS_ENABLED
        return iir

    def _msr_lines(self) -> int:
        mcr = self._mcr
        if not mcr & _MCR_LOOP:
            return _MSR_LINES_NOT_LOOPBACK
        lines = 0
        if mcr & _MCR_RTS:
            lines |= _MSR_CTS
        if mcr & _MCR_DTR:
            lines |= _MSR_DSR
        if mcr & _MCR_OUT1:
            lines |= _MSR_RI
        if mcr & _MCR_OUT2:
            lines |= _MSR_DCD
        return lines

    def _take_rx_space_notification(self) -> bool:
        if (
            self._input_blocked
            and self._on_rx_space is not None
            and not self._rx_fifo
            and not self._mcr & _MCR_LOOP
        ):
            self._input_blocked = False
            return True
        return False

    def _notify_rx_space(self) -> None:
        assert self._on_rx_space is not None
        self._on_rx_space()

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & _LCR_DLAB
        if offset == _RBR_THR_DLL:
            if dlab:
                return self._dll
            if self._rx_fifo:
                return self._rx_fifo.pop(0)
            return 0
        if offset == _IER_DLM:
            return self._dlm if dlab else self._ier
        if offset == _IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == _IIR_THR_EMPTY:
                # Reading IIR while it names "THR empty" acknowledges that interrupt.
                self._thr_empty_pending = False
            return iir
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _LSR:
            lsr = _LSR_THRE | _LSR_TEMT | self._lsr_errors
            if self._rx_fifo:
                lsr |= _LSR_DR
            self._lsr_errors = 0
            return lsr
        if offset == _MSR:
            msr = self._msr_lines() | self._msr_deltas
            self._msr_deltas = 0
            return msr
        if offset == _SCR:
            return self._scr
        log.debug("serial read outside its registers", offset=offset)
        return 0xFF

    def _write_register(self, offset: int, value: int) -> bytes | None:
        """Apply one register write; return the byte to transmit, if any."""
        dlab = self._lcr & _LCR_DLAB
        if offset == _RBR_THR_DLL:
            if dlab:
                self._dll = value
                return None
            # The byte leaves at once, so THR is empty again right away.
            self._thr_empty_pending = True
            if not self._mcr & _MCR_LOOP:
                return _BYTES[value]
            if len(self._rx_fifo) < RX_FIFO_SIZE:
                self._rx_fifo.append(value)
            else:
                self._lsr_errors |= _LSR_OE
                log.debug("serial loopback overrun", dropped=value)
            return None
        if offset == _IER_DLM:
            if dlab:
                self._dlm = value
                return None
            old = self._ier
            self._ier = value & _IER_MASK
            if self._ier & _IER_ETBEI and not old & _IER_ETBEI:
                # THR is always empty, so enabling its interrupt makes it pending at once.
                self._thr_empty_pending = True
            return None
        if offset == _IIR_FCR:
            self._write_fcr(value)
            return None
        if offset == _LCR:
            self._lcr = value
            return None
        if offset == _MCR:
            self._write_mcr(value)
            return None
        if offset == _SCR:
            self._scr = value
            return None
        # LSR and MSR writes are factory-test features on real parts.
        log.debug("serial write ignored", offset=offset, value=value)
        return None

    def _write_fcr(self, value: int) -> None:
        enabled_before = self._fcr & _FCR_ENABLE
        if (value & _FCR_ENABLE) != enabled_before or value & _FCR_CLEAR_RX:
            # Changing the FIFO-enable bit clears both FIFOs, like the clear bits do.
            self._rx_fifo.clear()
        # Transmission is immediate, so there is no transmit FIFO to clear (_FCR_CLEAR_TX).
        self._fcr = value & _FCR_STORED if value & _FCR_ENABLE else 0

    def _write_mcr(self, value: int) -> None:
        lines_before = self._msr_lines()
        self._mcr = value & _MCR_MASK
        lines_after = self._msr_lines()
        changed = lines_before ^ lines_after
        deltas = 0
        if changed & _MSR_CTS:
            deltas |= _MSR_DCTS
        if changed & _MSR_DSR:
            deltas |= _MSR_DDSR
        if lines_before & _MSR_RI and not lines_after & _MSR_RI:
            deltas |= _MSR_TERI  # trailing edge only
        if changed & _MSR_DCD:
            deltas |= _MSR_DDCD
        self._msr_deltas |= deltas
