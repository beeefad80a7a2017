"""The debug-exit port is stateless: its state class is empty, and a restored port ends
the VM with the same status as the original for every later write."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmm.devices import (
    DEBUG_EXIT_PORT_COUNT,
    DebugExit,
    DebugExitState,
    DeviceStateError,
    I8042State,
)

Op = tuple[str, int, int | bytes]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.device = DebugExit(on_exit=lambda status: self.events.append(("exit", status)))

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
    st.tuples(st.just("read"), st.integers(0, DEBUG_EXIT_PORT_COUNT - 1),
              st.sampled_from([1, 2, 4])),
    st.tuples(st.just("write"), st.integers(0, DEBUG_EXIT_PORT_COUNT - 1),
              st.binary(min_size=1, max_size=4)),
)


@settings(max_examples=100, deadline=None)
@given(history=st.lists(OPS, max_size=10), continuation=st.lists(OPS, max_size=10))
def test_restored_port_continues_like_the_original(
    history: list[Op], continuation: list[Op]
) -> None:
    original = Recorder()
    original.run(history)
    restored = Recorder()
    restored.device.restore_state(original.device.save_state())
    assert restored.events == []  # restoring ends nothing
    assert restored.run(continuation) == original.run(continuation)


def test_state_has_no_fields() -> None:
    assert fields(DebugExitState) == ()
    assert DebugExit(on_exit=lambda _: None).save_state() == DebugExitState()


def test_restore_refuses_another_device_state() -> None:
    expected = "debug-exit state: expected DebugExitState, got I8042State"
    with pytest.raises(DeviceStateError, match=expected):
        DebugExit(on_exit=lambda _: None).restore_state(I8042State())  # type: ignore[arg-type]
