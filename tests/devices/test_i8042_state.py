"""Snapshot state of the reset-only i8042: empty, and a restored controller answers every
access as the original does from the same point (a differential test)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.devices import I8042, I8042_PORT_COUNT, BootTimerState, DeviceStateError, I8042State

COMMAND_OFFSET = 4
PULSE_RESET = 0xFE

Op = tuple[str, int, int | bytes]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.device = I8042(on_reset=lambda: self.events.append(("reset",)))

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
    st.tuples(st.just("read"), st.integers(0, I8042_PORT_COUNT - 1), st.sampled_from([1, 2])),
    st.tuples(st.just("write"), st.integers(0, I8042_PORT_COUNT - 1),
              st.one_of(st.just(bytes([PULSE_RESET])), st.binary(min_size=1, max_size=2))),
)


@settings(max_examples=100, deadline=None)
@given(history=st.lists(OPS, max_size=20), continuation=st.lists(OPS, max_size=20))
def test_restored_controller_continues_like_the_original(
    history: list[Op], continuation: list[Op]
) -> None:
    original = Recorder()
    original.run(history)
    state = original.device.save_state()
    restored = Recorder()
    restored.device.restore_state(state)
    assert restored.events == []  # restoring resets nothing
    assert restored.run(continuation) == original.run(continuation)
    assert restored.device.save_state() == original.device.save_state() == I8042State()


def test_state_has_no_fields() -> None:
    assert fields(I8042State) == ()


def test_reset_still_works_after_restore() -> None:
    restored = Recorder()
    restored.device.restore_state(I8042(on_reset=lambda: None).save_state())
    restored.run([("write", COMMAND_OFFSET, bytes([PULSE_RESET]))])
    assert restored.events == [("reset",)]


def test_restore_refuses_another_device_state() -> None:
    expected = "i8042 state: expected I8042State, got BootTimerState"
    with pytest.raises(DeviceStateError, match=expected):
        I8042(on_reset=lambda: None).restore_state(BootTimerState())  # type: ignore[arg-type]
