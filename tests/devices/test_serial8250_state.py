"""Snapshot state of the 16550A UART.

The main check is differential: drive a UART through its registers (and host input) as a
guest would, save its state, restore it into another UART, then give both the same
further accesses. Every register read, every interrupt and every transmitted byte must be
the same on both; and the restored UART raises its interrupt once at restore exactly when
the original reports an interrupt pending (its IIR does not read "no interrupt").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.devices import DeviceStateError, I8042State, Serial8250, Serial8250State
from avmm.devices.serial import RX_FIFO_SIZE
from avmm.errors import AvmmError

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
LSR_DR, LSR_OE = 0x01, 0x02
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
DLAB = 0x80
FIFOS = 0xC0  # IIR bits 6..7 while FIFOs are enabled

# A guest access or host event: ("read", offset, size), ("write", offset, data) or
# ("input", data) for bytes the host pushes.
Op = tuple[str, int, int] | tuple[str, int, bytes] | tuple[str, bytes]


class Recorder:
    """A UART whose every observable effect lands, in order, in ``events``."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.device = Serial8250(
            raise_irq=lambda: self.events.append(("irq",)),
            output=lambda data: self.events.append(("out", data)),
        )

    def apply(self, op: Op) -> list[tuple[object, ...]]:
        """Perform one op; return what it produced (reads, interrupts, output)."""
        start = len(self.events)
        match op:
            case ("read", int(offset), int(size)):
                self.events.append(("read", offset, self.device.read(offset, size)))
            case ("write", int(offset), bytes(data)):
                self.device.write(offset, data)
            case ("input", bytes(data)):
                self.events.append(("accepted", self.device.push_input(data)))
            case _:
                raise AssertionError(op)
        return self.events[start:]

    def run(self, ops: Sequence[Op]) -> list[list[tuple[object, ...]]]:
        return [self.apply(op) for op in ops]

    def restore(self, state: Serial8250State) -> list[tuple[object, ...]]:
        start = len(self.events)
        self.device.restore_state(state)
        return self.events[start:]


def outb(offset: int, value: int) -> Op:
    return ("write", offset, bytes([value]))


def inb(offset: int) -> Op:
    return ("read", offset, 1)


@dataclass
class Outcome:
    state: Serial8250State
    #: What the restored UART did during restore_state (an interrupt, or nothing).
    at_restore: list[tuple[object, ...]]
    #: What the original's IIR read right after the snapshot.
    iir: int


def check_continuation(history: Sequence[Op], continuation: Sequence[Op],
                       *, target_history: Sequence[Op] = ()) -> Outcome:
    """Run ``history`` on a UART, snapshot it, restore into a UART that went through
    ``target_history`` (a fresh one by default), and check both behave the same from
    there on."""
    original = Recorder()
    original.run(history)
    state = original.device.save_state()

    restored = Recorder()
    restored.run(target_history)
    at_restore = restored.restore(state)
    assert restored.device.save_state() == state

    # The IIR read is the oracle for the pulse at restore: the restored UART owes the
    # guest an interrupt exactly when the original has one pending.
    ops = [inb(IIR), *continuation]
    original_trace = original.run(ops)
    restored_trace = restored.run(ops)
    iir = original_trace[0][0][2][0]  # type: ignore[index]
    assert at_restore == ([("irq",)] if not iir & IIR_NONE else [])
    assert restored_trace == original_trace
    assert restored.device.save_state() == original.device.save_state()
    return Outcome(state, at_restore, iir)


# -- hand-picked states --------------------------------------------------------------------

CONFIGURE = [
    outb(LCR, DLAB | 0x03), outb(DLL, 0x01), outb(DLM, 0x02), outb(LCR, 0x1B),
    outb(FCR, 0xC7), outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2), outb(SCR, 0x5A),
]
# What a guest does next: look at every register, drain the FIFO, transmit, loop back.
PROBE = [
    inb(IIR), inb(LSR), inb(MSR), inb(IER), inb(LCR), inb(MCR), inb(SCR),
    *[inb(RBR)] * 5, inb(IIR), inb(LSR), outb(THR, 0x41), inb(IIR), inb(IIR),
    outb(IER, 0x0F), inb(IIR), outb(MCR, MCR_LOOP | MCR_OUT1), inb(MSR), inb(IIR),
    outb(THR, 0x42), inb(LSR), inb(RBR), outb(LCR, DLAB | 0x1B), inb(DLL), inb(DLM),
    ("read", RBR, 8),
]


def test_pending_thr_empty_interrupt_is_raised_again_after_restore() -> None:
    # The guest enabled ETBEI and has not read IIR yet: it is owed a "THR empty"
    # interrupt. If that edge was still in flight to the irqchip when the VM was paused,
    # only the UART can deliver it again, or the guest's driver waits forever.
    outcome = check_continuation([*CONFIGURE, outb(IER, ETBEI)], PROBE)
    assert outcome.state.thr_empty_pending
    assert outcome.iir == FIFOS | IIR_THRE
    assert outcome.at_restore == [("irq",)]


def test_thr_empty_pending_but_masked_raises_nothing_until_enabled() -> None:
    # THR was written with IER clear: the condition is pending, no interrupt is owed.
    outcome = check_continuation([*CONFIGURE, outb(THR, ord("x"))],
                                 [outb(IER, ETBEI), inb(IIR), inb(IIR), *PROBE])
    assert outcome.state.thr_empty_pending
    assert outcome.iir == FIFOS | IIR_NONE
    assert outcome.at_restore == []


def test_received_data_survives_with_its_interrupt() -> None:
    outcome = check_continuation(
        [*CONFIGURE, outb(IER, ERBFI), ("input", b"hello"), inb(IIR), inb(RBR)], PROBE)
    assert outcome.state.rx_fifo == b"ello"
    assert outcome.iir == FIFOS | IIR_RX
    assert outcome.at_restore == [("irq",)]


def test_full_fifo_and_host_back_pressure_after_restore() -> None:
    history = [*CONFIGURE, outb(IER, ERBFI), ("input", bytes(range(RX_FIFO_SIZE + 10)))]
    outcome = check_continuation(history, [("input", b"more"), *[inb(RBR)] * RX_FIFO_SIZE,
                                           ("input", b"more"), *PROBE])
    assert outcome.state.rx_fifo == bytes(range(RX_FIFO_SIZE))


def test_loopback_overrun_line_status_interrupt() -> None:
    history = [*CONFIGURE, outb(MCR, MCR_LOOP), outb(IER, ELSI),
               *[outb(THR, value) for value in range(RX_FIFO_SIZE + 1)]]
    outcome = check_continuation(history, PROBE)
    assert outcome.state.lsr_errors == LSR_OE
    assert outcome.iir == FIFOS | IIR_LINE
    assert outcome.at_restore == [("irq",)]


def test_modem_status_deltas_and_interrupt() -> None:
    history = [*CONFIGURE, outb(IER, EDSSI), outb(MCR, MCR_LOOP | MCR_OUT1 | MCR_RTS),
               outb(MCR, MCR_LOOP)]
    outcome = check_continuation(history, PROBE)
    assert outcome.state.msr_deltas
    assert outcome.iir == FIFOS | IIR_MODEM
    assert outcome.at_restore == [("irq",)]


def test_dlab_set_at_snapshot_time() -> None:
    outcome = check_continuation([*CONFIGURE, ("input", b"xyz"), outb(LCR, DLAB | 0x03)],
                                 PROBE)
    assert outcome.state.lcr == DLAB | 0x03 and outcome.state.rx_fifo == b"xyz"


def test_restore_over_a_used_uart_leaves_nothing_of_its_past() -> None:
    busy = [*CONFIGURE, outb(IER, 0x0F), ("input", b"junk"), outb(MCR, MCR_LOOP | 0x0F),
            outb(THR, 1), outb(MCR, 0)]
    outcome = check_continuation([outb(SCR, 1)], PROBE, target_history=busy)
    assert outcome.at_restore == []


def test_restore_calls_on_rx_space_once_the_restored_fifo_drains() -> None:
    # Host input back-pressure works on a restored UART: a full FIFO accepts nothing,
    # and on_rx_space fires when the guest has read it all.
    original = Recorder()
    original.run([("input", bytes(RX_FIFO_SIZE))])
    calls: list[None] = []
    restored = Serial8250(raise_irq=lambda: None, output=lambda _: None,
                          on_rx_space=lambda: calls.append(None))
    restored.restore_state(original.device.save_state())
    assert restored.push_input(b"x") == 0
    for _ in range(RX_FIFO_SIZE - 1):
        restored.read(RBR, 1)
    assert calls == []
    restored.read(RBR, 1)
    assert calls == [None]


# -- any history ---------------------------------------------------------------------------

_INTERESTING_WRITES = st.one_of(
    st.tuples(st.just(LCR), st.sampled_from([0x03, 0x1B, DLAB | 0x03, DLAB, 0xFF])),
    st.tuples(st.just(IER), st.integers(0, 0xFF)),
    st.tuples(st.just(MCR), st.integers(0, 0x3F)),
    st.tuples(st.just(FCR), st.sampled_from([0, 0x01, 0x03, 0x07, 0xC7, 0x41, 0x06, 0xFF])),
    st.tuples(st.integers(0, 7), st.integers(0, 0xFF)),
)
OPS: st.SearchStrategy[Op] = st.one_of(
    st.builds(lambda o: inb(o), st.integers(0, 7)),
    st.builds(lambda o, s: ("read", o, s), st.integers(0, 7), st.sampled_from([2, 4])),
    st.builds(lambda ov: outb(*ov), _INTERESTING_WRITES),
    st.builds(lambda o, d: ("write", o, d), st.integers(0, 7), st.binary(min_size=2,
                                                                         max_size=4)),
    st.builds(lambda d: ("input", d), st.binary(max_size=RX_FIFO_SIZE + 8)),
)


@settings(max_examples=300, deadline=None)
@given(history=st.lists(OPS, max_size=40), continuation=st.lists(OPS, max_size=40),
       target_history=st.lists(OPS, max_size=10))
def test_any_history_continues_identically_after_restore(
    history: list[Op], continuation: list[Op], target_history: list[Op]
) -> None:
    check_continuation(history, continuation, target_history=target_history)


@settings(max_examples=100, deadline=None)
@given(history=st.lists(OPS, max_size=40))
def test_state_is_plain_data_and_survives_json(history: list[Op]) -> None:
    original = Recorder()
    original.run(history)
    state = original.device.save_state()
    plain = asdict(state)
    assert all(type(value) in (int, bool, bytes) for value in plain.values())
    text = json.dumps({key: value.hex() if isinstance(value, bytes) else value
                       for key, value in plain.items()})
    loaded = {key: bytes.fromhex(value) if isinstance(getattr(state, key), bytes) else value
              for key, value in json.loads(text).items()}
    rebuilt = Serial8250State(**loaded)
    assert rebuilt == state
    check = Recorder()
    check.device.restore_state(rebuilt)
    assert check.device.save_state() == state


def test_saved_state_is_a_copy_not_a_view() -> None:
    uart = Recorder()
    uart.run([("input", b"abc")])
    state = uart.device.save_state()
    uart.run([inb(RBR), outb(SCR, 9)])
    assert (state.rx_fifo, state.scr) == (b"abc", 0)


def test_save_state_holds_the_registers_the_guest_wrote() -> None:
    uart = Recorder()
    uart.run([*CONFIGURE, outb(IER, ERBFI | ETBEI), ("input", b"pending")])
    assert uart.device.save_state() == Serial8250State(
        ier=ERBFI | ETBEI, lcr=0x1B, mcr=MCR_DTR | MCR_RTS | MCR_OUT2,
        fcr=0xC1,  # the clear bits (0x06) are not kept
        lsr_errors=0, msr_deltas=0, scr=0x5A, dll=0x01, dlm=0x02,
        thr_empty_pending=True, rx_fifo=b"pending",
    )


# States built field by field, not through the registers: restore takes every one the
# checks allow, and two UARTs restored from it answer every register alike.
VALID_STATES = st.builds(
    Serial8250State,
    ier=st.integers(0, 0x0F),
    lcr=st.integers(0, 0xFF),
    mcr=st.integers(0, 0x1F),
    fcr=st.sampled_from([0, 0x01, 0x41, 0x81, 0xC1, 0xC9]),
    lsr_errors=st.sampled_from([0, 0x02, 0x1E]),
    msr_deltas=st.integers(0, 0x0F),
    scr=st.integers(0, 0xFF),
    dll=st.integers(0, 0xFF),
    dlm=st.integers(0, 0xFF),
    thr_empty_pending=st.booleans(),
    rx_fifo=st.binary(max_size=RX_FIFO_SIZE),
)


@settings(max_examples=200, deadline=None)
@given(state=VALID_STATES, continuation=st.lists(OPS, max_size=20))
def test_any_valid_state_restores_and_continues_alike(
    state: Serial8250State, continuation: list[Op]
) -> None:
    first = Recorder()
    assert len(first.restore(state)) <= 1
    assert first.device.save_state() == state
    second = Recorder()
    second.restore(first.device.save_state())
    ops = [*[inb(offset) for offset in (IIR, LSR, MSR, LCR, MCR, SCR, IER, RBR, IIR, LSR)],
           *continuation]
    assert first.run(ops) == second.run(ops)


# -- malformed states ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _NextVersionState(Serial8250State):
    """What a newer avmm's UART state class would look like to this one."""

    STATE_VERSION: ClassVar[int] = Serial8250State.STATE_VERSION + 1


@dataclass(frozen=True, slots=True)
class _ExtendedState(Serial8250State):
    """Same version, one field more: restore must not silently drop it."""

    extra: int = 0


@pytest.mark.parametrize(
    "bad",
    [
        Serial8250State(ier=0x10),  # IER bits 4..7 are reserved
        Serial8250State(lcr=0x100),
        Serial8250State(mcr=0x20),
        Serial8250State(fcr=0x06),  # the clear bits never stay set
        Serial8250State(fcr=0x40),  # a trigger level without the enable bit
        Serial8250State(lsr_errors=LSR_DR),  # DR follows the FIFO, it is not stored
        Serial8250State(msr_deltas=0x10),  # line bits follow MCR, they are not stored
        Serial8250State(dll=-1),
        Serial8250State(dlm=256),
        Serial8250State(scr=True),  # type: ignore[arg-type]
        Serial8250State(scr=1.0),  # type: ignore[arg-type]
        Serial8250State(thr_empty_pending=1),  # type: ignore[arg-type]
        Serial8250State(rx_fifo=bytes(RX_FIFO_SIZE + 1)),
        Serial8250State(rx_fifo=bytearray(b"x")),  # type: ignore[arg-type]
        Serial8250State(rx_fifo="text"),  # type: ignore[arg-type]
        _NextVersionState(),
        _ExtendedState(),
        I8042State(),
        None,
        {"ier": 0},
    ],
    ids=lambda bad: repr(bad)[:60],
)
def test_restore_refuses_a_state_it_could_not_be_in(bad: object) -> None:
    uart = Recorder()
    uart.run([*CONFIGURE, outb(IER, 0x0F), ("input", b"pending")])
    before = uart.device.save_state()
    events_before = list(uart.events)
    with pytest.raises(DeviceStateError) as error:
        uart.device.restore_state(bad)  # type: ignore[arg-type]
    assert isinstance(error.value, AvmmError)
    message = str(error.value)
    assert "\n" not in message and message.startswith("serial state: ")
    # Nothing changed and nothing was raised.
    assert uart.device.save_state() == before
    assert uart.events == events_before


def test_wrong_version_message_names_both_versions() -> None:
    device = Serial8250(raise_irq=lambda: None, output=lambda _: None)
    with pytest.raises(DeviceStateError, match=r"version 2, this avmm restores version 1"):
        device.restore_state(_NextVersionState())


def test_state_is_frozen() -> None:
    state = Serial8250State()
    with pytest.raises(AttributeError):
        state.ier = 1  # type: ignore[misc]
    assert replace(state, ier=1).ier == 1
