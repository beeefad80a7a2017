"""The 16550A UART model, driven through its register offsets as a guest would."""

from __future__ import annotations

import threading
import time

import pytest

from avmm.bus import Bus
from avmm.devices import Serial8250
from avmm.devices.serial import COM1_BASE_PORT, RX_FIFO_SIZE, SERIAL_PORT_COUNT

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

ERBFI, ETBEI, ELSI, EDSSI = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_MODEM, IIR_THRE, IIR_RX, IIR_LINE = 0x01, 0x00, 0x02, 0x04, 0x06
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10


class Uart:
    """A Serial8250 with recording callbacks and byte-register helpers."""

    def __init__(self) -> None:
        self.irqs = 0
        self.output: list[bytes] = []
        self.rx_space_calls = 0
        self.device = Serial8250(
            raise_irq=self._raise, output=self.output.append, on_rx_space=self._rx_space
        )

    def _raise(self) -> None:
        self.irqs += 1

    def _rx_space(self) -> None:
        self.rx_space_calls += 1

    def inb(self, offset: int) -> int:
        return self.device.read(offset, 1)[0]

    def outb(self, offset: int, value: int) -> None:
        self.device.write(offset, bytes([value]))


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_mapping_constants() -> None:
    assert COM1_BASE_PORT == 0x3F8
    assert SERIAL_PORT_COUNT == 8


def test_thr_write_calls_output_byte_by_byte(uart: Uart) -> None:
    for char in b"hi\n":
        uart.outb(THR, char)
    assert uart.output == [b"h", b"i", b"\n"]
    assert uart.irqs == 0  # no interrupt enabled


def test_reset_values(uart: Uart) -> None:
    assert uart.inb(IER) == 0
    assert uart.inb(IIR) == IIR_NONE
    assert uart.inb(LCR) == 0
    assert uart.inb(MCR) == 0
    assert uart.inb(LSR) == LSR_THRE | LSR_TEMT
    assert uart.inb(MSR) == 0xB0  # DCD, DSR, CTS asserted, no deltas
    assert uart.inb(SCR) == 0


def test_lsr_data_ready_follows_the_fifo(uart: Uart) -> None:
    assert uart.device.push_input(b"ab") == 2
    assert uart.inb(LSR) == LSR_THRE | LSR_TEMT | LSR_DR
    assert uart.inb(RBR) == ord("a")
    assert uart.inb(LSR) & LSR_DR
    assert uart.inb(RBR) == ord("b")
    assert uart.inb(LSR) == LSR_THRE | LSR_TEMT
    assert uart.inb(RBR) == 0  # empty FIFO


def test_ier_keeps_only_the_low_nibble(uart: Uart) -> None:
    uart.outb(IER, 0xF0)
    assert uart.inb(IER) == 0
    uart.outb(IER, 0xFF)
    assert uart.inb(IER) == 0x0F


def test_fcr_fifo_enable_shows_in_iir(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    assert uart.inb(IIR) == 0xC0 | IIR_NONE
    uart.outb(FCR, 0x00)
    assert uart.inb(IIR) == IIR_NONE


def test_enabling_etbei_raises_at_once(uart: Uart) -> None:
    uart.outb(IER, ETBEI)
    assert uart.irqs == 1
    assert uart.inb(IIR) == IIR_THRE
    # Reading IIR while it names THR empty acknowledges it.
    assert uart.inb(IIR) == IIR_NONE
    # Rewriting the same IER is not a new edge.
    uart.outb(IER, ETBEI)
    assert uart.irqs == 1
    assert uart.inb(IIR) == IIR_NONE
    # Disabling and enabling again re-asserts THR empty, as a real 16550 does.
    uart.outb(IER, 0)
    uart.outb(IER, ETBEI)
    assert uart.irqs == 2
    assert uart.inb(IIR) == IIR_THRE


def test_thr_write_makes_thr_empty_pending_again(uart: Uart) -> None:
    uart.outb(IER, ETBEI)
    assert uart.inb(IIR) == IIR_THRE
    assert uart.irqs == 1
    uart.outb(THR, ord("x"))
    assert uart.irqs == 2
    # Still pending (not acknowledged), so the next byte is no new edge.
    uart.outb(THR, ord("y"))
    assert uart.irqs == 2
    assert uart.inb(IIR) == IIR_THRE
    assert uart.inb(IIR) == IIR_NONE
    assert uart.output == [b"x", b"y"]


def test_thr_empty_interrupt_is_masked_without_etbei(uart: Uart) -> None:
    uart.outb(THR, ord("x"))
    assert uart.inb(IIR) == IIR_NONE
    assert uart.irqs == 0


def test_rx_interrupt_raised_when_data_arrives(uart: Uart) -> None:
    uart.outb(IER, ERBFI)
    assert uart.irqs == 0
    assert uart.device.push_input(b"a") == 1
    assert uart.irqs == 1
    assert uart.inb(IIR) == IIR_RX
    # More data while data is already pending: no new edge.
    uart.device.push_input(b"b")
    assert uart.irqs == 1
    # Reading IIR does not clear the data-available condition; draining RBR does.
    assert uart.inb(IIR) == IIR_RX
    uart.inb(RBR)
    assert uart.inb(IIR) == IIR_RX
    uart.inb(RBR)
    assert uart.inb(IIR) == IIR_NONE
    uart.device.push_input(b"c")
    assert uart.irqs == 2


def test_rx_without_erbfi_raises_only_when_enabled(uart: Uart) -> None:
    uart.device.push_input(b"a")
    assert uart.irqs == 0
    assert uart.inb(IIR) == IIR_NONE
    uart.outb(IER, ERBFI)
    assert uart.irqs == 1
    assert uart.inb(IIR) == IIR_RX


def test_rx_fifo_accepts_only_free_space(uart: Uart) -> None:
    assert uart.device.rx_space() == RX_FIFO_SIZE
    data = bytes(range(100))
    assert uart.device.push_input(data) == RX_FIFO_SIZE
    assert uart.device.rx_space() == 0
    assert uart.device.push_input(b"more") == 0
    # Back-pressure is not an overrun.
    assert not uart.inb(LSR) & LSR_OE
    assert uart.inb(RBR) == 0
    assert uart.device.rx_space() == 1
    assert uart.device.push_input(b"\xaa\xbb") == 1
    received = bytes(uart.inb(RBR) for _ in range(RX_FIFO_SIZE))
    assert received == data[1:RX_FIFO_SIZE] + b"\xaa"
    assert not uart.inb(LSR) & LSR_DR


def test_push_input_empty_is_a_no_op(uart: Uart) -> None:
    uart.outb(IER, ERBFI)
    assert uart.device.push_input(b"") == 0
    assert uart.irqs == 0


def test_on_rx_space_after_short_push_once_fifo_drained(uart: Uart) -> None:
    assert uart.device.push_input(bytes(RX_FIFO_SIZE)) == RX_FIFO_SIZE
    for _ in range(RX_FIFO_SIZE):
        uart.inb(RBR)
    assert uart.rx_space_calls == 0  # nobody was waiting
    assert uart.device.push_input(bytes(RX_FIFO_SIZE + 1)) == RX_FIFO_SIZE
    for _ in range(RX_FIFO_SIZE - 1):
        uart.inb(RBR)
    assert uart.rx_space_calls == 0
    uart.inb(RBR)
    assert uart.rx_space_calls == 1
    uart.inb(RBR)
    assert uart.rx_space_calls == 1


def test_on_rx_space_after_fifo_reset(uart: Uart) -> None:
    uart.device.push_input(bytes(RX_FIFO_SIZE + 1))
    uart.outb(FCR, 0x01 | 0x02)  # enable FIFOs (clears them)
    assert uart.rx_space_calls == 1
    assert uart.device.rx_space() == RX_FIFO_SIZE


def test_fcr_clear_rx_drops_input(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    uart.device.push_input(b"abc")
    uart.outb(FCR, 0x01 | 0x02)
    assert not uart.inb(LSR) & LSR_DR
    # Writing FCR with the same enable bit and no clear bit keeps the data.
    uart.device.push_input(b"abc")
    uart.outb(FCR, 0x01 | 0x04 | 0xC0)
    assert uart.inb(LSR) & LSR_DR
    assert uart.inb(IIR) & 0xC0 == 0xC0


def test_divisor_latch(uart: Uart) -> None:
    uart.outb(IER, ERBFI)
    uart.device.push_input(b"z")
    uart.outb(LCR, 0x80 | 0x03)
    assert (uart.inb(DLL), uart.inb(DLM)) == (0x0C, 0x00)  # 9600 baud by default
    uart.outb(DLL, 0x01)
    uart.outb(DLM, 0x02)
    assert (uart.inb(DLL), uart.inb(DLM)) == (0x01, 0x02)
    assert uart.output == []  # DLL writes are not transmitted
    assert uart.inb(LSR) & LSR_DR  # DLL reads do not drain the FIFO
    uart.outb(LCR, 0x03)
    assert uart.inb(LCR) == 0x03
    assert uart.inb(IER) == ERBFI
    assert uart.inb(RBR) == ord("z")
    uart.outb(LCR, 0x80)
    assert (uart.inb(DLL), uart.inb(DLM)) == (0x01, 0x02)


def test_scratch_register(uart: Uart) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF):
        uart.outb(SCR, value)
        assert uart.inb(SCR) == value


def test_loopback_routes_output_to_input(uart: Uart) -> None:
    uart.outb(MCR, MCR_LOOP)
    assert uart.device.rx_space() == 0
    assert uart.device.push_input(b"host") == 0
    uart.outb(THR, ord("L"))
    assert uart.output == []
    assert uart.inb(LSR) & LSR_DR
    assert uart.inb(RBR) == ord("L")
    uart.outb(MCR, 0)
    uart.outb(THR, ord("N"))
    assert uart.output == [b"N"]
    assert uart.device.rx_space() == RX_FIFO_SIZE


def test_loopback_modem_status_mirrors_mcr(uart: Uart) -> None:
    # What Linux's 8250 autoconfig checks: LOOP|RTS|OUT2 reads back as CTS|DCD.
    uart.outb(MCR, MCR_LOOP | MCR_RTS | MCR_OUT2)
    assert uart.inb(MSR) & 0xF0 == 0x90
    uart.outb(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert uart.inb(MSR) & 0xF0 == 0x60  # DSR | RI
    uart.outb(MCR, MCR_LOOP)
    msr = uart.inb(MSR)
    assert msr & 0xF0 == 0
    assert msr & 0x0F == 0x02 | 0x04  # DDSR, and TERI for RI's trailing edge
    assert uart.inb(MSR) & 0x0F == 0  # deltas clear on read
    uart.outb(MCR, 0)
    assert uart.inb(MSR) == 0xB0 | 0x01 | 0x02 | 0x08


def test_modem_status_interrupt(uart: Uart) -> None:
    uart.outb(IER, EDSSI)
    assert uart.irqs == 0
    uart.outb(MCR, MCR_LOOP | MCR_RTS)  # DSR and DCD drop: deltas
    assert uart.irqs == 1
    assert uart.inb(IIR) == IIR_MODEM
    uart.inb(MSR)
    assert uart.inb(IIR) == IIR_NONE


def test_loopback_overrun_sets_oe_and_line_status(uart: Uart) -> None:
    uart.outb(IER, ELSI)
    uart.outb(MCR, MCR_LOOP)
    for value in range(RX_FIFO_SIZE):
        uart.outb(THR, value)
    assert uart.irqs == 0
    uart.outb(THR, 0xEE)
    assert uart.irqs == 1
    assert uart.inb(IIR) == IIR_LINE
    assert uart.inb(LSR) == LSR_THRE | LSR_TEMT | LSR_DR | LSR_OE
    assert uart.inb(LSR) & LSR_OE == 0  # sticky until read
    assert uart.inb(IIR) == IIR_NONE
    assert bytes(uart.inb(RBR) for _ in range(RX_FIFO_SIZE)) == bytes(range(RX_FIFO_SIZE))


def test_iir_priority_and_clearing(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    uart.outb(IER, ERBFI | ETBEI | ELSI | EDSSI)
    uart.outb(MCR, MCR_LOOP | MCR_RTS)  # modem deltas
    for value in range(RX_FIFO_SIZE + 1):  # fills the FIFO, then overruns
        uart.outb(THR, value)
    assert uart.inb(IIR) == 0xC0 | IIR_LINE
    uart.inb(LSR)
    assert uart.inb(IIR) == 0xC0 | IIR_RX
    for _ in range(RX_FIFO_SIZE):
        uart.inb(RBR)
    assert uart.inb(IIR) == 0xC0 | IIR_THRE
    assert uart.inb(IIR) == 0xC0 | IIR_MODEM  # the THRE read acknowledged it
    uart.inb(MSR)
    assert uart.inb(IIR) == 0xC0 | IIR_NONE


def test_reading_iir_does_not_clear_thre_behind_higher_priority(uart: Uart) -> None:
    uart.outb(IER, ERBFI | ETBEI)
    uart.device.push_input(b"a")
    assert uart.inb(IIR) == IIR_RX
    uart.inb(RBR)
    assert uart.inb(IIR) == IIR_THRE


def test_lsr_and_msr_writes_are_ignored(uart: Uart) -> None:
    uart.outb(LSR, 0xFF)
    uart.outb(MSR, 0xFF)
    assert uart.inb(LSR) == LSR_THRE | LSR_TEMT
    assert uart.inb(MSR) == 0xB0


def test_wide_accesses_split_into_register_accesses(uart: Uart) -> None:
    uart.device.write(SCR - 1, b"\x00\x5a")  # MSR (ignored), SCR
    assert uart.inb(SCR) == 0x5A
    uart.device.push_input(b"q")
    assert uart.device.read(RBR, 2) == bytes([ord("q"), 0])  # RBR, IER
    uart.device.write(THR, b"ab")  # THR = 'a', IER = 'b' & 0x0f
    assert uart.output == [b"a"]
    assert uart.inb(IER) == ord("b") & 0x0F


def test_through_the_bus(uart: Uart) -> None:
    bus = Bus("pio")
    bus.insert(uart.device, COM1_BASE_PORT, SERIAL_PORT_COUNT, name="com1")
    for char in b"ok":
        assert bus.write(COM1_BASE_PORT + THR, bytes([char]))
    assert uart.output == [b"o", b"k"]
    assert bus.read(COM1_BASE_PORT + LSR, 1) == bytes([LSR_THRE | LSR_TEMT])


def test_callbacks_may_reenter_the_device() -> None:
    """Callbacks run outside the lock: an echoing output does not deadlock."""
    device: Serial8250

    def echo(data: bytes) -> None:
        device.push_input(data)

    irqs: list[int] = []
    device = Serial8250(raise_irq=lambda: irqs.append(device.rx_space()), output=echo)
    device.write(IER, bytes([ERBFI]))
    device.write(THR, b"e")
    assert device.read(RBR, 1) == b"e"
    assert irqs == [RX_FIFO_SIZE - 1]


def test_concurrent_push_input_and_rbr_reads_lose_and_duplicate_nothing() -> None:
    device = Serial8250(raise_irq=lambda: None, output=lambda _: None)
    data = bytes((i * 7 + i // 256) & 0xFF for i in range(20_000))
    received = bytearray()
    deadline = time.monotonic() + 30
    failures: list[str] = []

    def producer() -> None:
        sent = 0
        while sent < len(data):
            if time.monotonic() > deadline:
                failures.append("producer timed out")
                return
            accepted = device.push_input(data[sent : sent + 48])
            sent += accepted
            if not accepted:
                time.sleep(0)

    def consumer() -> None:
        while len(received) < len(data):
            if time.monotonic() > deadline:
                failures.append("consumer timed out")
                return
            if device.read(LSR, 1)[0] & LSR_DR:
                received.append(device.read(RBR, 1)[0])
            else:
                time.sleep(0)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert bytes(received) == data
    assert device.rx_space() == RX_FIFO_SIZE
