"""Snapshot state of the ACPI sleep registers: the soft-off sleep type the guest learned
from the ACPI tables in its RAM. A restored device answers to that type even when it was
built with another, and otherwise behaves as the original from the same point."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.arch.x86.acpi import S5_SLEEP_TYPE
from avmm.devices import AcpiSleep, AcpiSleepState, DeviceStateError
from avmm.devices.acpi_sleep import ACPI_SLEEP_PORT_COUNT, sleep_control_value

Op = tuple[str, int, int | bytes]


class Recorder:
    def __init__(self, soft_off_type: int = S5_SLEEP_TYPE) -> None:
        self.events: list[tuple[object, ...]] = []
        self.device = AcpiSleep(soft_off_type=soft_off_type,
                                on_poweroff=lambda: self.events.append(("poweroff",)))

    def run(self, ops: list[Op]) -> list[list[tuple[object, ...]]]:
        trace = []
        for kind, offset, arg in ops:
            start = len(self.events)
            if kind == "read":
                assert isinstance(arg, int)
                self.events.append(("read", self.device.read(offset, arg)))
            else:
                assert isinstance(arg, bytes)
                self.device.write(offset, arg)
            trace.append(self.events[start:])
        return trace


OPS = st.one_of(
    st.tuples(st.just("read"), st.integers(0, ACPI_SLEEP_PORT_COUNT - 1), st.just(1)),
    st.tuples(st.just("write"), st.integers(0, ACPI_SLEEP_PORT_COUNT - 1),
              st.one_of(st.builds(lambda t: bytes([sleep_control_value(t)]), st.integers(0, 7)),
                        st.binary(min_size=1, max_size=2))),
)


@settings(max_examples=100, deadline=None)
@given(soft_off=st.integers(0, 7), built_with=st.integers(0, 7),
       history=st.lists(OPS, max_size=10), continuation=st.lists(OPS, max_size=20))
def test_restored_registers_continue_like_the_original(
    soft_off: int, built_with: int, history: list[Op], continuation: list[Op]
) -> None:
    original = Recorder(soft_off)
    original.run(history)
    state = original.device.save_state()
    restored = Recorder(built_with)
    restored.device.restore_state(state)
    assert restored.events == []
    assert restored.run(continuation) == original.run(continuation)
    assert restored.device.save_state() == state == AcpiSleepState(soft_off_type=soft_off)


def test_restored_device_answers_to_the_saved_soft_off_type() -> None:
    # The guest's DSDT (in its saved RAM) says S5 is type 5; this avmm's would say 3.
    restored = Recorder(soft_off_type=3)
    restored.device.restore_state(Recorder(soft_off_type=5).device.save_state())
    restored.run([("write", 0, bytes([sleep_control_value(3)]))])
    assert restored.events == []
    restored.run([("write", 0, bytes([sleep_control_value(5)]))])
    assert restored.events == [("poweroff",)]


@pytest.mark.parametrize("bad", [8, -1, True, None, 5.0])
def test_restore_refuses_a_sleep_type_outside_three_bits(bad: object) -> None:
    device = Recorder()
    with pytest.raises(DeviceStateError, match="acpi-sleep state: soft_off_type="):
        device.device.restore_state(AcpiSleepState(soft_off_type=bad))  # type: ignore[arg-type]
    assert device.device.save_state() == AcpiSleepState(soft_off_type=S5_SLEEP_TYPE)
